"""Issue 9 fault 6: a failed request to a node reads as one clear phrase, never a cut-off urllib3 repr."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

import pytest
import requests
from urllib3.connection import HTTPConnection
from urllib3.exceptions import MaxRetryError, NameResolutionError, NewConnectionError

from gpu_controller import GPUController, NodeError, _short_cause


@pytest.fixture
def plain_http_port() -> Iterator[int]:
    """A 127.0.0.1 server that answers every connection with plain HTTP (so a TLS handshake fails)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                return
            with conn:
                conn.recv(4096)
                conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")

    threading.Thread(target=serve, daemon=True).start()
    yield server.getsockname()[1]
    stop.set()
    server.close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def node_error(url: str, timeout: float = 2.0) -> NodeError:
    controller = GPUController(timeout=timeout)
    try:
        with pytest.raises(NodeError) as info:
            controller.call(url, "GET", "/api/ps")
        return info.value
    finally:
        controller.close()


def test_refused(plain_http_port: int) -> None:
    error = node_error(f"http://127.0.0.1:{free_port()}")
    assert error.message.endswith("is unreachable (connection refused)")


def test_tls_to_a_plain_http_node(plain_http_port: int) -> None:
    error = node_error(f"https://127.0.0.1:{plain_http_port}")
    assert error.message.endswith("(TLS handshake failed: the node does not speak HTTPS (try http://))")


def test_timeout(sim_node) -> None:
    node = sim_node(vram_gb=0)
    node.set_fault("hang")
    error = node_error(node.url, timeout=0.3)
    assert error.reason == "timeout" and "did not answer /api/ps within 0.3s" in error.message


def _wrapped(cause: Exception) -> requests.ConnectionError:
    """The chain requests really raises: ConnectionError(MaxRetryError(pool, url, cause))."""
    return requests.ConnectionError(MaxRetryError(None, "/api/ps", cause))


def test_name_resolution_reads_as_one_phrase() -> None:
    conn = HTTPConnection("nosuch-host.example", 11434)
    cause = NameResolutionError("nosuch-host.example", conn, socket.gaierror(-2, "Name or service not known"))
    assert _short_cause(_wrapped(cause)) == "host name not found (check the spelling, or DNS)"


def test_too_many_open_files_reads_as_one_phrase() -> None:
    conn = HTTPConnection("127.0.0.1", 11434)
    cause = NewConnectionError(conn, "Failed to establish a new connection: [Errno 24] Too many open files")
    assert _short_cause(_wrapped(cause)) == "too many open files on this machine (raise `ulimit -n`)"


def test_an_unknown_cause_is_cut_at_a_word() -> None:
    words = [f"w{i:03d}" for i in range(60)]  # all four characters: a cut mid-word is not one of them
    cause = _short_cause(RuntimeError("Max retries exceeded (Caused by Weird(" + " ".join(words) + "))"))
    assert cause.startswith("Weird(w000 w001") and cause.endswith("…") and len(cause) <= 121
    assert cause[:-1].split()[-1] in words
