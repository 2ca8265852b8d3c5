"""StatusPoller: every node's idle `/api/ps` read on one thread, with non-blocking sockets.

Why (issue 8, scale): a health check is a tiny GET every 5 s on every node. On threads, each check costs a
wake-up, a hand-off of the interpreter lock per blocking `recv` and a Future; at 5,000 nodes that overhead,
not the exchange, took 0.9 of a core. Here one daemon thread waits on a `selectors` selector (epoll) for
all of them: a check is one `send`, one readiness event and one `recv`, parsed by the transport's
`ReplyParser` (the same rules as every other call: total deadline, size cap, no redirect, identity only).

Each node keeps its keep-alive connections here; an idle one stays registered, so a node closing it is
seen (and the socket closed) without a probe. Names are resolved on a worker thread and cached for a
minute, so a slow resolver never stalls the loop. https nodes and path prefixes that cannot be sent safely
are not handled (`get` returns False; the caller reads them on a thread as before).

`get(node_url, path, timeout, done)` calls `done(PollReply)` exactly once, on the poller thread (keep it
short: hand real work to a pool), or with a `NodeError` reply at the deadline or at `close()`.
"""

from __future__ import annotations

import errno
import heapq
import http.client
import ipaddress
import itertools
import logging
import selectors
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass

from flockparse.transport import (
    READ_CHUNK,
    NodeError,
    NodePool,
    NodeTransport,
    ReplyParser,
    call_failure,
    refuse_redirect_or_encoding,
    reply_limit,
    request_head,
)
from flockparse.workers import ElasticPool

logger = logging.getLogger(__name__)

RESOLVED_TTL_S = 60.0  # a resolved name is reused this long
MAX_IDLE_PER_NODE = 2  # idle keep-alive connections kept per node (a check and a report at once)
MAX_IN_FLIGHT = 128  # requests on the wire at once; more wait their turn, their clock not yet running
_WAKE = object()


@dataclass(frozen=True)
class PollReply:
    """What came back: an HTTP status and body, or the call's NodeError (then status is 0)."""

    node_url: str
    status: int = 0
    body: bytes = b""
    date: str | None = None
    latency_s: float = 0.0
    error: NodeError | None = None


@dataclass
class _Request:
    node_url: str
    path: str
    timeout: float
    connect_timeout: float
    done: Callable[[PollReply], None]
    started: float = 0.0
    deadline: float = 0.0
    finished: bool = False
    retried: bool = False  # sent again on a new connection once (the reused one had expired)
    flying: bool = False  # counted in the poller's requests in flight
    connect_deadline: float = 0.0


class _Channel:
    """One connection to one node; carries at most one request at a time."""

    __slots__ = ("addresses", "connected", "node", "out", "parser", "request", "reused", "sock", "watching")

    def __init__(self, node: str) -> None:
        self.node = node
        self.sock: socket.socket | None = None
        self.request: _Request | None = None
        self.parser: ReplyParser | None = None
        self.out = b""
        self.connected = False
        self.reused = False  # taken from the idle ones: closed before any reply byte = it had expired
        self.addresses: list[tuple] = []
        self.watching = 0  # the selector events registered for its socket


class StatusPoller:
    """See the module docstring. Thread-safe `get`; everything else runs on the poller's own thread."""

    def __init__(self, transport: NodeTransport) -> None:
        self._transport = transport
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, _WAKE)
        self._inbox: deque[tuple[str, object]] = (
            deque()
        )  # ("get", _Request) | ("forget", url) | ("resolved", ...)
        self._lock = threading.Lock()  # guards _closed and the inbox hand-over; no I/O under it
        self._closed = False
        self._thread: threading.Thread | None = None
        self._idle: dict[str, list[_Channel]] = {}  # poller thread only
        self._deadlines: list[tuple[float, int, _Request, _Channel]] = []
        self._order = itertools.count()
        self._resolved: dict[tuple[str, int], tuple[float, list[tuple]]] = {}
        self._requests: dict[tuple[str, str], bytes] = {}  # (node, path) -> the request's bytes
        self._accepted: dict[tuple[str, str], bool] = {}  # (node, path) -> whether `accepts` said yes
        self._in_flight = 0  # requests started and not yet answered
        self._waiting: deque[_Request] = deque()  # ... and those waiting for their turn (MAX_IN_FLIGHT)
        self._resolver = ElasticPool("poller-dns", min_workers=1, max_wait=0.05, idle_seconds=10.0)

    # ------------------------------------------------------------------ public, any thread
    def accepts(self, pool: NodePool, path: str) -> bool:
        """Plain http, and a host and target that are safe to write as they are (anything else goes
        through http.client, which refuses what it must)."""
        text = pool.host_header + pool.prefix + path
        return pool.tls is None and not any(ch in text for ch in " \r\n\t\x00")

    def get(
        self,
        node_url: str,
        path: str,
        timeout: float,
        done: Callable[[PollReply], None],
        connect_timeout: float | None = None,
    ) -> bool:
        """Queue a GET; False when this node cannot be read here (https, unsafe target, bad address)."""
        accepted = self._accepted.get((node_url, path))
        if accepted is None:
            try:
                accepted = self.accepts(self._transport.pool(node_url), path)
            except NodeError:
                accepted = False
            self._accepted[(node_url, path)] = accepted
        if not accepted:
            return False
        request = _Request(node_url, path, timeout, min(connect_timeout or timeout, timeout), done)
        request.started = time.monotonic()
        request.deadline = request.started + timeout
        with self._lock:
            if self._closed:
                return False
            wake = not self._inbox  # a poller draining the inbox takes this one too: no wake-up needed
            self._inbox.append(("get", request))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="status-poller", daemon=True)
                self._thread.start()
        if wake:
            self._wake()
        return True

    def forget(self, node_url: str) -> None:
        """Close a removed node's idle connections (a request in flight still ends as usual)."""
        with self._lock:
            self._inbox.append(("forget", node_url))
        self._wake()

    def close(self) -> None:
        """Fail what is pending with a `cancelled` error, close every socket, end the thread."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            thread = self._thread
        self._resolver.close()
        self._wake()
        if thread is None:
            self._shutdown()

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"\0")
        except (BlockingIOError, OSError):  # a full wake pipe already wakes it; a closed one means closed
            return

    # ------------------------------------------------------------------ the loop
    def _run(self) -> None:
        while True:
            with self._lock:
                closed = self._closed
            if closed:
                self._shutdown()
                return
            timeout = self._seconds_to_next_deadline()
            for key, mask in self._selector.select(timeout):
                if key.data is _WAKE:
                    self._drain_wake()
                    continue
                try:
                    self._ready(key.data, mask)
                except Exception as exc:  # a bug on one connection must not stop every node's reads
                    logger.exception("status poller: %s failed", key.data.node)
                    reason = f"{key.data.node}: the read failed inside the client ({type(exc).__name__})"
                    self._finish(key.data, error=NodeError("error", reason))
            self._take_inbox()
            self._expire(time.monotonic())
            self._start_waiting()

    def _drain_wake(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except (BlockingIOError, OSError):
            return

    def _take_inbox(self) -> None:
        while True:
            with self._lock:  # everything queued so far at once; what arrives meanwhile on the next round
                if not self._inbox:
                    return
                batch, self._inbox = self._inbox, deque()
            for kind, item in batch:
                self._take(kind, item)

    def _take(self, kind: str, item: object) -> None:
        if kind == "get":
            self._start(item)  # type: ignore[arg-type]
        elif kind == "forget":
            for channel in self._idle.pop(item, []):  # type: ignore[call-overload]
                self._close_channel(channel)
            self._requests = {key: value for key, value in self._requests.items() if key[0] != item}
        elif kind == "resolved":
            channel, addresses, error = item  # type: ignore[misc]
            self._resolved_for(channel, addresses, error)

    def _seconds_to_next_deadline(self) -> float:
        heap = self._deadlines
        while heap and (heap[0][2].finished or heap[0][3].request is not heap[0][2]):
            heapq.heappop(heap)
        if not heap:
            return 1.0
        return max(0.0, min(1.0, heap[0][0] - time.monotonic()))

    def _expire(self, now: float) -> None:
        heap = self._deadlines
        while heap and heap[0][0] <= now:
            _, _, request, channel = heapq.heappop(heap)
            if request.finished or channel.request is not request:
                continue
            if now < request.deadline and (channel.connected or now < request.connect_deadline):
                continue  # an entry of a connect that succeeded
            connected = channel.connected
            timeout = request.timeout if connected else min(request.connect_timeout, request.timeout)
            error = call_failure(request.node_url, request.path, timeout, TimeoutError(), connected)
            self._finish(channel, error=error)

    # ------------------------------------------------------------------ one request
    def _start(self, request: _Request) -> None:
        if time.monotonic() >= request.deadline:
            error = call_failure(request.node_url, request.path, request.timeout, TimeoutError(), True)
            _deliver(request, PollReply(request.node_url, error=error))
            return
        if self._closed:
            _deliver(request, PollReply(request.node_url, error=_closing(request.node_url)))
            return
        if self._in_flight >= MAX_IN_FLIGHT:  # thousands at once would only queue in the nodes' kernels
            self._waiting.append(request)
            return
        self._in_flight += 1
        request.flying = True
        idle = self._idle.get(request.node_url)
        channel = idle.pop() if idle else _Channel(request.node_url)
        self._attach(channel, request)

    def _attach(self, channel: _Channel, request: _Request) -> None:
        pool = self._transport.pool(request.node_url)
        channel.request = request
        channel.parser = ReplyParser(reply_limit(request.path), request.node_url, request.path)
        channel.out = self._request_bytes(pool, request.path)
        self._clock(channel, request)
        if channel.sock is not None:  # a kept connection, registered for reading: write at once
            self._send(channel, channel.sock)
            return
        self._resolve(channel, pool)

    def _landed(self, request: _Request) -> None:
        if request.flying:
            request.flying = False
            self._in_flight -= 1

    def _start_waiting(self) -> None:
        """Start waiting requests while there is room; their clock starts now (the wait was ours)."""
        while self._waiting and self._in_flight < MAX_IN_FLIGHT:
            request = self._waiting.popleft()
            request.deadline = time.monotonic() + request.timeout
            self._start(request)

    def _clock(self, channel: _Channel, request: _Request) -> None:
        """Deadlines: the call's, and the connect's when it must connect."""
        now = time.monotonic()
        request.connect_deadline = min(request.deadline, now + request.connect_timeout)
        heapq.heappush(self._deadlines, (request.deadline, next(self._order), request, channel))
        if not channel.connected:
            heapq.heappush(self._deadlines, (request.connect_deadline, next(self._order), request, channel))

    def _request_bytes(self, pool: NodePool, path: str) -> bytes:
        """The request as sent, built once per node and path (it never changes)."""
        key = (pool.url, path)
        request = self._requests.get(key)
        if request is None:
            request = request_head("GET", pool.prefix + path, pool.host_header, pool.headers)
            self._requests[key] = request
        return request

    def _resolve(self, channel: _Channel, pool: NodePool) -> None:
        host, port = pool.host, pool.port
        try:
            ipaddress.ip_address(host)
            literal = True
        except ValueError:
            literal = False
        if literal:
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            self._resolved_for(channel, [(family, (host, port))], None)
            return
        cached = self._resolved.get((host, port))
        if cached is not None and time.monotonic() - cached[0] < RESOLVED_TTL_S:
            self._resolved_for(channel, cached[1], None)
            return

        def lookup() -> None:
            try:
                found = socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM)
                addresses, error = [(info[0], info[4]) for info in found], None
                self._resolved[(host, port)] = (time.monotonic(), addresses)
            except OSError as exc:
                addresses, error = [], exc
            with self._lock:
                self._inbox.append(("resolved", (channel, addresses, error)))
            self._wake()

        future: Future = self._resolver.submit(lookup)
        if future.cancelled():  # closing
            self._finish(channel, error=NodeError("cancelled", f"{channel.node}: not sent, closing"))

    def _resolved_for(self, channel: _Channel, addresses: list[tuple], error: OSError | None) -> None:
        request = channel.request
        if request is None or request.finished:
            return
        if error is not None:
            self._fail(channel, error, connected=False)
            return
        channel.addresses = list(addresses)
        self._connect_next(channel)

    def _connect_next(self, channel: _Channel) -> None:
        """Connect to the next address; an address that refuses at once gives way to the next one."""
        last: OSError = OSError(errno.EADDRNOTAVAIL, "no address to connect to")
        while channel.addresses:
            family, address = channel.addresses.pop(0)
            try:
                sock = socket.socket(family, socket.SOCK_STREAM)
            except OSError as exc:  # EMFILE: too many open files
                last = exc
                break
            sock.setblocking(False)
            code = sock.connect_ex(address)
            if code not in (0, errno.EINPROGRESS):
                sock.close()
                last = OSError(code, errno.errorcode.get(code, "connect failed"))
                continue
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            channel.sock = sock
            self._selector.register(sock, selectors.EVENT_WRITE, channel)
            channel.watching = selectors.EVENT_WRITE
            return
        self._fail(channel, last, connected=False)

    def _ready(self, channel: _Channel, mask: int) -> None:
        sock = channel.sock
        if sock is None:
            return
        if channel.request is None:  # idle and readable: the node closed it (or sent junk)
            self._drop_idle(channel)
            return
        if not channel.connected:
            code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if code:
                self._selector.unregister(sock)
                sock.close()
                channel.sock = None
                if channel.addresses:
                    self._connect_next(channel)
                else:
                    self._fail(channel, OSError(code, errno.errorcode.get(code, "connect failed")), False)
                return
            channel.connected = True
        if mask & selectors.EVENT_WRITE and channel.out:
            self._send(channel, sock)
        elif mask & selectors.EVENT_READ:
            self._receive(channel, sock)

    def _send(self, channel: _Channel, sock: socket.socket) -> None:
        try:
            sent = sock.send(channel.out)
        except BlockingIOError:
            return
        except OSError as exc:
            self._stale_or_fail(channel, exc)
            return
        channel.out = channel.out[sent:]
        if channel.out:
            self._watch(channel, selectors.EVENT_WRITE)
        else:
            self._watch(channel, selectors.EVENT_READ)

    def _receive(self, channel: _Channel, sock: socket.socket) -> None:
        try:
            data = sock.recv(READ_CHUNK)
        except BlockingIOError:
            return
        except OSError as exc:
            self._stale_or_fail(channel, exc)
            return
        parser = channel.parser
        assert parser is not None
        try:
            if not data:
                if not parser.started:
                    self._stale_or_fail(channel, http.client.RemoteDisconnected("closed without a reply"))
                    return
                parser.closed()
            elif not parser.feed(data):
                return
        except NodeError as error:
            self._finish(channel, error=error)
            return
        except Exception as exc:  # http.client's exceptions for what is not HTTP: phrased by `describe`
            self._fail(channel, exc, connected=True)
            return
        try:
            refuse_redirect_or_encoding(
                channel.node, parser.path, parser.status, parser.fields.get("location"),
                parser.fields.get("content-encoding"),
            )  # fmt: skip
        except NodeError as error:
            self._finish(channel, error=error)
            return
        self._finish(channel, parser=parser)

    def _stale_or_fail(self, channel: _Channel, exc: Exception) -> None:
        """A reused connection closed before any reply byte had probably expired: once more on a new one
        (a GET only ever goes through here, so sending it twice is harmless)."""
        request = channel.request
        parser = channel.parser
        if request is not None and channel.reused and not request.retried and not (parser and parser.started):
            request.retried = True
            channel.request = None
            self._close_channel(channel)
            self._attach(_Channel(request.node_url), request)
            return
        self._fail(channel, exc, connected=channel.connected)

    def _fail(self, channel: _Channel, exc: BaseException, connected: bool) -> None:
        request = channel.request
        if request is None:
            return
        timeout = request.timeout if connected else request.connect_timeout
        self._finish(
            channel, error=call_failure(request.node_url, request.path, timeout, exc, connected, None)
        )

    def _finish(
        self, channel: _Channel, parser: ReplyParser | None = None, error: NodeError | None = None
    ) -> None:
        request = channel.request
        channel.request, channel.parser, channel.out = None, None, b""
        if request is None or request.finished:
            return
        request.finished = True
        self._landed(request)
        latency = time.monotonic() - request.started
        if error is None and parser is not None:
            reply = PollReply(
                request.node_url, parser.status, parser.body, parser.fields.get("date"), latency, None
            )
            reusable = parser.reusable
        else:
            reply = PollReply(request.node_url, latency_s=latency, error=error)
            reusable = False
        if reusable and channel.sock is not None:
            self._keep_idle(channel)
        else:
            self._close_channel(channel)
        _deliver(request, reply)

    # ------------------------------------------------------------------ idle connections
    def _watch(self, channel: _Channel, events: int) -> None:
        """Wait for `events` on the channel's socket (a system call only when that changes)."""
        if channel.watching != events and channel.sock is not None:
            self._selector.modify(channel.sock, events, channel)
            channel.watching = events

    def _keep_idle(self, channel: _Channel) -> None:
        idle = self._idle.setdefault(channel.node, [])
        if len(idle) >= MAX_IDLE_PER_NODE or channel.sock is None:
            self._close_channel(channel)
            return
        self._watch(channel, selectors.EVENT_READ)
        channel.reused = True
        idle.append(channel)

    def _drop_idle(self, channel: _Channel) -> None:
        idle = self._idle.get(channel.node, [])
        if channel in idle:
            idle.remove(channel)
        self._close_channel(channel)

    def _close_channel(self, channel: _Channel) -> None:
        sock, channel.sock, channel.connected, channel.watching = channel.sock, None, False, 0
        if sock is not None:
            try:
                self._selector.unregister(sock)
            except (KeyError, ValueError):
                logger.debug("socket of %s was not registered", channel.node)
            sock.close()

    def _shutdown(self) -> None:
        """On close: fail every pending request, close every socket (on the poller thread, or the
        caller's when the thread never started)."""
        with self._lock:
            pending = [item for kind, item in self._inbox if kind == "get"]
            self._inbox.clear()
        for request in pending:
            _deliver(request, PollReply(request.node_url, error=_closing(request.node_url)))  # type: ignore
        for key in list(self._selector.get_map().values()):
            channel = key.data
            if channel is _WAKE:
                continue
            request = channel.request
            self._close_channel(channel)
            if request is not None and not request.finished:
                request.finished = True
                _deliver(request, PollReply(request.node_url, error=_closing(request.node_url)))
        for request in self._waiting:
            _deliver(request, PollReply(request.node_url, error=_closing(request.node_url)))
        for _, _, request, _ in self._deadlines:  # resolving names
            if not request.finished:
                _deliver(request, PollReply(request.node_url, error=_closing(request.node_url)))
        self._deadlines.clear()
        self._waiting.clear()
        self._idle.clear()
        self._selector.close()
        self._wake_r.close()
        self._wake_w.close()


def _closing(node: str) -> NodeError:
    return NodeError("cancelled", f"{node}: not answered, the client is closing")


def _deliver(request: _Request, reply: PollReply) -> None:
    request.finished = True
    try:
        request.done(reply)
    except Exception:  # a caller's callback must not kill the loop that serves every node
        logger.exception("status poller callback for %s failed", request.node_url)
