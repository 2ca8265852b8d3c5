"""ControlClient: the HTTP client of a serve's control API (the console attached with --connect, and the
probe of a local console that looks for a serve before it starts an optimizer).

It follows the node transport's rules (flockparse/transport.py) for a peer we do not control, with the
standard library's http.client as the transport does: a TOTAL deadline per call (every socket read gets only
the time left, so a reply trickled byte by byte ends at the deadline; requests bounds each read, not the
call), replies read up to a cap, redirects never followed, failures as one line (`RemoteError`). One
connection per call: the control API is called a few times a second at most. The event stream's reader
(flockparse/remote.py) uses the same connection with an idle deadline pushed forward at every line.
"""

from __future__ import annotations

import http.client
import json
import logging
import socket
import ssl
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode, urlsplit

from flockparse.transport import DeadlineSocket, DeadlineSSLSocket, describe, time_left, wrap_tls

logger = logging.getLogger(__name__)

API_PREFIX = "/flockparse/v1"
DEFAULT_SERVE_PORT = 11435
TOKEN_ENV = "FLOCKPARSE_TOKEN"
EVENT_SEQ_HEADER = "X-Flockparse-Event-Seq"  # the newest event emitted when a reply was built
INSTANCE_HEADER = "X-Flockparse-Instance"  # which run of the serve answered (a restart changes it)
KIB, MIB = 1024, 1024 * 1024
MAX_REPLY_BYTES = 64 * MIB  # a vram_report of thousands of nodes is megabytes; anything past this is refused
READ_CHUNK = 64 * KIB
USER_AGENT = "flockparse-console"


class RemoteError(RuntimeError):
    """The serve could not be reached, refused us, or failed; the message is one line for the user."""


class RemoteRejected(RemoteError, ValueError):
    """The serve refused the request itself (400, 404, 409: a model or node it does not know, a bad
    value); a ValueError like the balancer's own, so the console treats both alike."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


class RemoteAuthError(RemoteError):
    """401: no token, or not the serve's."""


class RemoteTimeout(RemoteError):
    """The serve did not answer within the call's deadline."""


def serve_url(raw: str) -> str:
    """`host`, `host:port` or `http(s)://host[:port]` -> `http://host:port` (11435 when no port and no
    scheme is given); ValueError with one line for anything else (credentials, a path, a query)."""
    text = str(raw).strip()
    if not text or any(ch.isspace() or not ch.isprintable() for ch in text):
        raise ValueError(f"not a serve address: {text!r} (e.g. http://127.0.0.1:{DEFAULT_SERVE_PORT})")
    with_scheme = "://" in text
    try:
        parts = urlsplit(text if with_scheme else f"http://{text}")
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"not a serve address: {text} ({exc})") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"not a serve address: {text} (http://HOST:PORT)")
    if parts.username or parts.password:
        raise ValueError("a serve address with credentials is not supported: pass --token instead")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(f"a serve address is http(s)://HOST:PORT, without a path: {text}")
    if port is None:
        port = DEFAULT_SERVE_PORT if not with_scheme else (443 if parts.scheme == "https" else 80)
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return f"{parts.scheme}://{host}:{port}"


# ------------------------------------------------------------------------------------ deadline sockets


class Connection(http.client.HTTPConnection):
    """One connection per call (the control API is called rarely); its socket obeys `deadline`."""

    def __init__(self, host: str, port: int, deadline: float, tls: ssl.SSLContext | None) -> None:
        super().__init__(host, port)
        self.deadline, self.tls = deadline, tls
        # kept past http.client's close(): a reply read until the connection closes keeps reading from it
        self.stream_socket: socket.socket | None = None

    def connect(self) -> None:
        raw = socket.create_connection((self.host, self.port), timeout=time_left(self.deadline))
        sock: socket.socket = DeadlineSocket(raw.family, raw.type, raw.proto, fileno=raw.detach())
        sock.deadline = self.deadline  # type: ignore[attr-defined]
        sock.settimeout(time_left(self.deadline))  # sending is bounded by the deadline too
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = self.stream_socket = wrap_tls(sock, self.tls, self.host, self.deadline)

    def push_deadline(self, deadline: float) -> None:
        """The event stream: each line read gets a fresh idle deadline."""
        self.deadline = deadline
        if self.stream_socket is not None:
            self.stream_socket.deadline = deadline  # type: ignore[attr-defined]

    def shut(self) -> None:
        """End a blocked read from another thread (close() alone does not wake it)."""
        if self.stream_socket is not None:
            try:
                self.stream_socket.shutdown(socket.SHUT_RDWR)
            except OSError:
                logger.debug("the event stream was already closed", exc_info=True)


@dataclass
class Answer:
    """A 2xx reply: its JSON and the event position it was built at (see EVENT_SEQ_HEADER)."""

    data: Any
    event_seq: int | None = None
    instance: str | None = None


class ControlClient:
    """JSON calls to a serve's control API: a total deadline, a reply cap, no redirect, one-line errors."""

    def __init__(self, url: str, token: str | None = None, timeout: float = 5.0) -> None:
        self.url = serve_url(url)
        parts = urlsplit(self.url)
        self.host, self.port = str(parts.hostname), int(parts.port or DEFAULT_SERVE_PORT)
        self.token = token or None
        self.timeout = float(timeout)
        self._tls = _tls_context() if parts.scheme == "https" else None

    def headers(self) -> dict[str, str]:
        headers = {"User-Agent": USER_AGENT, "Accept": "application/json", "Accept-Encoding": "identity"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        return headers

    def connection(self, deadline: float) -> Connection:
        return Connection(self.host, self.port, deadline, self._tls)

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        query: Iterable[tuple[str, str]] = (),
        timeout: float | None = None,
    ) -> Answer:
        """One call; its Answer within `timeout` seconds in total, else a RemoteError subclass."""
        limit = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + limit
        target = API_PREFIX + path + (f"?{urlencode(list(query))}" if query else "")
        payload = None if body is None else json.dumps(body).encode()
        headers = self.headers()
        if payload is not None:
            headers["Content-Type"] = "application/json"
        conn = self.connection(deadline)
        connected = False
        try:
            conn.connect()
            connected = True
            conn.request(method, target, payload, headers)
            response = conn.getresponse()
            raw = read_capped(response, MAX_REPLY_BYTES)
            return self._answer(response, raw, path)
        except RemoteError:
            raise
        except (OSError, http.client.HTTPException, ValueError) as exc:
            raise self._failure(path, limit, exc, connected, deadline) from None
        finally:
            conn.close()

    def _answer(self, response: http.client.HTTPResponse, raw: bytes, path: str) -> Answer:
        status = response.status
        if 300 <= status < 400:
            where = response.getheader("Location") or "nowhere"
            raise RemoteError(f"the serve at {self.url} redirected {path} to {where}: not followed")
        data = parse_json(raw)
        if status >= 400:
            raise self.refusal(status, data, raw, path)
        if data is NOT_JSON:
            raise RemoteError(f"the serve at {self.url} sent a {path} reply that is not JSON")
        seq = response.getheader(EVENT_SEQ_HEADER)
        return Answer(data, int(seq) if seq and seq.isdigit() else None, response.getheader(INSTANCE_HEADER))

    def refusal(self, status: int, data: Any, raw: bytes, path: str) -> RemoteError:
        text = data.get("error") if isinstance(data, dict) else None
        if not isinstance(text, str) or not text:
            text = raw.decode("utf-8", "replace").strip().splitlines()[0][:200] if raw.strip() else ""
            text = text or f"HTTP {status}"
        if status == 401:
            if self.token:
                return RemoteAuthError(f"the serve at {self.url} refused the token (--token, ${TOKEN_ENV})")
            return RemoteAuthError(f"the serve at {self.url} wants a token: pass --token or set ${TOKEN_ENV}")
        if status in (400, 404, 405, 409, 413, 422):
            return RemoteRejected(text, status)
        return RemoteError(f"the serve at {self.url} failed on {path} (HTTP {status}): {text}")

    def _failure(
        self, path: str, limit: float, exc: BaseException, connected: bool, deadline: float
    ) -> RemoteError:
        if isinstance(exc, TimeoutError) or time.monotonic() >= deadline:
            if not connected:
                return RemoteTimeout(f"the serve at {self.url} did not accept a connection within {limit:g}s")
            return RemoteTimeout(f"the serve at {self.url} did not answer {path} within {limit:g}s")
        _, phrase = describe(exc, connected)
        if not connected:
            return RemoteError(f"cannot reach the serve at {self.url}: {phrase}")
        return RemoteError(f"the serve at {self.url}: {path} failed ({phrase})")


NOT_JSON = object()


def parse_json(raw: bytes) -> Any:
    """JSON, or NOT_JSON (an empty body, text, JSON too deep or with numbers too long to read)."""
    try:
        return json.loads(raw.decode("utf-8", "replace")) if raw.strip() else NOT_JSON
    except (ValueError, RecursionError):
        return NOT_JSON


def read_capped(response: http.client.HTTPResponse, limit: int) -> bytes:
    """The whole body, never more than `limit` bytes read (a declared larger size is not read at all)."""
    if response.length is not None and response.length > limit:
        raise RemoteError(f"the serve sent a reply too large to read (over {limit // MIB} MiB)")
    parts: list[bytes] = []
    total = 0
    while part := response.read(READ_CHUNK):
        total += len(part)
        if total > limit:
            raise RemoteError(f"the serve sent a reply too large to read (over {limit // MIB} MiB)")
        parts.append(part)
    return b"".join(parts)


_TLS: ssl.SSLContext | None = None


def _tls_context() -> ssl.SSLContext:
    global _TLS
    if _TLS is None:
        context = ssl.create_default_context()
        context.sslsocket_class = DeadlineSSLSocket
        _TLS = context
    return _TLS
