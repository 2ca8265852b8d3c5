"""The simulator's HTTP serving: one event loop per process for the sockets of every SimNode in it.

Why (issue 8, scale): with http.server's ThreadingHTTPServer every node had an accept thread and every
connection a handler thread; a kept-alive `/api/ps` then cost a farm process 0.5-0.9 ms of CPU, nearly all of
it thread wake-ups, timed waits and interpreter-lock hand-offs among ~2,500 threads (bench/farm_cost.py).
Here one daemon thread waits on epoll for every listener and connection of the process, frames each request
as http.server's reader would consume it, and hands it to the node's request handler (server._Handler, the
one dispatch path: it parses the head with http.server's own parse_request and writes with http.server's
send_* methods, so the bytes on the wire do not change). A request that can wait (a load, a stream, a hang
or slow fault, a stalled /api/ps) runs on a worker thread exactly as it ran on its connection's thread; the
others run on the loop, the node's latency being a timer instead of a sleep.

Per connection, requests are served one at a time and in order: the next one is framed only once the reply
is written (pipelined requests wait in the buffer, as with http.server). A peer that closes mid-request gets
what http.server gave it: the bytes that arrived are handled as the request. `unbind` (stop, down, restart)
refuses new connections and shuts the open ones at once, then closes them on the loop.

Contract with the handler (duck-typed, see server._Handler): `begin(head) -> bool`, `body_length(buffer,
eof) -> int | None`, `prepare(body)`, `fault_state()`, `may_block(fault)`, `dispatch(fault)`, `admit(fault)
-> path | None`, `answer(path)`, `latency_s()`, `close_connection`, `wfile`/`rfile` and `server.node`;
with the node (server.SimNode): `_add_bytes(inbound=, outbound=)`, `_connections` under `_conn_lock`.
"""

from __future__ import annotations

import contextlib
import functools
import heapq
import itertools
import queue
import selectors
import socket
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from typing import Any

READ_SIZE = 65536
MAX_LINE = 65536  # http.server/http.client: a longer request line is a 414, a longer header line a 431
MAX_HEADERS = 100  # http.client._MAXHEADERS (the blank line counts too)
INBUF_HIGH = 1 << 20  # stop reading a connection whose unhandled bytes pass this (kernel flow control)
OUT_HIGH = 1 << 20  # a worker writing more than this ahead of a slow reader waits, as sendall would
LISTEN_BACKLOG = 128  # Go listens with the system's somaxconn; socketserver's 5 overflows under bursts
ACCEPTS_PER_WAKE = 64
WORKER_IDLE_S = 10.0
UNBIND_WAIT_S = 2.0


def head_length(buffer: bytearray, eof: bool) -> int:
    """Bytes of the request head at the start of `buffer` as http.server reads it (request line, header
    lines, the blank line), or as far as it reads before failing (an over-long line, too many headers);
    0 while more must arrive. At EOF whatever arrived is the head, as a short read gives it."""
    end = buffer.find(b"\n", 0, MAX_LINE + 1)
    if end < 0:
        if len(buffer) > MAX_LINE:
            return MAX_LINE + 1  # readline(65537) -> 414
        return len(buffer) if eof else 0
    pos, lines = end + 1, 0
    while True:
        end = buffer.find(b"\n", pos, pos + MAX_LINE + 1)
        if end < 0:
            if len(buffer) - pos > MAX_LINE:
                return pos + MAX_LINE + 1  # LineTooLong -> 431
            return len(buffer) if eof else 0
        blank = end - pos <= 1 and (end == pos or buffer[pos] == 13)
        pos, lines = end + 1, lines + 1
        if lines > MAX_HEADERS or blank:
            return pos


class _Listener:
    """One node's listening socket; `node` is what the handler serves (handler.server.node)."""

    __slots__ = ("connections", "handler_class", "node", "sock")

    def __init__(self, sock: socket.socket, node: Any, handler_class: type) -> None:
        self.sock, self.node, self.handler_class = sock, node, handler_class
        self.connections: set[_Conn] = set()  # loop thread only


class _Conn:
    """One accepted connection: bytes in, the reply bytes waiting to go out, and whose turn it is."""

    __slots__ = (
        "advancing",
        "busy",
        "closed",
        "closing",
        "drained",
        "eof",
        "handler",
        "head_done",
        "inbuf",
        "listener",
        "lock",
        "mask",
        "out",
        "out_bytes",
        "sending",
        "sock",
    )

    def __init__(self, sock: socket.socket, listener: _Listener) -> None:
        self.sock, self.listener = sock, listener
        self.inbuf = bytearray()
        self.out: deque[bytes] = deque()  # written by the handler (loop or worker), sent by the loop
        self.out_bytes = 0
        self.sending: memoryview | None = None  # what the loop is sending now (the rest of a partial send)
        self.lock = threading.Lock()  # guards out/out_bytes between a worker and the loop; never I/O
        self.drained = threading.Condition(self.lock)
        self.mask = 0
        self.eof = False  # the peer sent FIN
        self.busy = False  # a request is being answered (inline, on a timer or on a worker)
        self.advancing = False  # _advance is running for it (a request answered inline returns to it)
        self.head_done = False  # the current request's head is parsed; its body is awaited
        self.closing = False  # close once the reply is out
        self.closed = False
        self.handler: Any = None


class _ConnWriter:
    """The handler's wfile: queues bytes for the loop to send; raises like a socket once it is closed."""

    __slots__ = ("_conn", "_engine")

    def __init__(self, conn: _Conn, engine: Engine) -> None:
        self._conn, self._engine = conn, engine

    def write(self, data: bytes) -> int:
        conn = self._conn
        conn.listener.node._add_bytes(outbound=len(data))  # counted as written, as before
        if conn.closed:
            raise BrokenPipeError("connection closed")
        with conn.lock:
            conn.out.append(bytes(data))
            conn.out_bytes += len(data)
        if not self._engine.on_loop():
            self._engine.call_soon(lambda: self._engine.flush(conn))
            with conn.lock:  # a slow reader holds this writer back, as a blocking sendall would
                while conn.out_bytes > OUT_HIGH and not conn.closed:
                    conn.drained.wait(0.5)
            if conn.closed:
                raise BrokenPipeError("connection closed")
        return len(data)

    def flush(self) -> None:
        pass


class _Workers:
    """Threads for requests that can wait: an idle one takes the next, else a new one starts (a hung
    request never holds up another); idle ones end after WORKER_IDLE_S."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._idle = 0

    def submit(self, work: Callable[[], None]) -> None:
        with self._lock:
            if self._idle:
                self._idle -= 1
                self._queue.put(work)  # under the lock: an idle worker timing out still finds it
                return
        threading.Thread(target=self._run, args=(work,), name="sim-worker", daemon=True).start()

    def _run(self, work: Callable[[], None]) -> None:
        while True:
            _guarded(work)
            with self._lock:
                self._idle += 1
            try:
                work = self._queue.get(timeout=WORKER_IDLE_S)
            except queue.Empty:
                with self._lock:
                    try:
                        work = self._queue.get_nowait()  # handed to us as we timed out
                    except queue.Empty:
                        self._idle -= 1
                        return


class Engine:
    """The event loop of one process (see the module docstring). `bind`/`unbind` from any thread."""

    def __init__(self) -> None:
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._inbox: deque[Callable[[], None]] = deque()
        self._woken = False
        self._timers: list[tuple[float, int, Callable[[], None]]] = []
        self._order = itertools.count()
        self._workers = _Workers()
        self._thread = threading.Thread(target=self._run, name="sim-http", daemon=True)
        self._ident: int | None = None
        self._thread.start()

    # ------------------------------------------------------------------ any thread
    def on_loop(self) -> bool:
        return threading.get_ident() == self._ident

    def call_soon(self, callback: Callable[[], None]) -> None:
        self._inbox.append(callback)
        if not self._woken and not self.on_loop():
            self._woken = True
            with contextlib.suppress(BlockingIOError, OSError):  # a full pipe already wakes the loop
                self._wake_w.send(b"\0")

    def bind(self, host: str, port: int, node: Any, handler_class: type) -> tuple[_Listener, int]:
        """Listen on host:port (0 = ephemeral) now, in the caller (connections queue in the backlog at
        once); the loop starts accepting them. Returns the listener and its port."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            sock.listen(LISTEN_BACKLOG)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        listener = _Listener(sock, node, handler_class)
        self.call_soon(lambda: self._selector.register(sock, selectors.EVENT_READ, listener))
        return listener, sock.getsockname()[1]

    def unbind(self, listener: _Listener) -> None:
        """Refuse new connections and drop the open ones now; their sockets are closed on the loop
        (waited for, bounded, so the port can be bound again at once)."""
        with contextlib.suppress(OSError):
            listener.sock.shutdown(socket.SHUT_RDWR)  # a listening socket stops accepting (Linux)
        node = listener.node
        with node._conn_lock:
            sockets = list(node._connections)
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        done = threading.Event()

        def close_all() -> None:
            self._forget(listener.sock)
            listener.sock.close()
            for conn in list(listener.connections):
                self.close(conn)
            done.set()

        if self.on_loop():
            close_all()
        else:
            self.call_soon(close_all)
            done.wait(UNBIND_WAIT_S)

    # ------------------------------------------------------------------ the loop
    def _run(self) -> None:
        self._ident = threading.get_ident()
        while True:
            timeout = None
            if self._inbox:
                timeout = 0.0
            elif self._timers:
                timeout = max(0.0, self._timers[0][0] - time.monotonic())
            for key, mask in self._selector.select(timeout):
                target = key.data
                if target is None:
                    self._drain_wake()
                elif type(target) is _Conn:
                    _guarded(lambda t=target, m=mask: self._ready(t, m))
                else:
                    _guarded(lambda t=target: self._accept(t))
            if self._timers:
                now = time.monotonic()
                while self._timers and self._timers[0][0] <= now:
                    _guarded(heapq.heappop(self._timers)[2])
            self._woken = False  # before draining: a call_soon from now on wakes the loop again
            while self._inbox:
                _guarded(self._inbox.popleft())

    def _drain_wake(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            while self._wake_r.recv(4096):
                pass

    def _later(self, seconds: float, callback: Callable[[], None]) -> None:
        heapq.heappush(self._timers, (time.monotonic() + seconds, next(self._order), callback))

    def _forget(self, sock: socket.socket) -> None:
        with contextlib.suppress(KeyError, ValueError, OSError):
            self._selector.unregister(sock)

    def _watch(self, conn: _Conn, mask: int) -> None:
        if conn.closed or mask == conn.mask:
            return
        if not conn.mask:
            self._selector.register(conn.sock, mask, conn)
        elif not mask:
            self._selector.unregister(conn.sock)
        else:
            self._selector.modify(conn.sock, mask, conn)
        conn.mask = mask

    def _want(self, conn: _Conn) -> int:
        reading = not conn.eof and not conn.closing and len(conn.inbuf) < INBUF_HIGH
        return (selectors.EVENT_READ if reading else 0) | (selectors.EVENT_WRITE if self._queued(conn) else 0)

    def _accept(self, listener: _Listener) -> None:
        for _ in range(ACCEPTS_PER_WAKE):
            try:
                sock, address = listener.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # the listener was shut (unbind): the loop closes it next
                self._forget(listener.sock)
                return
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as Go does; else ~40 ms stalls
            conn = _Conn(sock, listener)
            handler = listener.handler_class(sock, address, listener)
            handler.wfile = _ConnWriter(conn, self)
            conn.handler = handler
            node = listener.node
            with node._conn_lock:
                node._connections.add(sock)
            listener.connections.add(conn)
            self._watch(conn, selectors.EVENT_READ)

    def _ready(self, conn: _Conn, mask: int) -> None:
        if mask & selectors.EVENT_WRITE:
            self.flush(conn)
        if mask & selectors.EVENT_READ and not conn.closed:
            try:
                data = conn.sock.recv(READ_SIZE)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # reset by the peer, or shut by unbind
                self.close(conn)
                return
            if data:
                conn.inbuf += data
            else:
                conn.eof = True
            self._advance(conn)
            self._watch(conn, self._want(conn))

    def _advance(self, conn: _Conn) -> None:
        """Frame and start the next request of this connection, if it is its turn and it is all here. A
        request answered at once (inline, no latency) lets this loop take the next one: no recursion
        through _finish, however many requests are pipelined."""
        if conn.advancing:
            return
        conn.advancing = True
        try:
            self._take_requests(conn)
        finally:
            conn.advancing = False

    def _take_requests(self, conn: _Conn) -> None:
        handler = conn.handler
        while not conn.busy and not conn.closing and not conn.closed:
            if not conn.head_done:
                if not conn.inbuf and conn.eof:  # http.server: readline() == b"" -> close
                    self._close_when_sent(conn)
                    return
                size = head_length(conn.inbuf, conn.eof)
                if not size:
                    return
                head = bytes(conn.inbuf[:size])
                del conn.inbuf[:size]
                handler.server.node._add_bytes(inbound=size)
                ok = _guarded(functools.partial(handler.begin, head), on_error=False)
                if self._queued(conn):  # an error, or 100 Continue
                    self.flush(conn)
                if not ok:  # answered (an error) or nothing to answer: http.server closes
                    self._close_when_sent(conn)
                    return
                conn.head_done = True
            size = handler.body_length(conn.inbuf, conn.eof)
            if size is None:
                return
            body = b""
            if size:
                body = bytes(conn.inbuf[:size])
                del conn.inbuf[:size]
                handler.server.node._add_bytes(inbound=size)
            conn.head_done, conn.busy = False, True
            handler.prepare(body)
            self._start(conn)

    def _start(self, conn: _Conn) -> None:
        handler = conn.handler
        fault = handler.fault_state()
        if handler.may_block(fault):

            def work() -> None:
                try:
                    handler.dispatch(fault)
                except Exception:
                    handler.close_connection = True
                    raise
                finally:
                    self.call_soon(lambda: self._finish(conn))

            self._workers.submit(work)
            return
        path = _handled(handler, lambda: handler.admit(fault))
        if path is None:
            self._finish(conn)
            return
        delay = handler.latency_s()
        if delay > 0:
            self._later(delay, lambda: self._answer(conn, path))
        else:
            self._answer(conn, path)

    def _answer(self, conn: _Conn, path: str) -> None:
        if not conn.closed:
            _handled(conn.handler, lambda: conn.handler.answer(path))
        self._finish(conn)

    def _finish(self, conn: _Conn) -> None:
        """The handler is done with this request: send, then close or take the next one."""
        conn.busy = False
        if conn.closed:
            return
        if conn.handler.close_connection:
            self._close_when_sent(conn)
            return
        self.flush(conn)
        self._advance(conn)
        self._watch(conn, self._want(conn))

    def flush(self, conn: _Conn) -> None:
        """Send what is queued (loop thread); close a closing connection once all is out."""
        if conn.closed:
            return
        if conn.sending is None or not len(conn.sending):
            with conn.lock:
                data = b"".join(conn.out) if len(conn.out) != 1 else conn.out[0]
                conn.out.clear()
            conn.sending = memoryview(data)  # sent from an offset: a slow reader costs no copies
        sent = 0
        if len(conn.sending):
            try:
                sent = conn.sock.send(conn.sending)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError:  # the peer is gone: what the handler wrote is lost, as with sendall
                self.close(conn)
                return
            conn.sending = conn.sending[sent:]
            with conn.lock:
                conn.out_bytes -= sent
                if conn.out_bytes <= OUT_HIGH:
                    conn.drained.notify_all()
        if conn.closing and not self._queued(conn):
            self.close(conn)
            return
        self._watch(conn, self._want(conn))

    @staticmethod
    def _queued(conn: _Conn) -> bool:
        return bool(conn.out) or (conn.sending is not None and len(conn.sending) > 0)

    def _close_when_sent(self, conn: _Conn) -> None:
        conn.closing = True
        self.flush(conn)

    def close(self, conn: _Conn) -> None:
        """As socketserver's shutdown_request: shutdown(SHUT_WR), then close (loop thread)."""
        if conn.closed:
            return
        conn.closed = True
        with conn.lock:
            conn.drained.notify_all()
        self._forget(conn.sock)
        conn.mask = 0
        with contextlib.suppress(OSError):
            conn.sock.shutdown(socket.SHUT_WR)
        conn.sock.close()
        conn.listener.connections.discard(conn)
        node = conn.listener.node
        with node._conn_lock:
            node._connections.discard(conn.sock)


def _guarded(call: Callable[[], Any], on_error: Any = None) -> Any:
    """Run one step of the loop: a bug is reported, never fatal to the loop; socket errors are quiet (a
    connection closed under a handler is routine: stop, down, a client gone)."""
    try:
        return call()
    except OSError:
        return on_error
    except Exception:
        _report()
        return on_error


def _handled(handler: Any, call: Callable[[], Any]) -> Any:
    """One step of a handler on the loop; if it raises, its connection closes (as http.server's does)."""
    try:
        return call()
    except OSError:
        handler.close_connection = True
    except Exception:
        handler.close_connection = True
        _report()
    return None


def _report() -> None:
    """The current exception on stderr, as socketserver's handle_error prints it."""
    print("-" * 40, file=sys.stderr)
    print("Exception occurred in the simulator's HTTP loop", file=sys.stderr)
    traceback.print_exc()
    print("-" * 40, file=sys.stderr)


_engine: Engine | None = None
_engine_lock = threading.Lock()


def engine() -> Engine:
    """This process's loop, started on first use (a daemon thread, idle in epoll when nothing is bound)."""
    global _engine
    with _engine_lock:
        if _engine is None:
            _engine = Engine()
        return _engine
