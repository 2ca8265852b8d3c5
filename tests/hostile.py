"""A small hostile HTTP server on 127.0.0.1 for the transport tests: behaviours no Ollama has.

The simulator (ollama_sim.py) stays faithful to Ollama; what a broken or malicious node does (trickling
bytes, endless or oversized replies, gzip bombs, redirects, pathological JSON) lives here instead.
A behaviour is a function `(conn, request, node) -> bool` that writes the reply itself and returns whether
the connection may serve another request (keep-alive).
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class Request:
    """One request as it arrived: method, path, header lines in order and the exact bytes."""

    method: str
    path: str
    headers: list[tuple[str, str]]
    raw: bytes
    body: bytes = b""


Behaviour = Callable[[socket.socket, Request, "HostileNode"], bool]


@dataclass
class HostileNode:
    """A threaded TCP server speaking just enough HTTP/1.1 to misbehave on purpose."""

    behaviour: Behaviour
    on_connect: Callable[[socket.socket, HostileNode], None] | None = None  # replaces reading requests
    host: str = "127.0.0.1"
    requests: list[Request] = field(default_factory=list)
    accepted: int = 0  # connections accepted
    finished: int = 0  # connections whose handler ended (the client went away or the reply was done)
    sent: int = 0  # bytes written by `send`, all connections
    errors: list[OSError] = field(default_factory=list)  # how connections ended, when not cleanly
    stopping: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self._listener = socket.create_server((self.host, 0))
        self.port = self._listener.getsockname()[1]
        self.url = f"http://{self.host}:{self.port}"
        self._lock = threading.Lock()
        self._conns: list[socket.socket] = []

    def __enter__(self) -> HostileNode:
        threading.Thread(target=self._accept, name="hostile-accept", daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()
        self._listener.close()
        with self._lock:
            conns = list(self._conns)
        for conn in conns:
            conn.close()

    def send(self, conn: socket.socket, data: bytes) -> bool:
        """Write `data`; False once the client has gone (the behaviour should then stop)."""
        try:
            conn.sendall(data)
        except OSError:
            return False
        with self._lock:
            self.sent += len(data)
        return True

    def trickle(self, conn: socket.socket, data: bytes, pause: float) -> bool:
        """One byte every `pause` seconds (each well inside a read timeout); False once the client left."""
        for index in range(len(data)):
            if self.stopping.wait(pause) or not self.send(conn, data[index : index + 1]):
                return False
        return True

    def _accept(self) -> None:
        while not self.stopping.is_set():
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                self.accepted += 1
                self._conns.append(conn)
            threading.Thread(target=self._serve, args=(conn,), name="hostile-conn", daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            if self.on_connect is not None:
                self.on_connect(conn, self)
                return
            reader = conn.makefile("rb")
            while (request := _read_request(reader)) is not None:
                with self._lock:
                    self.requests.append(request)
                if not self.behaviour(conn, request, self):
                    break
        except OSError as exc:  # the client closed or reset the connection: this handler ends
            with self._lock:
                self.errors.append(exc)
        finally:
            conn.close()
            with self._lock:
                self.finished += 1


def _read_request(reader) -> Request | None:  # noqa: ANN001 (a socket file)
    """One request head (and a Content-Length body); None at end of stream or for non-HTTP bytes."""
    raw = reader.readline(65536)
    parts = raw.split()
    if len(parts) != 3 or not parts[2].startswith(b"HTTP/"):
        return None
    headers: list[tuple[str, str]] = []
    while (line := reader.readline(65536)) not in (b"\r\n", b"\n", b""):
        raw += line
        name, _, value = line.decode("latin-1").partition(":")
        headers.append((name.strip(), value.strip()))
    raw += b"\r\n"
    length = next((int(v) for n, v in headers if n.lower() == "content-length"), 0)
    body = reader.read(length) if length else b""
    return Request(parts[0].decode(), parts[1].decode(), headers, raw, body)


def reply(status: str, body: bytes = b"", headers: dict[str, str] | None = None) -> bytes:
    """A complete HTTP/1.1 reply with a Content-Length (unless the headers give a Transfer-Encoding)."""
    lines = [f"HTTP/1.1 {status}"]
    fields = {"Content-Type": "application/json", **(headers or {})}
    if "Transfer-Encoding" not in fields:
        fields.setdefault("Content-Length", str(len(body)))
    lines += [f"{name}: {value}" for name, value in fields.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def answer(status: str, body: bytes = b"", headers: dict[str, str] | None = None) -> Behaviour:
    """A behaviour that sends the same reply to every request and keeps the connection."""
    data = reply(status, body, headers)
    return lambda conn, request, node: node.send(conn, data)
