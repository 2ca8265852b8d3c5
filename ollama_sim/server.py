"""The simulated node on a socket: HTTP/1.1 on 127.0.0.1, one handler method per endpoint, and faults.

Owns: SimNode (the Python API tests, benchmarks and the demo use: a Scheduler wired to a listening socket,
faults and scenarios such as restart, the request log and byte counts), the request handler (routing,
Go's status codes and texts, NDJSON streaming, keep-alive with TCP_NODELAY) and SimCluster.
All memory and scheduling decisions are the Scheduler's (scheduler.py); this module only talks HTTP.

Reading order: SimNode (lifecycle, faults, restart) -> _Handler: begin(), dispatch() = admit() + latency +
answer() -> _apply_fault() -> _route() -> one method per endpoint -> SimCluster. The sockets are served by
the process's event loop (engine.py).
"""

from __future__ import annotations

import contextlib
import email.utils
import hashlib
import http.server
import io
import json
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from ollama_sim import replies
from ollama_sim.catalogue import ModelSpec, canonical_name
from ollama_sim.engine import engine
from ollama_sim.replies import fake_embedding, fake_tokens, show_body, tokens_per_second
from ollama_sim.scheduler import SHUTTING_DOWN, Runner, Scheduler
from ollama_sim.wire import (
    BUSY_TEXT,
    NAME_RE,
    VERSION,
    ApiError,
    created_at,
    decode_request,
    go_quote,
    parse_options,
)

REQUEST_LOG_MAX = 10_000  # request_log keeps the newest entries only
FAULTS = ("down", "drop", "hang", "slow", "error500", "garbage", "busy", "size_fallback")


class _SchedulerAttribute:
    """A SimNode attribute kept by its Scheduler (the node's Python API predates the split): reads and
    writes go to `node.scheduler`, so `node.external_vram_gb = 20` still takes effect at once."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, node: SimNode | None, owner: type | None = None) -> Any:
        if node is None:
            return self
        return getattr(node.scheduler, self.name)

    def __set__(self, node: SimNode, value: Any) -> None:
        setattr(node.scheduler, self.name, value)


class SimNode:
    """A simulated Ollama server on 127.0.0.1 with a VRAM/RAM budget and Ollama's scheduler.

    Scenarios a real node meets: `restart()` (nothing loaded afterwards), a GPU not discovered at start
    (`gpu_found=False`), VRAM held by other programs (`external_vram_gb`), a GPU lost at run time
    (`vram_gb = 0`), `/api/ps` stalling during unloads (`ps_stall_seconds`), an older Ollama (`version`).
    """

    # the memory and scheduling settings and state live in self.scheduler (see scheduler.Scheduler)
    ram_gb = _SchedulerAttribute()
    vram_gb = _SchedulerAttribute()  # 0 = the GPU is lost; loaded runners keep what they hold
    vram_bytes = _SchedulerAttribute()
    ram_bytes = _SchedulerAttribute()
    gpu_found = _SchedulerAttribute()  # read-only: did this process discover the GPU (restart() changes it)
    discovered_vram_bytes = _SchedulerAttribute()
    external_vram_gb = _SchedulerAttribute()  # VRAM held by other programs; for the next placement
    ps_stall_seconds = _SchedulerAttribute()
    installed = _SchedulerAttribute()
    load_seconds_per_gb = _SchedulerAttribute()  # takes effect at once, also for a load in progress
    unload_seconds = _SchedulerAttribute()
    max_loaded = _SchedulerAttribute()
    max_queue = _SchedulerAttribute()
    loading = _SchedulerAttribute()  # the model being scheduled/loaded now (one at a time)
    queued = _SchedulerAttribute()  # requests waiting for the load slot
    keep_alive_default_ns = _SchedulerAttribute()
    default_num_ctx = _SchedulerAttribute()

    def __init__(
        self,
        vram_gb: float = 24.0,
        ram_gb: float = 64.0,
        models: Iterable[str] | None = None,
        preload: Iterable[tuple[str, str]] | None = None,
        load_seconds_per_gb: float = 0.0,
        unload_seconds: float = 0.05,
        latency_ms: float = 0.0,
        max_loaded: int = 0,
        max_queue: int = 512,
        keep_alive_default: str | int | float = "5m",
        port: int = 0,
        inference_time_scale: float = 0.0,
        gpu_found: bool = True,
        external_vram_gb: float = 0.0,
        ps_stall_seconds: float = 0.0,
        version: str = VERSION,
    ) -> None:
        self.scheduler = Scheduler(
            vram_gb=vram_gb,
            ram_gb=ram_gb,
            models=models,
            load_seconds_per_gb=load_seconds_per_gb,
            unload_seconds=unload_seconds,
            max_loaded=max_loaded,
            max_queue=max_queue,
            keep_alive_default=keep_alive_default,
            gpu_found=gpu_found,
            external_vram_gb=external_vram_gb,
            ps_stall_seconds=ps_stall_seconds,
            version=version,
        )
        self.version = version
        self.preload = list(preload or [])
        self.latency_ms = latency_ms
        # 0 = generations are instant; 1 = they take their simulated time (eval_duration) for real
        self.inference_time_scale = inference_time_scale
        self.port = port
        self.host = "127.0.0.1"

        self._log_lock = threading.Lock()
        self.request_log: list[tuple[str, str, Any]] = []  # the newest REQUEST_LOG_MAX requests
        self.request_log_max = REQUEST_LOG_MAX
        self.bytes_in = 0
        self.bytes_out = 0

        self._fault: str | None = None
        self._fault_seconds = 0.0
        self._fault_paths: tuple[str, ...] | None = None
        self._fault_released = threading.Event()
        self._server: Any = None  # the engine's listener while bound (None: stopped or down)
        self._connections: set[socket.socket] = set()
        self._conn_lock = threading.Lock()
        self._ps_cache: tuple[tuple, bytes] | None = None  # (what /api/ps showed, its serialized reply)
        self._started = False

    # ----------------------------------------------------------------------------- lifecycle

    def start(self) -> SimNode:
        """Preload, bind 127.0.0.1:port (0 = ephemeral), and serve in daemon threads."""
        if self._started:
            return self
        self.scheduler.start(self.preload)
        try:
            self._bind()
        except BaseException:
            self.scheduler.stop()
            raise
        self._started = True
        return self

    def stop(self) -> None:
        """Stop serving; hung or slow handlers are released, never waited on forever."""
        if not self._started:
            return
        self._started = False
        self._stopping.set()  # before releasing hung handlers: they then drop their connection
        self._fault_released.set()
        self.scheduler.stop()  # wakes loads and evictions in progress: they answer SHUTTING_DOWN
        self._unbind()

    def __enter__(self) -> SimNode:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def _stopping(self) -> threading.Event:
        """The scheduler's shutdown flag: handlers' pauses and hung faults end with it too."""
        return self.scheduler.stopping

    def _bind(self) -> None:
        """Listen on 127.0.0.1:port; the process's event loop (engine.py) serves it."""
        self._server, self.port = engine().bind(self.host, self.port, self, _Handler)

    def _unbind(self) -> None:
        """Close the listener (connections are refused) and drop every open connection."""
        listener, self._server = self._server, None
        if listener is not None:
            engine().unbind(listener)

    # ----------------------------------------------------------------------------- faults and scenarios

    def set_fault(self, kind: str, seconds: float = 0.0, paths: Iterable[str] | None = None) -> None:
        """down | drop | hang | slow | error500 | garbage | busy | size_fallback, optionally only for some
        paths. size_fallback: /api/ps reports size == size_vram == the GGUF file size, Ollama's fallback
        when no llama-server buffer line was parsed (llama_server.go:2669-2675)."""
        if kind not in FAULTS:
            raise ValueError(f"unknown fault {kind!r}")
        self.clear_fault()
        self._fault_released.clear()
        self._fault, self._fault_seconds = kind, float(seconds)
        self._fault_paths = tuple(paths) if paths else None
        if kind == "down" and self._started:
            self._unbind()

    def clear_fault(self) -> None:
        was_down = self._fault == "down"
        self._fault, self._fault_paths, self._fault_seconds = None, None, 0.0
        self._fault_released.set()
        if was_down and self._started and self._server is None:
            self._bind()

    @property
    def fault(self) -> str | None:
        return self._fault

    def restart(self, downtime: float = 0.0, gpu_found: bool = True) -> None:
        """Ollama restarts: connections refused for `downtime` s, then it serves with NOTHING loaded.

        SIGTERM kills every runner (routes.go:2023-2028 unloadAllRunners) and the new process starts with
        an empty map (sched.go:97); nothing reloads by itself. Loads in progress are lost. The GPU is
        discovered again (discover/runner.go:45,265): `gpu_found=False` = not found by this process, so
        every load lands on CPU until a later restart finds it. The default context follows the VRAM
        discovered now (routes.go:2043-2057). Load/unload counts are kept.
        """
        if self._started and self._fault != "down":
            self._unbind()
        self.scheduler.kill_runners()
        if downtime > 0:
            self._stopping.wait(downtime)
        self.scheduler.rediscover(gpu_found)
        if self._started and self._fault != "down":
            self._bind()

    # ----------------------------------------------------------------------------- the scheduler's API

    def counts(self, model: str) -> dict[str, int]:
        """{"loads": n, "unloads": n} for one model (canonical or short name); a reload is one of each."""
        return self.scheduler.counts(model)

    def loaded(self) -> list[dict]:
        """The runners as the scheduler sees them (including ones that are still stopping)."""
        return self.scheduler.loaded()

    def schedule(
        self,
        spec: ModelSpec,
        opts: dict,
        keep_alive_ns: int | None,
        count: bool = True,
        load_delay: bool = True,
    ) -> Runner:
        """Scheduler.schedule: a runner for one request (give it back with release())."""
        return self.scheduler.schedule(spec, opts, keep_alive_ns, count, load_delay)

    def release(self, runner: Runner) -> None:
        self.scheduler.release(runner)

    def unload(self, spec: ModelSpec) -> None:
        self.scheduler.unload(spec)

    def ps_body(self) -> dict:
        """/api/ps (it may wait while a runner unloads: see Scheduler.ps_runners)."""
        return replies.ps_body(self.scheduler.ps_runners(), fallback=self._fault == "size_fallback")

    def ps_reply(self) -> bytes:
        """/api/ps serialized; the bytes are reused while nothing the reply shows has changed (the key is
        read before the body: a change in between only leaves an entry no later request matches)."""
        key = (self.scheduler.ps_key(), self._fault == "size_fallback")
        cached = self._ps_cache
        if key[0] is not None and cached is not None and cached[0] == key:
            return cached[1]
        body = json.dumps(self.ps_body(), separators=(",", ":")).encode()
        if key[0] is not None:
            self._ps_cache = (key, body)
        return body

    def tags_body(self) -> dict:
        return replies.tags_body(self.scheduler.installed.values())

    # ----------------------------------------------------------------------------- wire bookkeeping

    def _record(self, method: str, path: str, body: Any) -> None:
        with self._log_lock:
            self.request_log.append((method, path, body))
            excess = len(self.request_log) - self.request_log_max
            if excess > 0:
                del self.request_log[:excess]

    def _add_bytes(self, inbound: int = 0, outbound: int = 0) -> None:
        with self._conn_lock:
            self.bytes_in += inbound
            self.bytes_out += outbound


# --------------------------------------------------------------------------------------------- HTTP


_ROUTES: dict[str, tuple[str, ...]] = {
    "/": ("GET", "HEAD"),
    "/api/version": ("GET", "HEAD"),
    "/api/tags": ("GET", "HEAD"),
    "/api/ps": ("GET",),
    "/api/status": ("GET",),
    "/api/show": ("POST",),
    "/api/generate": ("POST",),
    "/api/chat": ("POST",),
    "/api/embed": ("POST",),
    "/api/embeddings": ("POST",),
}


_WAITING_ROUTES = frozenset({"/api/generate", "/api/chat", "/api/embed", "/api/embeddings"})  # may wait
_BLOCKING_FAULTS = ("hang", "slow")
_JSON = "application/json; charset=utf-8"
_date_cache: tuple[int, str] = (0, "")
_PARSED_MAX = 8192  # heads remembered (a farm process sees about two per node: the poller's and a report's)
_parsed_heads: dict[bytes, tuple] = {}


class _Handler(http.server.BaseHTTPRequestHandler):
    """One connection's requests. Heads are parsed and replies written with http.server's own methods (so
    the bytes on the wire are http.server's); the process's event loop (engine.py) frames each request and
    calls `begin`, then `dispatch` on a worker when the request may wait, else `admit`, the node's latency
    as a timer, and `answer` on the loop. `dispatch` is `admit` + latency + `answer` on one thread."""

    protocol_version = "HTTP/1.1"

    def __init__(self, connection: socket.socket, client_address: Any, server: Any) -> None:
        # not BaseRequestHandler.__init__: that would serve the connection on this thread
        self.request = self.connection = connection
        self.client_address = client_address
        self.server = server  # the engine's listener: .node is the SimNode served
        self.close_connection = True
        self.rfile: io.BytesIO = io.BytesIO()
        self._body = b""

    # ------------------------------------------------------------------ plumbing (called by engine.py)

    @property
    def node(self) -> SimNode:
        return self.server.node

    def begin(self, head: bytes) -> bool:
        """handle_one_request's reading half on a complete head: False when answered (an error, written
        here) or empty; then the connection closes."""
        self.rfile = io.BytesIO(head)
        self.raw_requestline = self.rfile.readline(65537)
        if len(self.raw_requestline) > 65536:
            self.requestline = self.request_version = self.command = ""
            self.send_error(http.HTTPStatus.REQUEST_URI_TOO_LONG)
            return False
        if not self.raw_requestline:
            self.close_connection = True
            return False
        if not self._parse_request_once(head):
            return False
        if not hasattr(self, "do_" + self.command):
            self.send_error(http.HTTPStatus.NOT_IMPLEMENTED, f"Unsupported method ({self.command!r})")
            return False
        return True

    def _parse_request_once(self, head: bytes) -> bool:
        """parse_request, remembered per head: a check sends the same bytes every few seconds and the
        result is a function of them (heads that wrote something, an error or 100 Continue, are not kept).
        The headers object is shared between requests: handlers only read it."""
        seen = _parsed_heads.get(head)
        if seen is not None:
            (self.command, self.path, self.request_version, self.requestline, self.headers) = seen[:5]
            self.close_connection = seen[5]
            return True
        if not self.parse_request():
            return False
        if not self.headers.get("Expect") and len(head) <= 4096:
            if len(_parsed_heads) >= _PARSED_MAX:
                _parsed_heads.clear()
            parsed = (self.command, self.path, self.request_version, self.requestline, self.headers)
            _parsed_heads[head] = (*parsed, self.close_connection)
        return True

    def body_length(self, buffer: bytearray, eof: bool) -> int | None:
        """How many bytes at the start of `buffer` `_read_body` takes (its rules, step by step); None while
        they have not all arrived. At EOF what arrived is the body, as a short read gives it."""
        if self.headers.get("Transfer-Encoding", "").lower() != "chunked":
            try:
                length = int(self.headers.get("Content-Length") or 0)
            except ValueError:
                return 0  # _read_body raises the same ValueError before reading anything
            if length <= 0 or len(buffer) >= length:
                return max(0, length)
            return len(buffer) if eof else None
        pos, trailer = 0, False
        while True:
            end = buffer.find(b"\n", pos)
            if end < 0:
                return len(buffer) if eof else None
            line, pos = bytes(buffer[pos : end + 1]), end + 1
            if trailer:
                return pos
            try:
                size = int(line.strip().split(b";")[0] or b"0", 16)
            except ValueError:
                return pos  # _read_body raises on this line, as it did reading the socket
            if size == 0:
                trailer = True
                continue
            if len(buffer) < pos + size:
                return len(buffer) if eof else None
            pos += size
            end = buffer.find(b"\n", pos)  # the CRLF after the chunk's data
            if end < 0:
                return len(buffer) if eof else None
            pos = end + 1

    def prepare(self, body: bytes) -> None:
        self.rfile = io.BytesIO(body)

    def fault_state(self) -> tuple[str | None, tuple[str, ...] | None, float]:
        """The node's fault as this request sees it, read once: the loop's choice and the reply agree."""
        node = self.node
        return node._fault, node._fault_paths, node._fault_seconds

    def may_block(self, fault: tuple[str | None, tuple[str, ...] | None, float]) -> bool:
        """Can this request wait (a hang or slow fault, a load, a stream, /api/ps during a stalled unload)?
        Those run on a worker thread; the rest on the event loop."""
        kind, paths, _ = fault
        path = self.path.split("?", 1)[0]
        if kind in _BLOCKING_FAULTS and (paths is None or path in paths):
            return True
        return path in _WAITING_ROUTES or (path == "/api/ps" and self.node.ps_stall_seconds > 0)

    def latency_s(self) -> float:
        return self.node.latency_ms / 1000

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet, like a daemon
        pass

    def send_response(self, code: int, message: str | None = None) -> None:
        """Like Go: a Date header, no Server header."""
        self.send_response_only(code, message)
        self.send_header("Date", self.date_time_string())

    def date_time_string(self, timestamp: float | None = None) -> str:
        """http.server's Date text, formatted once a second (the text has a resolution of one second)."""
        global _date_cache
        if timestamp is not None:
            return super().date_time_string(timestamp)
        now = int(time.time())
        second, text = _date_cache
        if second != now:
            text = email.utils.formatdate(now, usegmt=True)
            _date_cache = (now, text)
        return text

    def do_GET(self) -> None:
        self.dispatch(self.fault_state())

    do_HEAD = do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_GET  # the methods answered at all

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().strip().split(b";")[0] or b"0", 16)
                if size == 0:
                    self.rfile.readline()
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _send_json(self, status: int, obj: Any) -> None:
        self._send(status, json.dumps(obj, separators=(",", ":")).encode(), _JSON)

    def _send_error(self, err: ApiError) -> None:
        self._send_json(err.status, {"error": err.message})

    def _stream(self, objects: Iterator[dict], pause: float = 0.0) -> None:
        """NDJSON with chunked transfer encoding, like Go's streamed replies: each object is flushed as its
        own chunk (routes.go:2097 streamResponse: gin's c.Stream flushes after every step), the headers go
        out with the first one. `pause`: the time to produce each object after the first (a token). A node
        that stops meanwhile drops the connection mid-stream, as a killed Ollama does."""
        self.send_response(200)
        self.send_header("Content-Type", "application/x-ndjson")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for index, obj in enumerate(objects):
            if index and pause > 0:
                self._pause(pause)
                if self.node._stopping.is_set() or self.node._server is None:
                    self.close_connection = True
                    return
            line = json.dumps(obj, separators=(",", ":")).encode() + b"\n"
            self.wfile.write(f"{len(line):x}\r\n".encode() + line + b"\r\n")
        self.wfile.write(b"0\r\n\r\n")

    def _compute(self, runner: Runner, duration_ns: int) -> None:
        """The runner works on this request for its simulated duration times inference_time_scale
        (0 = instant), one request at a time per runner (OLLAMA_NUM_PARALLEL=1)."""
        seconds = self.node.inference_time_scale * duration_ns / 1e9
        if seconds > 0:
            with self.node.scheduler.computing(runner):
                self._pause(seconds)
            if self.node._stopping.is_set():
                raise ApiError(500, SHUTTING_DOWN)

    def _pause(self, seconds: float) -> None:
        if seconds > 0:
            self.node._stopping.wait(seconds)

    # ------------------------------------------------------------------ dispatch

    def dispatch(self, fault: tuple[str | None, tuple[str, ...] | None, float]) -> None:
        """One request start to end on the calling thread (a worker: it may wait)."""
        path = self.admit(fault)
        if path is not None:
            self._pause(self.latency_s())
            self.answer(path)

    def admit(self, fault: tuple[str | None, tuple[str, ...] | None, float]) -> str | None:
        """Read the body, log the request, drop it when down, apply the fault: the path still to answer
        (after the node's latency), or None when nothing more is to be sent."""
        node = self.node
        path = self.path.split("?", 1)[0]
        body = self._read_body()
        try:
            logged = json.loads(body) if body else None
        except ValueError:
            logged = None
        node._record(self.command, path, logged)
        if node._server is None or node._stopping.is_set():  # down: drop what is still connected
            self.close_connection = True
            return None
        if self._apply_fault(path, fault):
            return None
        self._body = body
        return path

    def answer(self, path: str) -> None:
        allowed = _ROUTES.get(path)
        if allowed is None:
            self._send(404, b"404 page not found", "text/plain")
            return
        if self.command not in allowed:
            self._send(405, b"405 method not allowed", "text/plain")
            return
        try:
            try:
                self._route(path, self._body)
            except ApiError as err:
                self._send_error(err)
        except OSError:  # the client went away, or stop()/down closed the socket under us
            self.close_connection = True

    def _apply_fault(self, path: str, fault: tuple[str | None, tuple[str, ...] | None, float]) -> bool:
        """Apply the fault; True when the request was answered (or dropped) by it."""
        node = self.node
        kind, paths, seconds = fault
        if kind is None or kind == "size_fallback" or (paths is not None and path not in paths):
            return False
        if kind in ("down", "drop"):
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            return True
        if kind == "hang":  # released by clear_fault() (then answered normally) or stop()
            node._fault_released.wait()
            if node._stopping.is_set():
                self.close_connection = True
                return True
            return False
        if kind == "slow":
            self._pause(seconds)
            return False
        if kind == "error500":
            self._send_json(500, {"error": "llama-server process has terminated: exit status 2 (simulated)"})
        elif kind == "garbage":
            self._send(200, b'{"models":[{"name":"llama3.1:lat<html>', "application/json; charset=utf-8")
        elif kind == "busy":
            self._send_json(503, {"error": BUSY_TEXT})
        return True

    def _route(self, path: str, body: bytes) -> None:
        node = self.node
        if path == "/":
            self._send(200, b"Ollama is running", "text/plain; charset=utf-8")
        elif path == "/api/version":
            self._send_json(200, {"version": node.version})
        elif path == "/api/status":
            self._send_json(200, {"cloud": {"disabled": False, "source": "default"}})
        elif path == "/api/tags":
            self._send_json(200, node.tags_body())
        elif path == "/api/ps":
            self._send(200, node.ps_reply(), _JSON)
        elif path == "/api/show":
            self._show(decode_request(body, "ShowRequest"))
        elif path == "/api/generate":
            self._generate(decode_request(body, "GenerateRequest"))
        elif path == "/api/chat":
            self._chat(decode_request(body, "ChatRequest"))
        elif path == "/api/embed":
            self._embed(decode_request(body, "EmbedRequest"))
        elif path == "/api/embeddings":
            self._embeddings(decode_request(body, "EmbeddingRequest"))

    # ------------------------------------------------------------------ endpoints

    def _show(self, req: dict) -> None:
        model = req.get("model") or req.get("name") or ""
        if not model:
            raise ApiError(400, "model is required")
        not_found = ApiError(404, f"model '{canonical_name(model)}' not found")
        spec = self._resolve(model, ApiError(400, "invalid model name"), not_found)
        self._send_json(200, show_body(spec, bool(req.get("verbose"))))

    def _resolve(self, model: str, invalid: ApiError, not_found: ApiError) -> ModelSpec:
        """Name checks differ per handler (routes.go): each passes its own status and text."""
        if not model or not NAME_RE.match(model):
            raise invalid
        spec = self.node.scheduler.lookup(model)
        if spec is None:
            raise not_found
        return spec

    @contextlib.contextmanager
    def _runner(self, spec: ModelSpec, opts: dict, keep_alive_ns: int | None) -> Iterator[Runner]:
        """scheduleRunner for the length of a request; keep_alive 0 unloads once the runner is idle."""
        runner = self.node.scheduler.schedule(spec, opts, keep_alive_ns)
        try:
            yield runner
        finally:
            self.node.scheduler.release(runner)
            if keep_alive_ns == 0:
                self.node.scheduler.unload(spec)

    def _generate(self, req: dict) -> None:
        model = req.get("model") or ""
        not_found = ApiError(404, f"model '{model}' not found")  # also for an invalid name, as Ollama does
        spec = self._resolve(model, not_found, not_found)
        keep_alive_ns = req["_keep_alive_ns"]
        prompt = req.get("prompt") or ""
        if prompt == "" and keep_alive_ns == 0:
            self.node.scheduler.unload(spec)
            self._send_json(200, self._final(model, "unload", response=""))
            return
        self._check_capability(spec, model, "generate", req)
        opts = parse_options(req.get("options"))
        with self._runner(spec, opts, keep_alive_ns) as runner:
            if prompt == "":
                self._send_json(200, self._final(model, "load", response=""))
                return
            pieces, reason = fake_tokens(spec.name, prompt, opts.get("num_predict"))
            context = [int(b) for b in hashlib.sha256(prompt.encode()).digest()[:16]]
            metrics = {"context": context, **self._metrics(runner, prompt, len(pieces))}
            self._reply(req, model, runner, pieces, _as_response, reason, metrics)

    def _chat(self, req: dict) -> None:
        model = req.get("model") or ""
        keep_alive_ns = req["_keep_alive_ns"]
        messages = req.get("messages") or []
        empty_message = {"role": "assistant", "content": ""}
        if not messages and keep_alive_ns == 0:  # the unload branch runs before the name checks
            not_found = ApiError(404, f"model '{model}' not found")
            self.node.scheduler.unload(self._resolve(model, not_found, not_found))
            self._send_json(200, self._final(model, "unload", message=empty_message))
            return
        spec = self._resolve(
            model, ApiError(400, "model is required"), ApiError(404, f"model '{model}' not found")
        )
        self._check_capability(spec, model, "chat", req)
        opts = parse_options(req.get("options"))
        with self._runner(spec, opts, keep_alive_ns) as runner:
            if not messages:
                self._send_json(200, self._final(model, "load", message=empty_message))
                return
            last = messages[-1].get("content", "") if isinstance(messages[-1], dict) else ""
            pieces, reason = fake_tokens(spec.name, str(last), opts.get("num_predict"))
            metrics = self._metrics(runner, str(last), len(pieces))
            self._reply(req, model, runner, pieces, _as_message, reason, metrics)

    @staticmethod
    def _check_capability(spec: ModelSpec, model: str, what: str, req: dict) -> None:
        if spec.embedding_only:
            raise ApiError(400, f"{go_quote(model)} does not support {what}")
        if req.get("think") and "thinking" not in spec.capabilities:
            raise ApiError(400, f"{go_quote(model)} does not support thinking")

    @staticmethod
    def _final(model: str, reason: str, **payload: Any) -> dict:
        return {"model": model, "created_at": created_at(), **payload, "done": True, "done_reason": reason}

    @staticmethod
    def _metrics(runner: Runner, prompt: str, eval_count: int) -> dict:
        rate = tokens_per_second(runner)
        prompt_count = max(1, len(prompt.split()))
        prompt_ns = int(prompt_count / (rate * 10) * 1e9)
        eval_ns = int(eval_count / rate * 1e9)
        return {
            "total_duration": prompt_ns + eval_ns + 250_000,
            "load_duration": 250_000,
            "prompt_eval_count": prompt_count,
            "prompt_eval_duration": prompt_ns,
            "eval_count": eval_count,
            "eval_duration": eval_ns,
        }

    def _reply(
        self,
        req: dict,
        model: str,
        runner: Runner,
        pieces: list[str],
        content: Callable[[str], dict],
        reason: str,
        metrics: dict,
    ) -> None:
        """Streamed NDJSON (default) or one object (stream:false), fields in Go's order. With
        inference_time_scale > 0 a reply takes its simulated time: a whole one before it is sent; a stream
        its prompt evaluation before the first chunk, then each token's share of eval_duration before that
        token's chunk, as Ollama sends each token when the runner produces it (see `_stream`)."""

        def chunk(text: str, done: bool) -> dict:
            body = {"model": model, "created_at": created_at(), **content(text), "done": done}
            return {**body, "done_reason": reason, **metrics} if done else body

        def stream() -> Iterator[dict]:
            yield from (chunk(piece, False) for piece in pieces)
            yield chunk("", True)

        if not req.get("stream", True):
            self._compute(runner, metrics["total_duration"])
            self._send_json(200, chunk("".join(pieces), True))
            return
        scale = self.node.inference_time_scale
        if scale <= 0:
            self._stream(stream())
            return
        per_token = scale * metrics["eval_duration"] / 1e9 / max(1, len(pieces))
        with self.node.scheduler.computing(runner):
            self._pause(scale * (metrics["total_duration"] - metrics["eval_duration"]) / 1e9)
            if self.node._stopping.is_set():
                raise ApiError(500, SHUTTING_DOWN)
            self._stream(stream(), pause=per_token)

    @staticmethod
    def _embed_inputs(req: dict) -> list[str]:
        """EmbedHandler checks the input before the model: a string or a list of strings."""
        raw = req.get("input")
        if raw is None or raw == "":
            return []
        if isinstance(raw, str):
            return [raw]
        if isinstance(raw, list) and all(isinstance(x, str) for x in raw):
            return list(raw)
        raise ApiError(400, "invalid input type")

    def _embed(self, req: dict) -> None:
        inputs = self._embed_inputs(req)
        model = req.get("model") or ""
        if not model:
            raise ApiError(404, "model '' not found")
        not_found = ApiError(404, f"model {go_quote(model)} not found, try pulling it first")
        spec = self._resolve(model, not_found, not_found)
        opts = parse_options(req.get("options"))
        with self._runner(spec, opts, req["_keep_alive_ns"]) as runner:
            if not inputs:
                self._send_json(200, {"model": model, "embeddings": []})
                return
            if req.get("truncate") is False and any(len(text.split()) > runner.num_ctx for text in inputs):
                raise ApiError(400, "the input length exceeds the context length")  # one word = one token
            dims = req.get("dimensions") or 0
            dims = (
                dims if isinstance(dims, int) and 0 < dims < spec.embedding_length else spec.embedding_length
            )
            vectors = [fake_embedding(spec.name, text, dims, True) for text in inputs]
            count = sum(max(1, len(text.split())) for text in inputs)
            reply = {"model": model, "embeddings": vectors, "total_duration": 1_000_000 + count * 50_000}
            self._compute(runner, reply["total_duration"])
            self._send_json(200, {**reply, "load_duration": 250_000, "prompt_eval_count": count})

    def _embeddings(self, req: dict) -> None:
        model = req.get("model") or ""
        spec = self._resolve(
            model,
            ApiError(400, "model is required"),
            ApiError(404, f"model {go_quote(model)} not found, try pulling it first"),
        )
        opts = parse_options(req.get("options"))
        with self._runner(spec, opts, req["_keep_alive_ns"]):
            prompt = req.get("prompt") or ""
            vector = fake_embedding(spec.name, prompt, spec.embedding_length, False) if prompt else []
            self._send_json(200, {"embedding": vector})


def _as_response(text: str) -> dict:
    return {"response": text}


def _as_message(text: str) -> dict:
    return {"message": {"role": "assistant", "content": text}}


# --------------------------------------------------------------------------------------------- cluster


class SimCluster:
    """Several SimNodes on ephemeral ports, for tests, benchmarks and the demo."""

    def __init__(self, configs: Iterable[dict]) -> None:
        self.nodes = [SimNode(**config) for config in configs]

    def start(self) -> SimCluster:
        for node in self.nodes:
            node.start()
        return self

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    @property
    def urls(self) -> list[str]:
        return [node.url for node in self.nodes]

    def __enter__(self) -> SimCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
