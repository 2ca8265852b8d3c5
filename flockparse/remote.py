"""RemoteCluster: a cluster that a running `serve` manages, seen through its control API.

One optimizer per cluster: a console attached with `--connect URL` runs no health monitor and no optimizer.
Every command goes to the serve's control API (flockparse/serve/control.py), and the serve's events come
back as server-sent events. RemoteCluster offers the methods the console uses on OllamaLoadBalancer, so the
console has one code path; what the balancer answers from memory (node list, counts for the toolbar,
optimizer status, priorities) comes from a mirror of `GET /status` refreshed in the background, so the
prompt never waits on the network.

Calls go through `ControlClient` (flockparse/control_client.py: total deadlines, reply caps, no redirects).
The event stream has no end, so there the deadline is an idle one: three heartbeats without a byte and the
stream is judged dead and opened again, with back-off; one notice when the serve goes away and one when it
is back.
"""

from __future__ import annotations

import dataclasses
import http.client
import json
import logging
import math
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from flockparse.agent import NodeState
from flockparse.control_client import (
    API_PREFIX,
    DEFAULT_SERVE_PORT,
    EVENT_SEQ_HEADER,
    INSTANCE_HEADER,
    KIB,
    MIB,
    TOKEN_ENV,
    Answer,
    Connection,
    ControlClient,
    RemoteAuthError,
    RemoteError,
    RemoteRejected,
    RemoteTimeout,
    parse_json,
    read_capped,
    serve_url,
)
from flockparse.events import Event, EventBus
from flockparse.transport import describe

__all__ = [
    "API_PREFIX",
    "DEFAULT_SERVE_PORT",
    "EVENT_SEQ_HEADER",
    "INSTANCE_HEADER",
    "TOKEN_ENV",
    "ControlClient",
    "RemoteAuthError",
    "RemoteCluster",
    "RemoteError",
    "RemoteRejected",
    "RemoteTimeout",
    "serve_url",
]

logger = logging.getLogger(__name__)

MAX_EVENT_LINE = 1 * MIB
STATUS_POLL_S = 2.0  # the mirror behind the toolbar; events wake it sooner
EVENTS_WAIT_S = 1.0  # after a command, how long its own events may take to arrive on the stream
RECONNECT_FIRST_S, RECONNECT_MAX_S = 0.2, 5.0
DEFAULT_HEARTBEAT_S = 15.0
CANCEL_POLL_S = 0.1
OPERATION_SLACK_S = 10.0  # on top of what the serve says its longest operation may take


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
        self._stream_conn: Connection | None = None
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
        """Stop the threads within a second (the open stream is shut so its read returns; they are daemon
        threads); safe to call twice."""
        self._stop.set()
        self._poll_wake.set()
        self.events.close()
        with self._lock:
            conn = self._stream_conn
        if conn is not None:
            conn.shut()
        deadline = time.monotonic() + 1.0  # a status call in flight ends at its own deadline, unwaited
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))

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
    def routing(self) -> str:
        """The serve's routing strategy (a call: the console asks only when a command needs it)."""
        return str(self.client.request("GET", "/routing").data.get("routing"))

    @routing.setter
    def routing(self, name: str) -> None:
        """Set on the serve; an unknown name is a ValueError (RemoteRejected), as on a local balancer."""
        self.client.request("PUT", "/routing", {"routing": name})

    def explain_route(self, model: str | None) -> dict[str, Any]:
        """`route MODEL` as the serve would route it."""
        return self.client.request("GET", "/route", query=[("model", model)] if model else []).data

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
        force: bool = False,
    ) -> list[dict]:
        body = _move_body(model, nodes, dry_run)
        if force:
            body["force"] = True
        return self._operation("/force_gpu", body, cancel)

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

    def cleanup(
        self, cancel: threading.Event | None = None, nodes: Iterable[str] | None = None, dry_run: bool = False
    ) -> list[dict]:
        body: dict[str, Any] = {"dry_run": dry_run}
        if nodes is not None:
            body["nodes"] = list(nodes)
        return self._operation("/cleanup", body, cancel)

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
                raw = read_capped(response, 64 * KIB)
                raise self.client.refusal(response.status, parse_json(raw), raw, "/events")
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
