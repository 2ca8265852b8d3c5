"""RemoteCluster: a cluster that a running `serve` manages, seen through its control API.

One optimizer per cluster: a console attached with `--connect URL` runs no health monitor and no optimizer.
Every command goes to the serve's control API (flockparse/serve/control.py), and the serve's events come
back as server-sent events. RemoteCluster offers the methods the console uses on OllamaLoadBalancer, so the
console has one code path; what the balancer answers from memory (node list, counts for the toolbar,
optimizer status, priorities) comes from a mirror of `GET /status` refreshed in the background, so the
prompt never waits on the network.

`ControlClient` follows the node transport's rules (flockparse/transport.py) for a peer we do not control,
with the standard library's http.client as the transport does: a TOTAL deadline per call (every socket read
gets only the time left, so a reply trickled byte by byte ends at the deadline; requests bounds each read,
not the call), replies read up to a cap, redirects never followed, failures as one phrase. The event stream
has no end, so there the deadline is an idle one: three heartbeats without a byte and the stream is judged
dead and opened again, with back-off; one notice when the serve goes away and one when it is back.
"""

from __future__ import annotations

import dataclasses
import http.client
import json
import logging
import math
import socket
import ssl
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode, urlsplit

from flockparse.agent import NodeState
from flockparse.events import Event, EventBus
from flockparse.transport import describe

logger = logging.getLogger(__name__)

API_PREFIX = "/flockparse/v1"
DEFAULT_SERVE_PORT = 11435
TOKEN_ENV = "FLOCKPARSE_TOKEN"
EVENT_SEQ_HEADER = "X-Flockparse-Event-Seq"  # the newest event emitted when a reply was built
INSTANCE_HEADER = "X-Flockparse-Instance"  # which run of the serve answered (a restart changes it)
KIB, MIB = 1024, 1024 * 1024
MAX_REPLY_BYTES = 64 * MIB  # a vram_report of thousands of nodes is megabytes; anything past this is refused
MAX_EVENT_LINE = 1 * MIB
READ_CHUNK = 64 * KIB
STATUS_POLL_S = 2.0  # the mirror behind the toolbar; events wake it sooner
EVENTS_WAIT_S = 1.0  # after a command, how long its own events may take to arrive on the stream
RECONNECT_FIRST_S, RECONNECT_MAX_S = 0.2, 5.0
DEFAULT_HEARTBEAT_S = 15.0
CANCEL_POLL_S = 0.1
OPERATION_SLACK_S = 10.0  # on top of what the serve says its longest operation may take
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


def _time_left(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("deadline passed")
    return left


class _DeadlineSocket(socket.socket):
    """Every read may only take the time left before `deadline` (the call's, or the stream's idle one)."""

    __slots__ = ("deadline",)

    def recv_into(self, buffer: Any, nbytes: int = 0, flags: int = 0) -> int:
        self.settimeout(_time_left(self.deadline))
        return super().recv_into(buffer, nbytes, flags)


class _DeadlineSSLSocket(ssl.SSLSocket):
    deadline = math.inf

    def recv_into(self, buffer: Any, nbytes: int | None = None, flags: int = 0) -> int:
        self.settimeout(_time_left(self.deadline))
        return super().recv_into(buffer, nbytes, flags)


class _Connection(http.client.HTTPConnection):
    """One connection per call (the control API is called rarely); its socket obeys `deadline`."""

    def __init__(self, host: str, port: int, deadline: float, tls: ssl.SSLContext | None) -> None:
        super().__init__(host, port)
        self.deadline, self.tls = deadline, tls
        # kept past http.client's close(): a reply read until the connection closes keeps reading from it
        self.stream_socket: socket.socket | None = None

    def connect(self) -> None:
        raw = socket.create_connection((self.host, self.port), timeout=_time_left(self.deadline))
        sock: socket.socket = _DeadlineSocket(raw.family, raw.type, raw.proto, fileno=raw.detach())
        sock.deadline = self.deadline  # type: ignore[attr-defined]
        sock.settimeout(_time_left(self.deadline))  # sending is bounded by the deadline too
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.tls is not None:
            try:
                sock = self.tls.wrap_socket(sock, server_hostname=self.host)
            except BaseException:
                sock.close()
                raise
            sock.deadline = self.deadline  # type: ignore[attr-defined]
        self.sock = self.stream_socket = sock

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

    def connection(self, deadline: float) -> _Connection:
        return _Connection(self.host, self.port, deadline, self._tls)

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
            raw = _read_capped(response, MAX_REPLY_BYTES)
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
        data = _parse(raw)
        if status >= 400:
            raise self.refusal(status, data, raw, path)
        if data is _NOT_JSON:
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


_NOT_JSON = object()


def _parse(raw: bytes) -> Any:
    """JSON, or _NOT_JSON (an empty body, text, JSON too deep or with numbers too long to read)."""
    try:
        return json.loads(raw.decode("utf-8", "replace")) if raw.strip() else _NOT_JSON
    except (ValueError, RecursionError):
        return _NOT_JSON


def _read_capped(response: http.client.HTTPResponse, limit: int) -> bytes:
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
        context.sslsocket_class = _DeadlineSSLSocket
        _TLS = context
    return _TLS


# ------------------------------------------------------------------------------------------ the cluster


@dataclass
class _Mirror:
    """What the serve's last `GET /status` said, and when (monotonic)."""

    status: dict = field(default_factory=dict)
    fetched_at: float = 0.0
    online: bool | None = None  # did the last status call work


class RemoteCluster:
    """The console's OllamaLoadBalancer, for a cluster a serve manages (see the module docstring).

    `connect()` reads the serve's status once (one-shot commands need nothing more); `start()` adds the
    event stream and the status mirror, on daemon threads; `close()` stops them within a second.
    """

    def __init__(
        self,
        url: str,
        token: str | None = None,
        timeout: float = 5.0,
        poll_seconds: float = STATUS_POLL_S,
        reconnect_max: float = RECONNECT_MAX_S,
    ) -> None:
        self.client = ControlClient(url, token, timeout)
        self.url = self.client.url
        self.events = EventBus()
        self.poll_seconds = poll_seconds
        self.reconnect_max = reconnect_max
        self._lock = threading.Lock()  # guards the mirror and the stream position below; never I/O
        self._mirror = _Mirror()
        self._priorities_read: list[str] | None = None  # what the getter last handed out (setter: the diff)
        self._stream_seen = threading.Condition(self._lock)
        self._stream_instance: str | None = None
        self._stream_seq = 0
        self._stream_live = False
        self._stop = threading.Event()
        self._poll_wake = threading.Event()
        self._stream_conn: _Connection | None = None
        self._threads: list[threading.Thread] = []

    # ------------------------------------------------------------------ lifecycle
    def connect(self) -> dict:
        """Read the serve's status (RemoteError when it cannot be read or is no flockparse serve)."""
        try:
            answer = self.client.request("GET", "/status")
        except RemoteRejected as exc:
            raise RemoteError(
                f"{self.url} is not a flockparse serve ({API_PREFIX}/status answered HTTP {exc.status})"
            ) from None
        if not isinstance(answer.data, dict) or answer.data.get("service") != "flockparse":
            raise RemoteError(f"{self.url} is not a flockparse serve (its status is not a serve's)")
        self._set_status(answer.data)
        return dict(answer.data)

    def start(self) -> None:
        """The event stream and the status mirror, each on a daemon thread (the interactive console)."""
        if self._threads or self._stop.is_set():
            return
        for target, name in ((self._read_events, "serve-events"), (self._poll_status, "serve-status")):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def close(self) -> None:
        """Stop the threads (the open stream is shut so its read returns); safe to call twice."""
        self._stop.set()
        self._poll_wake.set()
        self.events.close()
        with self._lock:
            conn = self._stream_conn
        if conn is not None:
            conn.shut()
        for thread in self._threads:
            thread.join(1.0)

    def __enter__(self) -> RemoteCluster:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def subscribe(self, callback: Callable[[Event], None]) -> Callable[[], None]:
        return self.events.subscribe(callback)

    # ------------------------------------------------------------------ the mirror (no network call)
    def _set_status(self, status: dict) -> None:
        with self._lock:
            self._mirror = _Mirror(status, time.monotonic(), True)

    def _status(self) -> dict:
        with self._lock:
            return self._mirror.status

    @property
    def version(self) -> str:
        return str(self._status().get("version", "?"))

    @property
    def node_timeout(self) -> float:
        """The serve's timeout per request to a node (the console says how long a report may wait)."""
        return float((self._status().get("timeouts") or {}).get("timeout", 5.0))

    @property
    def nodes(self) -> list[str]:
        return [str(url) for url in self._status().get("nodes") or []]

    @property
    def gpu_priority_models(self) -> list[str]:
        with self._lock:
            self._priorities_read = [str(p) for p in self._mirror.status.get("priority_models") or []]
            return list(self._priorities_read)

    @gpu_priority_models.setter
    def gpu_priority_models(self, models: list[str]) -> None:
        """Sent as a change (added, removed) against the list last read, so two consoles changing the list
        at once both keep their change."""
        with self._lock:
            read = self._priorities_read
            before = list(self._mirror.status.get("priority_models") or []) if read is None else list(read)
        added = [name for name in models if name not in before]
        removed = [name for name in before if name not in models]
        answer = self.client.request("POST", "/priorities", {"add": added, "remove": removed})
        self._update_status(priority_models=answer.data.get("priority_models", []))

    @property
    def check_interval(self) -> float:
        return float(self.optimizer_status().get("interval") or 0.0)

    @check_interval.setter
    def check_interval(self, seconds: float) -> None:
        answer = self.client.request("POST", "/optimizer/interval", {"seconds": seconds})
        self._update_status(optimizer=answer.data.get("optimizer", {}))

    @property
    def optimization_running(self) -> bool:
        return bool(self.optimizer_status().get("running"))

    @property
    def auto_optimize_gpu(self) -> bool:
        return self.optimization_running

    def summary(self) -> dict:
        """The serve's node counts (as OllamaLoadBalancer.summary) plus `serve`: {'url', 'online'}."""
        with self._lock:
            counts = dict(self._mirror.status.get("summary") or {})
            online = self._mirror.online
        return {**counts, "serve": {"url": self.url, "online": online}}

    def optimizer_status(self) -> dict:
        """The serve's optimizer status as last read; `next_pass_in` counts down from then."""
        with self._lock:
            status = dict(self._mirror.status.get("optimizer") or {})
            age = time.monotonic() - self._mirror.fetched_at
        if isinstance(status.get("next_pass_in"), int | float):
            status["next_pass_in"] = round(max(0.0, status["next_pass_in"] - age), 1)
        return status

    def _update_status(self, **changes: Any) -> None:
        """A command's reply carries the new optimizer status or priorities: the mirror takes them at once."""
        with self._lock:
            status = {**self._mirror.status, **changes}
            self._mirror = dataclasses.replace(self._mirror, status=status, fetched_at=time.monotonic())

    # ------------------------------------------------------------------ reads
    def node_states(self) -> list[NodeState]:
        """The serve's node states (as `nodes --json`), as NodeState objects."""
        names = {f.name for f in dataclasses.fields(NodeState)}
        rows = self.client.request("GET", "/nodes").data
        return [
            NodeState(**{k: v for k, v in row.items() if k in names})
            for row in rows if isinstance(row, dict) and isinstance(row.get("url"), str)
        ]  # fmt: skip

    def get_stats(self) -> dict:
        return self.client.request("GET", "/lb_stats").data

    def known_models(self) -> list[str]:
        return [str(name) for name in self.client.request("GET", "/known_models").data]

    def vram_report(self, nodes: Iterable[str] | None = None) -> list[dict]:
        """The serve asks its nodes; the wait is the serve's report bound plus a margin."""
        query = [("node", node) for node in nodes or ()]
        wait = float(self._status().get("report_timeout_s") or 3 * (self.node_timeout + 1)) + 5.0
        return self.client.request("GET", "/vram_report", query=query, timeout=wait).data

    # ------------------------------------------------------------------ actions
    def force_gpu_all_nodes(
        self,
        model: str,
        cancel: threading.Event | None = None,
        nodes: Iterable[str] | None = None,
        dry_run: bool = False,
    ) -> list[dict]:
        return self._operation("/force_gpu", _move_body(model, nodes, dry_run), cancel)

    def force_cpu_all_nodes(
        self,
        model: str,
        cancel: threading.Event | None = None,
        nodes: Iterable[str] | None = None,
        dry_run: bool = False,
    ) -> list[dict]:
        return self._operation("/force_cpu", _move_body(model, nodes, dry_run), cancel)

    def unload_all_nodes(
        self,
        model: str,
        cancel: threading.Event | None = None,
        nodes: Iterable[str] | None = None,
        dry_run: bool = False,
    ) -> list[dict]:
        return self._operation("/unload", _move_body(model, nodes, dry_run), cancel)

    def optimize_gpu_once(self, cancel: threading.Event | None = None, dry_run: bool = False) -> list[dict]:
        return self._operation("/optimizer/now", {"dry_run": dry_run}, cancel)

    def _start_gpu_optimization(self) -> bool:
        """Start the serve's optimizer; False if it was already running."""
        answer = self.client.request("POST", "/optimizer/on")
        self._update_status(optimizer=answer.data.get("optimizer", {}))
        self._await_events(answer)
        return bool(answer.data.get("changed"))

    def stop_gpu_optimization(self) -> bool:
        """Stop the serve's optimizer (for every console attached to it)."""
        answer = self.client.request("POST", "/optimizer/off")
        self._update_status(optimizer=answer.data.get("optimizer", {}))
        self._await_events(answer)
        return True

    def add_node(self, url: str, has_gpu: bool | None = None) -> Any:
        raise RemoteError("nodes are the serve's: change its --nodes or config file and restart it")

    def remove_node(self, url: str) -> bool:
        raise RemoteError("nodes are the serve's: change its --nodes or config file and restart it")

    def _operation(self, path: str, body: dict, cancel: threading.Event | None) -> Any:
        """A long call (moves, a pass): `cancel` set (Ctrl-C) asks the serve to cancel it, as a local
        cancel would; it returns once the serve has answered and this console has seen its events."""
        operation = uuid.uuid4().hex
        done = threading.Event()
        if cancel is not None:
            threading.Thread(
                target=self._cancel_when_set, args=(cancel, done, operation), name="serve-cancel", daemon=True
            ).start()
        limit = float(self._status().get("operation_timeout_s") or 900.0) + OPERATION_SLACK_S
        try:
            answer = self.client.request("POST", path, {**body, "operation": operation}, timeout=limit)
        except RemoteTimeout:
            self._send_cancel(operation)
            raise
        finally:
            done.set()
        self._await_events(answer)
        return answer.data

    def _cancel_when_set(self, cancel: threading.Event, done: threading.Event, operation: str) -> None:
        while not done.is_set():
            if cancel.wait(CANCEL_POLL_S):
                self._send_cancel(operation)
                return

    def _send_cancel(self, operation: str) -> None:
        try:
            self.client.request("POST", "/cancel", {"operation": operation})
        except RemoteError as exc:  # the operation ends at the serve's own deadline anyway
            logger.warning("could not cancel operation %s on %s: %s", operation, self.url, exc)

    def _await_events(self, answer: Answer) -> None:
        """Wait (bounded) until the stream has brought every event emitted before the reply, so a
        command's own move lines are muted while it runs, never printed after its summary."""
        if answer.event_seq is None:
            return
        deadline = time.monotonic() + EVENTS_WAIT_S
        with self._stream_seen:
            while (
                self._stream_live
                and self._stream_instance == answer.instance
                and self._stream_seq < answer.event_seq
                and not self._stop.is_set()
            ):
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                self._stream_seen.wait(left)

    # ------------------------------------------------------------------ background threads
    def _poll_status(self) -> None:
        while not self._stop.is_set():
            try:
                answer = self.client.request("GET", "/status", timeout=min(self.client.timeout, 3.0))
            except RemoteError as exc:
                logger.debug("status of %s: %s", self.url, exc)
                with self._lock:
                    self._mirror = dataclasses.replace(self._mirror, online=False)
            else:
                if isinstance(answer.data, dict):
                    self._set_status(answer.data)
            self._poll_wake.wait(self.poll_seconds)
            self._poll_wake.clear()

    def _read_events(self) -> None:
        """Read the stream; when it breaks, say so once, open it again with back-off, say when it is back."""
        pause = RECONNECT_FIRST_S
        state = _StreamState()
        while not self._stop.is_set():
            try:
                self._stream_once(state)
                cause = "it closed the event stream"
            except RemoteError as exc:
                cause = str(exc)
            except TimeoutError:
                cause = f"no event or heartbeat for {3 * state.heartbeat:g}s"
            except (OSError, http.client.HTTPException, ValueError) as exc:
                cause = describe(exc, state.live)[1]
            with self._stream_seen:
                self._stream_live = False
                self._stream_conn = None
            if self._stop.is_set():
                return
            if state.live:  # it was up: one notice, then quiet retries
                state.live, state.lost = False, True
                pause = RECONNECT_FIRST_S
                self._emit_local("serve_lost", f"lost the serve at {self.url} ({cause}); reconnecting...")
            self._stop.wait(pause)
            pause = min(pause * 2, self.reconnect_max)

    def _stream_once(self, state: _StreamState) -> None:
        conn = self.client.connection(time.monotonic() + self.client.timeout)
        with self._lock:
            self._stream_conn = conn
        try:
            conn.connect()
            headers = {**self.client.headers(), "Accept": "text/event-stream"}
            if state.last_id:
                headers["Last-Event-ID"] = state.last_id
            conn.request("GET", API_PREFIX + "/events", headers=headers)
            response = conn.getresponse()
            if response.status != 200:
                raw = _read_capped(response, 64 * KIB)
                raise self.client.refusal(response.status, _parse(raw), raw, "/events")
            fields: dict[str, str] = {}
            data: list[str] = []
            while not self._stop.is_set():
                conn.push_deadline(time.monotonic() + 3 * state.heartbeat)
                line = response.readline(MAX_EVENT_LINE + 1)
                if not line:
                    return
                if len(line) > MAX_EVENT_LINE:
                    raise RemoteError("the serve sent an event line too long to read")
                text = line.decode("utf-8", "replace").rstrip("\r\n")
                if text:
                    name, _, value = text.partition(":")
                    if name == "data":
                        data.append(value.removeprefix(" "))
                    elif name:
                        fields[name] = value.removeprefix(" ")
                    continue
                if data:
                    self._dispatch(state, fields, "\n".join(data))
                fields, data = {}, []
        finally:
            conn.close()

    def _dispatch(self, state: _StreamState, fields: dict[str, str], data: str) -> None:
        try:
            payload = json.loads(data)
        except (ValueError, RecursionError):
            logger.warning("the serve at %s sent an event that is not JSON", self.url)
            return
        if not isinstance(payload, dict):
            return
        if fields.get("event") == "hello":
            self._hello(state, payload)
            return
        if fields.get("id"):
            state.last_id = fields["id"]
        event = _event(payload)
        seq = payload.get("seq")
        with self._stream_seen:
            if isinstance(seq, int):
                self._stream_seq = max(self._stream_seq, seq)
            self._stream_seen.notify_all()
        if event is not None:
            self.events.emit(event)
            self._poll_wake.set()

    def _hello(self, state: _StreamState, hello: dict) -> None:
        instance = str(hello.get("instance") or "")
        heartbeat = hello.get("heartbeat_s")
        if isinstance(heartbeat, int | float) and 0 < heartbeat < 3600:
            state.heartbeat = float(heartbeat)
        restarted = state.instance is not None and instance != state.instance
        if restarted:
            state.last_id = None  # its events are numbered afresh
        with self._stream_seen:
            self._stream_instance = instance
            seq = hello.get("seq")
            self._stream_seq = seq if isinstance(seq, int) else 0
            self._stream_live = True
            self._stream_seen.notify_all()
        state.instance, state.live = instance, True
        self._poll_wake.set()
        if state.lost:
            state.lost = False
            again = " (it restarted: what happened meanwhile is not shown)" if restarted else ""
            self._emit_local("serve_back", f"the serve at {self.url} is back{again}")

    def _emit_local(self, kind: str, message: str) -> None:
        self.events.emit(Event(kind, message=message, data={"serve": self.url}))
        self._poll_wake.set()  # the toolbar says so at once too


@dataclass
class _StreamState:
    """The events thread's own bookkeeping (no other thread reads it)."""

    heartbeat: float = DEFAULT_HEARTBEAT_S
    instance: str | None = None
    last_id: str | None = None
    live: bool = False
    lost: bool = False


def _move_body(model: str, nodes: Iterable[str] | None, dry_run: bool) -> dict:
    body: dict[str, Any] = {"model": model, "dry_run": dry_run}
    if nodes is not None:
        body["nodes"] = list(nodes)
    return body


def _event(payload: dict) -> Event | None:
    """An Event from the stream's JSON; None when it is not one (the fields are typed as the core's)."""
    kind = payload.get("kind")
    if not isinstance(kind, str) or not kind:
        return None

    def text(key: str) -> str | None:
        value = payload.get(key)
        return value if isinstance(value, str) else None

    data = payload.get("data")
    when = payload.get("time")
    return Event(
        kind,
        node=text("node"),
        model=text("model"),
        message=text("message") or "",
        data=data if isinstance(data, dict) else {},
        time=float(when) if isinstance(when, int | float) and math.isfinite(when) else time.time(),
    )
