"""The node transport against hostile and broken nodes (issue 8): deadlines, size caps, no redirects,
unsafe JSON, one-phrase causes, and the pool's reuse. Hostile behaviours come from tests/hostile.py; the
simulator only stands in for an honest node a redirect points at."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import threading
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import wait_until
from hostile import HostileNode, Request, answer, reply
from requests.structures import CaseInsensitiveDict

from flockparse.transport import MAX_REPLY_BYTES, NodeError, NodeTransport, reply_limit
from gpu_controller import GPUController

FAST = 0.5  # every call's total deadline in these tests
PACE = 0.05  # a trickling node sends one byte this often: 10x inside the read timeout
PS_EMPTY = json.dumps({"models": []}).encode()
PS_ON_CPU = json.dumps(
    {"models": [{"name": "llama3.1:latest", "model": "llama3.1:latest", "size": 10, "size_vram": 0}]}
).encode()
MIB = 1024 * 1024


@pytest.fixture
def ctl() -> Iterator[GPUController]:
    controller = GPUController(timeout=FAST, load_timeout=FAST, verify_timeout=2.0)
    yield controller
    controller.close()


@pytest.fixture
def transport() -> Iterator[NodeTransport]:
    client = NodeTransport()
    yield client
    client.close()


def failure(
    transport: NodeTransport, url: str, method: str = "GET", path: str = "/api/ps", **kw
) -> NodeError:
    """The NodeError a call raises (a call that returns fails the test)."""
    with pytest.raises(NodeError) as caught:
        transport.call(url, method, path, timeout=FAST, **kw)
    return caught.value


def by_path(replies: dict[str, bytes]) -> object:
    """A behaviour answering each path with its own prepared reply (404 otherwise), keep-alive."""

    def behave(conn: socket.socket, request: Request, node: HostileNode) -> bool:
        return node.send(conn, replies.get(request.path, reply("404 Not Found", b"404 page not found")))

    return behave


# ------------------------------------------------------------------------------ 1. total deadline


def trickle_all(conn: socket.socket, request: Request, node: HostileNode) -> bool:
    node.trickle(conn, reply("200 OK", PS_EMPTY), PACE)
    return False


def trickle_body(conn: socket.socket, request: Request, node: HostileNode) -> bool:
    head, _, body = reply("200 OK", PS_EMPTY).partition(b"\r\n\r\n")
    node.send(conn, head + b"\r\n\r\n")
    node.trickle(conn, body, PACE)
    return False


@pytest.mark.parametrize("behaviour", [trickle_all, trickle_body], ids=["headers", "body"])
def test_a_trickled_reply_fails_at_the_deadline_and_the_connection_is_closed(ctl, behaviour) -> None:
    with HostileNode(behaviour) as node:
        status = ctl.get_model_status(node.url)

        assert status["reason"] == "timeout"
        assert status["error"] == f"{node.url} did not answer /api/ps within {FAST:g}s"
        wait_until(lambda: node.finished == 1, "the node sees the client hang up instead of waiting")


def test_a_trickled_load_reply_fails_at_the_deadline(transport) -> None:
    with HostileNode(trickle_all) as node:
        error = failure(transport, node.url, "POST", "/api/generate", payload={"model": "llama3.1"})
    assert error.reason == "timeout" and "did not answer /api/generate within 0.5s" in error.message


def never_answer(conn: socket.socket, request: Request, node: HostileNode) -> bool:
    node.stopping.wait()
    return False


def test_a_silent_node_is_a_timeout_in_one_phrase(transport) -> None:
    with HostileNode(never_answer) as node:
        error = failure(transport, node.url)
    assert (error.reason, error.message) == ("timeout", f"{node.url} did not answer /api/ps within 0.5s")


# ------------------------------------------------------------------------------------ 2. size caps


def declared_huge(conn: socket.socket, request: Request, node: HostileNode) -> bool:
    """Announces 100 MB and sends it for as long as the client reads."""
    node.send(conn, reply("200 OK", headers={"Content-Length": str(100 * MIB)}))
    block = b" " * MIB
    return all(node.send(conn, block) for _ in range(100)) and False


def endless_chunks(conn: socket.socket, request: Request, node: HostileNode) -> bool:
    """A chunked reply of 64 KiB chunks, 64 MiB in all unless the client stops reading first."""
    node.send(conn, reply("200 OK", headers={"Transfer-Encoding": "chunked"}))
    chunk = b"10000\r\n" + b" " * 0x10000 + b"\r\n"
    return all(node.send(conn, chunk) for _ in range(1024)) and False


@pytest.mark.parametrize("behaviour", [declared_huge, endless_chunks], ids=["content-length", "chunked"])
def test_a_reply_past_the_cap_fails_cleanly_without_being_read(ctl, behaviour) -> None:
    with HostileNode(behaviour) as node:
        status = ctl.get_model_status(node.url)

        assert status["reason"] == "error"
        assert status["error"] == f"{node.url} sent a /api/ps reply too large to read (over 1 MiB)"
        wait_until(lambda: node.finished == 1, "the client hangs up on the oversize reply")
        assert node.sent < 16 * MIB  # what socket buffers took, not the reply


def test_show_has_a_larger_cap_and_an_oversize_show_fails_the_move_cleanly(ctl) -> None:
    assert reply_limit("/api/show") > reply_limit("/api/tags") > reply_limit("/api/ps")
    assert reply_limit("/api/anything") < MAX_REPLY_BYTES["/api/show"]
    oversize = reply("200 OK", headers={"Content-Length": str(reply_limit("/api/show") + 1)})
    with HostileNode(by_path({"/api/ps": reply("200 OK", PS_ON_CPU), "/api/show": oversize})) as node:
        result = ctl.force_gpu_load(node.url, "llama3.1")
    assert result["success"] is False and result["reason"] == "error"
    assert "/api/show reply too large to read (over 32 MiB)" in result["message"]


def gzip_bomb() -> bytes:
    """64 MiB of zeros gzip-compressed to about 64 KB."""
    packer = zlib.compressobj(9, zlib.DEFLATED, 31)
    zeros = bytes(MIB)
    return b"".join(packer.compress(zeros) for _ in range(64)) + packer.flush()


def test_an_encoded_reply_is_refused_so_a_gzip_bomb_never_expands(ctl) -> None:
    bomb = reply("200 OK", gzip_bomb(), {"Content-Encoding": "gzip"})
    with HostileNode(by_path({"/api/ps": bomb})) as node:
        status = ctl.get_model_status(node.url)

    assert status["reason"] == "error"
    assert (
        status["error"]
        == f"{node.url} sent a gzip-encoded /api/ps reply; only plain (identity) replies are read"
    )
    assert ("Accept-Encoding", "identity") in node.requests[0].headers


# ------------------------------------------------------------------------------------ 3. redirects


def test_a_redirect_is_an_error_and_never_followed_for_get(ctl, sim_node) -> None:
    elsewhere = sim_node(vram_gb=24, preload=[("llama3.1", "gpu")])
    moved = reply("302 Found", headers={"Location": f"{elsewhere.url}/api/ps"})
    with HostileNode(by_path({"/api/ps": moved})) as node:
        status = ctl.get_model_status(node.url)

    assert status["models"] == [] and status["reason"] == "error"
    assert status["error"] == (
        f"{node.url} answered /api/ps with a redirect to {elsewhere.url}/api/ps; redirects are not followed"
    )
    assert elsewhere.request_log == []


def test_a_redirect_is_never_followed_for_post(transport, sim_node) -> None:
    elsewhere = sim_node(vram_gb=24)
    moved = reply("307 Temporary Redirect", headers={"Location": f"{elsewhere.url}/api/generate"})
    with HostileNode(by_path({"/api/generate": moved})) as node:
        error = failure(transport, node.url, "POST", "/api/generate", payload={"model": "llama3.1"})
    assert error.reason == "error" and "redirects are not followed" in error.message
    assert elsewhere.request_log == []


# ------------------------------------------------------------------------------------ 4. unsafe JSON

DEEP = b"[" * 100_000 + b"]" * 100_000
HUGE_NUMBER = b'{"models": [], "n": 1' + b"0" * 5000 + b"}"


@pytest.mark.parametrize(
    ("body", "words"),
    [(DEEP, "nested too deeply to read"), (HUGE_NUMBER, "with a number too long to read")],
    ids=["deep", "huge-number"],
)
def test_unsafe_json_is_an_error_dict_never_an_exception(ctl, body, words) -> None:
    with HostileNode(by_path({"/api/ps": reply("200 OK", body)})) as node:
        status = ctl.get_model_status(node.url)
    assert status["reason"] == "error" and status["models"] == []
    assert status["error"] == f"{node.url} sent a /api/ps reply {words}"


def test_deeply_nested_show_fails_the_move_cleanly(ctl) -> None:
    replies = {"/api/ps": reply("200 OK", PS_ON_CPU), "/api/show": reply("200 OK", DEEP)}
    with HostileNode(by_path(replies)) as node:
        result = ctl.force_gpu_load(node.url, "llama3.1")
    assert result["success"] is False and result["reason"] == "error"
    assert "/api/show reply nested too deeply to read" in result["message"]


# ------------------------------------------------------------------------------ 5. one-phrase causes


def test_refused_reads_as_one_phrase(transport) -> None:
    with socket.socket() as bound:  # bound, never listening: the kernel refuses connections to it
        bound.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{bound.getsockname()[1]}"
        error = failure(transport, url)
    assert (error.reason, error.message) == ("unreachable", f"{url} is unreachable (connection refused)")


def test_an_unresolvable_name_reads_as_one_phrase(ctl) -> None:
    try:
        socket.getaddrinfo("gpu1.invalid", 11434)
    except socket.gaierror:
        status = ctl.get_model_status("http://gpu1.invalid:11434")
        assert status["reason"] == "unreachable"
        assert status["error"] == "http://gpu1.invalid:11434 is unreachable (name not resolved)"
    else:
        pytest.skip("this resolver answers for .invalid (RFC 2606 says it never should)")


def plain_http_at_once(conn: socket.socket, node: HostileNode) -> None:
    """What a plain-HTTP server sends to a TLS ClientHello: an HTTP error, not a ServerHello."""
    conn.recv(4096)
    node.send(conn, reply("400 Bad Request", b"Client sent an HTTP request to an HTTPS server.\n"))


def test_a_tls_handshake_against_plain_http_reads_as_one_phrase(ctl) -> None:
    with HostileNode(never_answer, on_connect=plain_http_at_once) as node:
        url = f"https://127.0.0.1:{node.port}"
        status = ctl.get_model_status(url)
    assert status["reason"] == "unreachable"
    assert status["error"].startswith(f"{url} is unreachable (TLS handshake failed: ")
    assert status["error"].endswith(")") and "\n" not in status["error"] and "Pool(" not in status["error"]


EMFILE_SCRIPT = """
import resource, sys
from gpu_controller import GPUController
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (64, hard))
held = []
try:
    while True:
        held.append(open(sys.executable, "rb"))
except OSError:
    pass
print(GPUController(timeout=0.5).get_model_status(sys.argv[1])["error"])
"""


def test_too_many_open_files_reads_as_one_phrase_with_the_remedy() -> None:
    with HostileNode(answer("200 OK", PS_EMPTY)) as node:
        root = Path(__file__).resolve().parent.parent
        env = {**os.environ, "PYTHONPATH": str(root)}
        done = subprocess.run(
            [sys.executable, "-c", EMFILE_SCRIPT, node.url],
            capture_output=True,
            text=True,
            env=env,
            timeout=30,
        )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"cannot connect to {node.url}: too many open files (raise ulimit -n)"


# ------------------------------------------------------------------------- 6. sessions, headers, pool


def test_the_idle_check_sends_only_host_user_agent_and_accept(ctl) -> None:
    with HostileNode(answer("200 OK", PS_EMPTY)) as node:
        assert "error" not in ctl.get_model_status(node.url)
    assert (
        node.requests[0].raw
        == (
            f"GET /api/ps HTTP/1.1\r\nHost: 127.0.0.1:{node.port}\r\nAccept-Encoding: identity\r\n"
            "User-Agent: flockparse\r\nAccept: application/json\r\n\r\n"
        ).encode()
    )


def test_headers_stay_case_insensitive(transport) -> None:
    headers = transport.pool("http://127.0.0.1:1").headers
    assert isinstance(headers, CaseInsensitiveDict)
    assert headers["user-agent"] == "flockparse"


def test_proxies_from_the_environment_are_ignored(ctl, monkeypatch) -> None:
    with HostileNode(answer("200 OK", PS_EMPTY)) as proxy, HostileNode(answer("200 OK", PS_EMPTY)) as node:
        for name in ("HTTP_PROXY", "http_proxy", "ALL_PROXY"):
            monkeypatch.setenv(name, proxy.url)
        assert "error" not in ctl.get_model_status(node.url)
    assert proxy.requests == [] and len(node.requests) == 1


def test_more_than_8_concurrent_calls_keep_their_connections_without_warnings(ctl, caplog) -> None:
    concurrent = 12
    arrived = threading.Semaphore(0)
    release = threading.Event()

    def held(conn: socket.socket, request: Request, node: HostileNode) -> bool:
        arrived.release()
        release.wait()
        return node.send(conn, reply("200 OK", b'{"response": ""}'))

    def round_of_calls() -> list[int]:
        statuses: list[int] = []
        threads = [
            threading.Thread(
                target=lambda: statuses.append(ctl.call(node.url, "POST", "/api/generate", {}).status)
            )
            for _ in range(concurrent)
        ]
        release.clear()
        for thread in threads:
            thread.start()
        for _ in range(concurrent):
            assert arrived.acquire(timeout=10), "all calls in flight at once"
        release.set()
        for thread in threads:
            thread.join()
        return statuses

    caplog.set_level(logging.WARNING)
    with HostileNode(held) as node:
        assert round_of_calls() == [200] * concurrent
        assert round_of_calls() == [200] * concurrent
        assert node.accepted == concurrent  # the second round reused every connection
    assert not [r for r in caplog.records if "pool is full" in r.getMessage()]


def test_a_connection_the_node_closed_while_idle_is_replaced(transport) -> None:
    def answer_then_close(conn: socket.socket, request: Request, node: HostileNode) -> bool:
        node.send(conn, reply("200 OK", PS_EMPTY))  # keep-alive reply, then the node closes anyway
        return False

    with HostileNode(answer_then_close) as node:
        assert transport.call(node.url, "GET", "/api/ps", timeout=FAST).body == {"models": []}
        wait_until(lambda: node.finished == 1, "the node closed the idle connection")
        assert transport.call(node.url, "GET", "/api/ps", timeout=FAST).body == {"models": []}
        assert node.accepted == 2


def test_an_address_http_client_refuses_is_a_node_error_not_a_traceback() -> None:
    from gpu_controller import GPUController

    status = GPUController(timeout=1).get_model_status("http://127.0.0.1 :41265")
    assert status["reason"] == "error" and "not a usable node address" in status["error"]


def test_node_addresses_with_spaces_control_characters_or_port_0_are_refused() -> None:
    from flockparse.rules import normalize_url

    for bad in ("http://127.0.0.1 :41265", "http://a\x1b[2J:1", "127.0.0.1:0"):
        with pytest.raises(ValueError, match="invalid node URL"):
            normalize_url(bad)


def test_a_version_string_of_any_length_is_shown_short() -> None:
    import http.server
    import json as json_module

    class Long(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            body = json_module.dumps({"version": "9" * 60000}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            return

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Long)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        from gpu_controller import GPUController

        version = GPUController(timeout=2).version(f"http://127.0.0.1:{server.server_address[1]}")
    finally:
        server.shutdown()
    assert version is not None and len(version) == 40 and version.endswith("…")
