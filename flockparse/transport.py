"""The node transport: every HTTP request to an Ollama node, safe against hostile or broken nodes.

Why not `requests.Session.request` here: a node is a peer we do not control, and requests (a) bounds each
socket read, not the call, so a node trickling one byte at a time holds a thread forever, (b) buffers any
reply size, (c) follows redirects, also for POSTs and across hosts, and (d) costs about 0.6 ms of CPU per
call, which at 5,000 nodes every 5 s is most of a core. So each node gets a small pool of standard-library
`http.client` connections (what requests stands on, one level further down) with:

- a TOTAL deadline per call: every `recv` sets the socket timeout to the time left and fails once it is
  gone, so headers or a body trickled byte by byte end at the deadline and no thread stays blocked past it
  (name resolution excepted: `getaddrinfo` cannot be interrupted; the system resolver bounds it);
- a size cap per path (`MAX_REPLY_BYTES`), checked on Content-Length before reading and while reading
  chunked or close-delimited bodies, read 64 KiB at a time;
- `Accept-Encoding: identity` (what requests sent here too) and any other Content-Encoding refused: Ollama
  never compresses, so decoding would only serve a hostile node, and refusing makes a gzip bomb cost nothing;
- no redirects: a 3xx is an error naming where it pointed;
- JSON that cannot be read safely (nested past the recursion limit, integers past Python's digit limit)
  is an error of that call, never an exception escaping the caller;
- one-phrase causes (`connection refused`, `name not resolved`, `TLS handshake failed: ...`,
  `too many open files (raise ulimit -n)`), never a library's repr cut off mid-word.

The hot path (issue 8, scale): a GET over plain http (every health check's /api/ps) is not sent through
http.client but written as one prebuilt request and read by `_fast_get`, a small HTTP/1.1 reader with the
same rules (deadline, cap, no redirect, identity only, chunked or Content-Length or until close). On a
2-core test machine http.client costs about 210 us of client CPU per /api/ps exchange, its header parser
(the email package) alone 45 us, against about 55 us for the bare socket exchange; the check must fit in
250 us all in at 5,000 nodes every 5 s (bench/scale.py). POSTs and https keep http.client.
"""

from __future__ import annotations

import errno
import http.client
import json
import select
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import urlsplit

from requests.structures import CaseInsensitiveDict
from requests.utils import DEFAULT_CA_BUNDLE_PATH

USER_AGENT = "flockparse"
KIB = 1024
MIB = 1024 * KIB
MIN_CLOCK_SKEW = timedelta(seconds=2)  # smaller skews are within the Date header's 1 s resolution
READ_CHUNK = 64 * KIB  # bodies without a Content-Length are read this much at a time
MAX_IDLE_PER_NODE = 32  # idle connections kept per node; more concurrent calls open (then close) extra ones

# What is read from a node at most, by path. Sized from Ollama's replies with room to spare:
# /api/ps lists loaded models (~0.5 KB each); /api/tags every installed model (~0.5 KB each, a few
# thousand fit); /api/show without `verbose` is a few hundred KB at most (license, template, parameters),
# with verbose tensors and tokenizer arrays ~10-20 MB, hence 32 MiB; loads and routed /api/generate and
# /api/chat replies are text; /api/embed carries many vectors (1,000 inputs x 4,096 dims ~ 80 MB as JSON
# would not fit: such callers must batch). Anything else gets DEFAULT_MAX_BYTES.
MAX_REPLY_BYTES = {
    "/api/ps": 1 * MIB,
    "/api/version": 64 * KIB,
    "/api/tags": 8 * MIB,
    "/api/show": 32 * MIB,
    "/api/generate": 16 * MIB,
    "/api/chat": 16 * MIB,
    "/api/embed": 64 * MIB,
    "/api/embeddings": 16 * MIB,
}
DEFAULT_MAX_BYTES = 4 * MIB
MAX_HEAD_BYTES = 64 * KIB  # status line and headers of one reply, at most (http.client: 64 KiB a line)
MAX_HEADERS = 100  # as http.client
_UNSAFE_IN_TARGET = frozenset(" \r\n\t\x00")


class NodeError(Exception):
    """A call that got no usable answer. `reason` is one of the result reasons."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


@dataclass
class Reply:
    """One HTTP reply from a node, its body already parsed when it was JSON."""

    status: int
    body: Any  # parsed JSON, or None when the body was not JSON
    text: str
    clock_offset: timedelta = timedelta(0)  # node clock minus ours, from its Date header
    date: str | None = None  # that Date header as sent

    def error_text(self) -> str:
        """Ollama's `{"error": ...}` text, or the start of the raw body."""
        if isinstance(self.body, dict) and isinstance(self.body.get("error"), str):
            return self.body["error"]
        return self.text.strip()[:200] or f"HTTP {self.status}"


def reply_limit(path: str) -> int:
    """The most bytes read from a node's reply to `path` (query string ignored)."""
    return MAX_REPLY_BYTES.get(path.split("?", 1)[0], DEFAULT_MAX_BYTES)


# ----------------------------------------------------------------------------------- deadline sockets


def time_left(deadline: float) -> float:
    """Seconds before `deadline`; raises TimeoutError once it has passed (ends a trickled read)."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("deadline passed")
    return left


class DeadlineSocket(socket.socket):
    """A socket whose every read may only take the time left before the call's deadline.

    http.client reads through `socket.makefile`, whose `readinto` calls `recv_into`: bounding that one
    method bounds the status line, the headers and the body, however the node trickles them.
    """

    __slots__ = ("deadline",)

    def recv_into(self, buffer: Any, nbytes: int = 0, flags: int = 0) -> int:
        self.settimeout(time_left(self.deadline))
        return super().recv_into(buffer, nbytes, flags)


class DeadlineSSLSocket(ssl.SSLSocket):
    """The same bound for https nodes (an SSLContext builds its sockets from `sslsocket_class`)."""

    deadline = float("inf")

    def recv_into(self, buffer: Any, nbytes: int | None = None, flags: int = 0) -> int:
        self.settimeout(time_left(self.deadline))
        return super().recv_into(buffer, nbytes, flags)


def _open_socket(host: str, port: int, deadline: float, connect_timeout: float) -> DeadlineSocket:
    """Connect to the first address of `host` that accepts, within the connect timeout and the deadline."""
    last: OSError | None = None
    for family, kind, proto, _, address in socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM):
        sock = DeadlineSocket(family, kind, proto)
        sock.deadline = deadline
        try:
            sock.settimeout(min(connect_timeout, time_left(deadline)))
            sock.connect(address)
        except OSError as exc:
            sock.close()
            last = exc
            if isinstance(exc, TimeoutError):
                raise
            continue
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock
    raise last if last is not None else OSError(errno.EADDRNOTAVAIL, "no address to connect to")


class _Connection(http.client.HTTPConnection):
    """One keep-alive connection to a node; `deadline` and `connect_timeout` are set per call."""

    def __init__(self, host: str, port: int, tls: ssl.SSLContext | None) -> None:
        super().__init__(host, port)
        self.tls = tls
        self.deadline = float("inf")
        self.connect_timeout = 5.0

    def connect(self) -> None:
        sock: socket.socket = _open_socket(self.host, self.port, self.deadline, self.connect_timeout)
        self.sock = wrap_tls(sock, self.tls, self.host, self.deadline)

    def arm(self, deadline: float, connect_timeout: float) -> None:
        """Give this call's deadline to the connection and its socket (sending is bounded by it too)."""
        self.deadline, self.connect_timeout = deadline, connect_timeout
        if self.sock is not None:
            self.sock.deadline = deadline
            self.sock.settimeout(time_left(deadline))


def wrap_tls(sock: socket.socket, tls: ssl.SSLContext | None, host: str, deadline: float) -> socket.socket:
    """The socket itself for plain http; else wrapped (closed when the handshake fails), the deadline kept."""
    if tls is None:
        return sock
    try:
        wrapped = tls.wrap_socket(sock, server_hostname=host)
    except BaseException:
        sock.close()
        raise
    wrapped.deadline = deadline  # type: ignore[attr-defined]
    return wrapped


def _dropped(sock: socket.socket) -> bool:
    """An idle keep-alive connection that is readable was closed by the node (or sent junk): not reusable.

    poll, not select: select fails past descriptor 1024, and a 5,000-node cluster has more.
    """
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    return bool(poller.poll(0))


# ------------------------------------------------------------------------------------------ node pool


class NodePool:
    """One node's connections: reused LIFO, at most MAX_IDLE_PER_NODE kept idle, any number in use.

    Never blocks a caller waiting for a connection (routed requests must not queue behind a load), and
    never warns: a call beyond the idle cap closes its connection when done.
    """

    def __init__(
        self, node_url: str, max_idle: int = MAX_IDLE_PER_NODE, tls: ssl.SSLContext | None = None
    ) -> None:
        try:
            parts = urlsplit(node_url)
            port = parts.port
        except ValueError:
            raise NodeError("error", f"{node_url}: not an http(s) node address") from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise NodeError("error", f"{node_url}: not an http(s) node address")
        self.url = node_url
        self.host = parts.hostname
        self.port = port or (443 if parts.scheme == "https" else 80)
        self.prefix = parts.path.rstrip("/")
        self.tls = tls if parts.scheme == "https" else None
        # Only what Ollama needs: the health check runs every few seconds on every node. http.client adds
        # Host and `Accept-Encoding: identity`, which is also what requests sent.
        self.headers: CaseInsensitiveDict = CaseInsensitiveDict(
            {"User-Agent": USER_AGENT, "Accept": "application/json"}
        )
        host_header = f"[{self.host}]" if ":" in self.host else self.host
        default_port = 443 if parts.scheme == "https" else 80
        self.host_header = host_header if self.port == default_port else f"{host_header}:{self.port}"
        self.max_idle = max_idle
        self.opened = 0  # connections opened so far (tests check reuse with it)
        self._idle: list[_Connection] = []
        self._lock = threading.Lock()
        self._closed = False

    def take(self, fresh: bool = False) -> tuple[_Connection, bool]:
        """An idle connection still open (True), else (or when `fresh`) a new unconnected one (False)."""
        while True:
            with self._lock:
                conn = self._idle.pop() if self._idle and not fresh else None
                if conn is None:
                    self.opened += 1
            if conn is None:
                return _Connection(self.host, self.port, self.tls), False
            if conn.sock is not None and not _dropped(conn.sock):
                return conn, True
            conn.close()

    def give_back(self, conn: _Connection) -> None:
        with self._lock:
            if not self._closed and conn.sock is not None and len(self._idle) < self.max_idle:
                self._idle.append(conn)
                return
        conn.close()

    def close(self) -> None:
        with self._lock:
            self._closed, idle, self._idle = True, self._idle, []
        for conn in idle:
            conn.close()


# ------------------------------------------------------------------------------------------ transport


class NodeTransport:
    """Every request to every node: one NodePool per node URL, thread-safe, never raises but NodeError."""

    def __init__(self, max_idle_per_node: int = MAX_IDLE_PER_NODE) -> None:
        self.max_idle_per_node = max_idle_per_node
        self._pools: dict[str, NodePool] = {}
        self._lock = threading.Lock()
        self._tls: ssl.SSLContext | None = None

    def pool(self, node_url: str) -> NodePool:
        """The node's pool, made on first use (NodeError for an address that is not http(s))."""
        pool = self._pools.get(node_url)
        if pool is None:
            tls = self._tls_context() if node_url.lower().startswith("https:") else None
            with self._lock:
                pool = self._pools.get(node_url)
                if pool is None:
                    pool = self._pools[node_url] = NodePool(node_url, self.max_idle_per_node, tls)
        return pool

    def _tls_context(self) -> ssl.SSLContext:
        """Verified like requests (its CA bundle); built once: loading CAs costs milliseconds."""
        if self._tls is None:
            context = ssl.create_default_context(cafile=DEFAULT_CA_BUNDLE_PATH)
            context.sslsocket_class = DeadlineSSLSocket
            self._tls = context
        return self._tls

    def forget(self, node_url: str) -> None:
        """Close one node's connections (calls in flight finish, then close theirs)."""
        with self._lock:
            pool = self._pools.pop(node_url, None)
        if pool is not None:
            pool.close()

    def close(self) -> None:
        """Close every node's connections; the transport can still be used afterwards."""
        with self._lock:
            pools, self._pools = list(self._pools.values()), {}
        for pool in pools:
            pool.close()

    def call(
        self,
        node_url: str,
        method: str,
        path: str,
        payload: Any = None,
        timeout: float = 5.0,
        connect_timeout: float | None = None,
        max_bytes: int | None = None,
    ) -> Reply:
        """One request; the reply within `timeout` seconds IN TOTAL, or NodeError (reason and one line).

        `connect_timeout` bounds connecting alone (never past the deadline). `payload` is sent as JSON.
        A GET that fails on a reused connection before any reply byte is sent once more on a new one
        (the node closed it while idle); a POST never is (a load must not be sent twice).
        """
        deadline = time.monotonic() + timeout
        pool = self.pool(node_url)
        limit = reply_limit(path) if max_bytes is None else max_bytes
        wait = timeout if connect_timeout is None else min(connect_timeout, timeout)
        body = None if payload is None else json.dumps(payload).encode()
        headers: Any = pool.headers
        if body is not None:
            headers = {**pool.headers, "Content-Type": "application/json"}
        retried = False
        while True:
            try:
                conn, reused = pool.take(fresh=retried)
            except (http.client.HTTPException, ValueError) as exc:  # an address http.client refuses
                raise NodeError("error", f"{node_url}: not a usable node address ({exc})") from exc
            try:
                return self._exchange(pool, conn, method, path, body, headers, deadline, wait, limit)
            except NodeError:
                conn.close()
                raise
            except _ConnectFailed as failed:
                conn.close()
                cause, connected = failed.__cause__, False
            except _Stale as stale:
                conn.close()
                if reused and method == "GET" and not retried:
                    retried = True
                    continue
                cause, connected = stale.__cause__, True
            except (OSError, http.client.HTTPException, ValueError) as exc:
                conn.close()
                cause, connected = exc, True
            assert cause is not None
            raise call_failure(
                node_url, path, timeout if connected else wait, cause, connected, deadline
            ) from cause

    def _exchange(
        self,
        pool: NodePool,
        conn: _Connection,
        method: str,
        path: str,
        body: bytes | None,
        headers: Any,
        deadline: float,
        connect_timeout: float,
        limit: int,
    ) -> Reply:
        """Send, then read the reply under the deadline and the cap; the connection goes back when clean."""
        conn.arm(deadline, connect_timeout)
        if conn.sock is None:
            try:
                conn.connect()
            except OSError as exc:
                raise _ConnectFailed() from exc
        target = pool.prefix + path
        node = pool.url
        if method == "GET" and body is None and conn.tls is None and _UNSAFE_IN_TARGET.isdisjoint(target):
            request = request_head(method, target, pool.host_header, headers)
            status, fields, raw, reusable = _fast_get(conn.sock, request, deadline, limit, node, path)
            refuse_redirect_or_encoding(
                node, path, status, fields.get("location"), fields.get("content-encoding")
            )
            if reusable:
                pool.give_back(conn)
            else:
                conn.close()
            text = raw.decode("utf-8", "replace")
            date = fields.get("date")
            return Reply(status, parse_json(text, node, path), text, clock_offset(date), date)
        try:
            conn.request(method, target, body, headers)
            response = conn.getresponse()
        except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError) as exc:
            raise _Stale() from exc
        refuse_redirect_or_encoding(
            node,
            path,
            response.status,
            response.getheader("Location"),
            response.getheader("Content-Encoding"),
        )
        raw = _read_body(response, limit, node, path)
        date = response.getheader("Date")
        if response.isclosed() and not response.will_close:
            pool.give_back(conn)
        else:
            conn.close()
        text = raw.decode("utf-8", "replace")
        return Reply(response.status, parse_json(text, node, path), text, clock_offset(date), date)


def refuse_redirect_or_encoding(
    node: str, path: str, status: int, location: str | None, encoding: str | None
) -> None:
    """Never follow a redirect; never decode a compressed reply (see the module docstring)."""
    if 300 <= status < 400:
        where = location or "nowhere"
        raise NodeError(
            "error", f"{node} answered {path} with a redirect to {where[:200]}; redirects are not followed"
        )
    encoding = (encoding or "identity").strip().lower()
    if encoding != "identity":
        raise NodeError(
            "error",
            f"{node} sent a {encoding[:40]}-encoded {path} reply; only plain (identity) replies are read",
        )


# ------------------------------------------------------------------------------- the hot GET path


def request_head(method: str, target: str, host: str, headers: Any) -> bytes:
    """The request as http.client would send it for a GET without body (Host, our headers, identity)."""
    lines = [f"{method} {target} HTTP/1.1", f"Host: {host}", "Accept-Encoding: identity"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    text = "\r\n".join(lines) + "\r\n\r\n"
    if any(ch in text[:-4] for ch in "\x00") or text.count("\r\n\r\n") != 1:
        raise NodeError("error", "a request header holds a line break or NUL")
    return text.encode("latin-1")


class ReplyParser:
    """One HTTP/1.1 reply, parsed as its bytes arrive: status, lower-case headers and body.

    Fed by `_fast_get` (a blocking loop under a deadline) and by the status poller (flockparse/poller.py,
    non-blocking sockets): one set of rules for both. `feed` returns True once the reply is complete;
    `closed` says the node closed the connection (completes a body delimited by the close, else raises).
    Raises http.client's exceptions for what is not HTTP (phrased by `describe`) and NodeError past the cap.
    """

    __slots__ = ("body", "fields", "keep_alive", "limit", "node", "path", "status", "_buf", "_chunks",
                 "_mode", "_need", "_total")  # fmt: skip

    def __init__(self, limit: int, node: str, path: str) -> None:
        self.limit, self.node, self.path = limit, node, path
        self.status = 0
        self.fields: dict[str, str] = {}
        self.body = b""
        self.keep_alive = False
        self._buf = b""
        self._mode = "head"  # head, length, chunk-size, chunk-data, chunk-end, trailers, close, done
        self._need = 0
        self._chunks: list[bytes] = []
        self._total = 0

    @property
    def done(self) -> bool:
        return self._mode == "done"

    @property
    def started(self) -> bool:
        """Some byte of the reply arrived (a connection closed before that may just have expired)."""
        return bool(self._buf) or self._mode != "head"

    @property
    def reusable(self) -> bool:
        """Complete, keep-alive, and nothing unasked-for after it."""
        return self._mode == "done" and self.keep_alive and not self._buf

    def feed(self, data: bytes) -> bool:
        self._buf += data
        while self._mode != "done":
            if not getattr(self, "_step_" + self._mode.replace("-", "_"))():
                break
        return self._mode == "done"

    def closed(self) -> None:
        """The node closed the connection: the end of a close-delimited body, or a reply cut short."""
        if self._mode == "close":
            self.body, self._buf, self._mode = self._buf, b"", "done"
        elif self._mode != "done":
            raise http.client.IncompleteRead(self._buf)

    # each step consumes what it can; False when it needs more bytes
    def _step_head(self) -> bool:
        end = self._buf.find(b"\r\n\r\n")
        if end < 0:
            if not b"HTTP/1.".startswith(self._buf[:7]):  # garbage is told at once, not at the deadline
                raise http.client.BadStatusLine(self._buf[:80].decode("latin-1"))
            if len(self._buf) > MAX_HEAD_BYTES:
                raise http.client.LineTooLong("reply headers")
            return False
        if end > MAX_HEAD_BYTES:
            raise http.client.LineTooLong("reply headers")
        head, self._buf = self._buf[:end], self._buf[end + 4 :]
        status_line, *lines = head.split(b"\r\n")
        self._status_line(status_line)
        if len(lines) > MAX_HEADERS:
            raise http.client.HTTPException(f"got more than {MAX_HEADERS} headers")
        for line in lines:
            name, colon, value = line.partition(b":")
            if not colon or not name or name != name.strip():
                raise http.client.HTTPException("a malformed header line")
            key = name.decode("latin-1").lower()
            text = value.strip().decode("latin-1")
            if key == "content-length" and key in self.fields and self.fields[key] != text:
                raise http.client.HTTPException("two different Content-Length headers")
            self.fields[key] = text
        self._body_mode()
        return True

    def _status_line(self, line: bytes) -> None:
        version, _, rest = line.partition(b" ")
        code = rest[:3]
        if (
            not version.startswith(b"HTTP/1.")
            or len(code) != 3
            or not code.isdigit()
            or rest[3:4]
            not in (
                b"",
                b" ",
            )
        ):
            raise http.client.BadStatusLine(line[:80].decode("latin-1"))
        self.status = int(code)
        if self.status < 200:
            raise http.client.BadStatusLine("an informational (1xx) reply to a GET")
        self.keep_alive = version == b"HTTP/1.1"

    def _body_mode(self) -> None:
        fields = self.fields
        self.keep_alive = self.keep_alive and "close" not in fields.get("connection", "").lower()
        if "chunked" in fields.get("transfer-encoding", "").lower():
            self._mode = "chunk-size"
        elif "content-length" in fields:
            if not fields["content-length"].isdigit():
                raise http.client.HTTPException("a Content-Length that is not a number")
            self._need = int(fields["content-length"])
            if self._need > self.limit:
                raise _too_large(self.node, self.path, self.limit)
            self._mode = "length"
        elif self.status in (204, 304):
            self._mode = "done"
        else:  # delimited by the close
            self.keep_alive = False
            self._mode = "close"

    def _step_length(self) -> bool:
        if len(self._buf) < self._need:
            return False
        self.body, self._buf = self._buf[: self._need], self._buf[self._need :]
        self._mode = "done"
        return True

    def _step_close(self) -> bool:
        if len(self._buf) > self.limit:
            raise _too_large(self.node, self.path, self.limit)
        return False

    def _line(self, limit: int) -> bytes | None:
        end = self._buf.find(b"\r\n")
        if end < 0:
            if len(self._buf) > limit:
                raise http.client.LineTooLong("reply line")
            return None
        line, self._buf = self._buf[:end], self._buf[end + 2 :]
        return line

    def _step_chunk_size(self) -> bool:
        line = self._line(1024)
        if line is None:
            return False
        try:
            size = int(line.split(b";", 1)[0].strip(), 16)
        except ValueError:
            raise http.client.HTTPException("a malformed chunk size") from None
        if size < 0:
            raise http.client.HTTPException("a malformed chunk size")
        if size == 0:
            self._mode = "trailers"
            return True
        self._total += size
        if self._total > self.limit:
            raise _too_large(self.node, self.path, self.limit)
        self._need, self._mode = size, "chunk-data"
        return True

    def _step_chunk_data(self) -> bool:
        if len(self._buf) < self._need:
            return False
        self._chunks.append(self._buf[: self._need])
        self._buf, self._mode = self._buf[self._need :], "chunk-end"
        return True

    def _step_chunk_end(self) -> bool:
        if len(self._buf) < 2:
            return False
        if self._buf[:2] != b"\r\n":
            raise http.client.HTTPException("a chunk not followed by CRLF")
        self._buf, self._mode = self._buf[2:], "chunk-size"
        return True

    def _step_trailers(self) -> bool:
        while (line := self._line(MAX_HEAD_BYTES)) is not None:
            if not line:
                self.body, self._chunks, self._mode = b"".join(self._chunks), [], "done"
                return True
        return False


def _fast_get(
    sock: socket.socket, request: bytes, deadline: float, limit: int, node: str, path: str
) -> tuple[int, dict[str, str], bytes, bool]:
    """Send `request` and read one reply: (status, lower-case headers, body, connection reusable).

    Raises _Stale when the node closed the connection before any reply byte (an idle keep-alive expired),
    http.client's exceptions for replies that are not HTTP (phrased by `describe`), TimeoutError at the
    deadline and NodeError past the cap.
    """
    parser = ReplyParser(limit, node, path)
    try:
        sock.settimeout(time_left(deadline))
        sock.sendall(request)
        data = socket.socket.recv(sock, READ_CHUNK)
    except (ConnectionResetError, BrokenPipeError) as exc:
        raise _Stale() from exc
    if not data:
        raise _Stale() from http.client.RemoteDisconnected("closed without a reply")
    while not parser.feed(data):
        sock.settimeout(time_left(deadline))
        data = socket.socket.recv(sock, READ_CHUNK)
        if not data:
            parser.closed()
            break
    return parser.status, parser.fields, parser.body, parser.reusable


class _Stale(Exception):
    """The connection closed before any reply byte: a reused one may simply have expired while idle."""


class _ConnectFailed(Exception):
    """Connecting failed (its cause is the OSError): phrased as such, e.g. `did not accept a connection`."""


def call_failure(
    node: str,
    path: str,
    timeout: float,
    exc: BaseException,
    connected: bool,
    deadline: float | None = None,
) -> NodeError:
    """One readable line for a call that got no usable reply."""
    timed_out = isinstance(exc, TimeoutError) or (deadline is not None and time.monotonic() >= deadline)
    if timed_out:
        if not connected:
            return NodeError("timeout", f"{node} did not accept a connection within {timeout:g}s")
        return NodeError("timeout", f"{node} did not answer {path} within {timeout:g}s")
    reason, phrase = describe(exc, connected)
    if reason == "unreachable":
        return NodeError(reason, f"{node} is unreachable ({phrase})")
    if not connected:
        return NodeError(reason, f"cannot connect to {node}: {phrase}")
    return NodeError(reason, f"{node}: {path} failed ({phrase})")


def _read_body(response: http.client.HTTPResponse, limit: int, node: str, path: str) -> bytes:
    """The whole body, never more than `limit` bytes read (a declared size past it is not read at all)."""
    if response.length is not None:
        if response.length > limit:
            raise _too_large(node, path, limit)
        return response.read()  # exactly Content-Length bytes, IncompleteRead if the node stops short
    parts: list[bytes] = []
    total = 0
    while part := response.read(READ_CHUNK):  # chunked or until close: bounded reads, never one huge one
        total += len(part)
        if total > limit:
            raise _too_large(node, path, limit)
        parts.append(part)
    return b"".join(parts)


def _too_large(node: str, path: str, limit: int) -> NodeError:
    return NodeError("error", f"{node} sent a {path} reply too large to read (over {_size(limit)})")


def parse_json(text: str, node: str, path: str) -> Any:
    """Parsed JSON; None for a body that is not JSON (Go's plain-text errors); NodeError when unsafe."""
    if not text or text[0] not in "{[":
        return None
    try:
        return json.loads(text)
    except RecursionError:
        raise NodeError("error", f"{node} sent a {path} reply nested too deeply to read") from None
    except ValueError as exc:
        if "digits" in str(exc):  # int max str digits: a number Python refuses to convert
            raise NodeError("error", f"{node} sent a {path} reply with a number too long to read") from None
        return None


def _size(count: int) -> str:
    return f"{count // MIB} MiB" if count >= MIB else f"{count // KIB} KiB"


_last_date: tuple[str, float, timedelta] = ("", 0.0, timedelta(0))  # header, when parsed, offset


def clock_offset(date_header: str | None) -> timedelta:
    """How far the node's clock is ahead of ours; zero when unknown or too small to matter.

    The Date header changes once a second while every node is checked every few seconds: the header
    parsed last is reused for up to a second (parsing costs ~10 us of the ~100 us a check costs; a
    second is below the 2 s skew that matters, and a node whose clock is stuck is parsed again).
    """
    global _last_date
    if not date_header:
        return timedelta(0)
    seen, parsed_at, offset = _last_date
    now = time.monotonic()
    if seen == date_header and now - parsed_at < 1.0:
        return offset
    try:
        node_now = parsedate_to_datetime(date_header) + timedelta(seconds=0.5)  # header is whole seconds
    except (TypeError, ValueError):
        return timedelta(0)
    if node_now.tzinfo is None:
        return timedelta(0)
    offset = node_now - datetime.now(UTC)
    offset = offset if abs(offset) >= MIN_CLOCK_SKEW else timedelta(0)
    _last_date = (date_header, now, offset)
    return offset


# ------------------------------------------------------------------------------------- error phrases

_ERRNO_PHRASES = {
    errno.ECONNREFUSED: "connection refused",
    errno.EMFILE: "too many open files (raise ulimit -n)",
    errno.ENFILE: "too many open files in the system (raise fs.file-max)",
    errno.EHOSTUNREACH: "no route to host",
    errno.ENETUNREACH: "network unreachable",
    errno.ECONNRESET: "connection reset",
    errno.ECONNABORTED: "connection aborted",
    errno.EPIPE: "connection closed while sending",
    errno.EADDRNOTAVAIL: "no local address or port free",
}
_LOCAL_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.EADDRNOTAVAIL})  # our side, not the node's


def describe(exc: BaseException, connected: bool = True) -> tuple[str, str]:
    """(reason, one short phrase) for a failed call's exception: what a user reads after the node URL."""
    if isinstance(exc, socket.gaierror):
        return "unreachable", "name not resolved"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return "unreachable", f"TLS certificate not accepted: {exc.verify_message or _ssl_words(exc)}"
    if isinstance(exc, ssl.SSLError):
        what = "TLS handshake failed" if not connected else "TLS error"
        return "unreachable", f"{what}: {_ssl_words(exc)}"
    if isinstance(exc, http.client.RemoteDisconnected):
        return "unreachable", "closed the connection without a reply"
    if isinstance(exc, http.client.IncompleteRead):
        return "error", "the reply stopped before its end"
    if isinstance(exc, http.client.LineTooLong):
        return "error", "a reply header line is too long"
    if isinstance(exc, http.client.HTTPException):
        return "error", f"the reply is not HTTP ({type(exc).__name__})"
    if isinstance(exc, OSError) and exc.errno in _ERRNO_PHRASES:
        return ("error" if exc.errno in _LOCAL_ERRNOS else "unreachable"), _ERRNO_PHRASES[exc.errno]
    if isinstance(exc, OSError):
        words = exc.strerror or str(exc) or type(exc).__name__
        return "unreachable", words[:1].lower() + words[1:]
    return "error", str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def _ssl_words(exc: ssl.SSLError) -> str:
    """`WRONG_VERSION_NUMBER` -> `wrong version number`; the library's own words otherwise."""
    if exc.reason:
        return str(exc.reason).replace("_", " ").lower()
    return (exc.strerror or str(exc) or type(exc).__name__).splitlines()[0]
