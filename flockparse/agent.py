"""One owner per node: `NodeAgent` holds a node's state, orders its status replies and runs its moves.

Why one owner (shared/review/code-review.md, section 5): work on a node used to be coordinated by two shared
thread pools, a registry of move Events, a pass flag and a set of checks in flight, and cancellation,
shutdown and the order of results fell between them. Here:
- every status request takes a sequence number when it is *sent*; a reply older than the newest one
  recorded is dropped, so a late reply never reports a dead node `online`;
- status reads run on daemon threads (one monitor check in flight per node): the balancer hands the agent
  a submit function of its checker pool (flockparse/workers.py, which grows past hung nodes), so a hung
  node delays only itself and never a report about another node;
- moves go through the node's `MoveLane`: one daemon worker, one move at a time (as Ollama loads one model
  at a time), the user's moves ahead of the optimizer's queued ones; `close()` cancels what is queued and
  signals what runs, and no daemon thread holds the interpreter at exit.

The agent's lock guards its state only; no I/O runs under it.
"""

from __future__ import annotations

import dataclasses
import itertools
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from flockparse import gpu_state as gs
from flockparse.events import Event
from flockparse.results import MoveResult, Reason
from flockparse.room import VramBounds
from flockparse.rules import LOCATION_GPU, is_off_gpu, matches_priority, model_key, parse_expires_at
from gpu_controller import RawStatus

RESTART_MARGIN_S = 10.0  # models gone this long before their expiry did not expire: the node restarted
INSTALLED_REFRESH_SECONDS = 180.0  # how often the monitor re-reads /api/tags (for completion only)
UNMOVABLE_REASONS = frozenset({"pinned_by_modelfile", "not_controllable"})
USER_PRIORITY, OPTIMIZER_PRIORITY = 0, 1  # lane order: a user's move goes before queued optimizer moves
INTERNAL_FIELDS = (  # bookkeeping, not for users
    "vram_when_lost",
    "installed_known",
    "cpu_landings",
    "vram_bounds",
    "gpu_oom_at",
    "model_sizes_mb",
    "in_flight_models",
)
_RECORDED: dict = {}  # fold_if_unchanged(status=False): recorded, no status built


@dataclass
class NodeState:
    """What is known about one node; handed out as copies (`NodeAgent.snapshot`)."""

    url: str
    online: bool | None = None  # None until the first check
    gpu: str = gs.GPU_UNKNOWN  # yes | no | unknown | lost (gpu_state.py): only evidence or configuration
    has_gpu: bool | None = None  # the same as a tri-state: True, False (no or lost), None (unknown)
    declared_gpu: bool | None = None
    gpu_evidence: str = ""
    gpu_seen: bool = False  # a GPU was seen here once: a load landing in RAM now means it was lost
    gpu_lost_since: float | None = None  # time.time() the current loss began; None when not lost
    vram_when_lost: list[str] = field(default_factory=list)  # models in VRAM when the loss was seen
    cpu_landings: int = 0  # all-layers loads in RAM in a row (Ollama < 0.30 needs two to conclude)
    ollama_version: str | None = None
    previous_gpu_models: list[str] = field(default_factory=list)  # on its GPU before it restarted
    unmovable: dict[str, dict] = field(default_factory=dict)  # model key -> {"reason", "message"}
    latency_ms: float | None = None
    last_error: str | None = None
    last_seen: float | None = None  # time.time() of the last good reply
    stale: bool = False  # models are the last known ones, the node is not answering
    requests: int = 0
    errors: int = 0
    in_flight: int = 0
    models: list[dict] = field(default_factory=list)
    installed: list[str] = field(default_factory=list)
    installed_known: bool = False  # /api/tags was read successfully at least once
    vram_bounds: VramBounds = field(default_factory=VramBounds)  # what its GPU holds at least / at most
    model_sizes_mb: dict[str, float] = field(default_factory=dict)  # model key -> its size when last loaded
    in_flight_models: dict[str, int] = field(default_factory=dict)  # model key -> routed requests running
    gpu_oom_at: dict[str, float] = field(default_factory=dict)  # model key -> time.monotonic() a load to GPU
    # ran out of memory (Ollama had unloaded every other model for its retry: it did not fit even alone)

    @property
    def reports_estimates(self) -> bool:
        """Ollama < 0.30: /api/ps figures are estimates, and one RAM landing proves nothing."""
        return gs.reports_estimates(self.ollama_version)

    def as_dict(self) -> dict[str, Any]:
        """The public view (`nodes --json`): the state plus `estimates`, without bookkeeping."""
        data = dataclasses.asdict(self)
        for internal in INTERNAL_FIELDS:
            data.pop(internal, None)
        data["estimates"] = self.reports_estimates
        return data


@dataclass(frozen=True)
class Folded:
    """What recording one status reply changed: events to emit, and what the optimizer should do."""

    events: tuple[Event, ...] = ()
    fresh_start: bool = False  # came back or restarted: old back-offs no longer apply
    warm_up: bool = False  # came up or restarted: load what it should hold
    needs_pass: bool = False  # a priority model newly off the GPU


class NodeAgent:
    """The one owner of a node (see the module docstring)."""

    def __init__(
        self,
        url: str,
        controller: Any,
        declared_gpu: bool | None = None,
        closed: threading.Event | None = None,
        retry_seconds: float = 5.0,
        submit: Callable[[Callable[[], Any]], Future] | None = None,
    ) -> None:
        self.url = url
        self._submit = submit  # runs a monitor check (None: a daemon thread of its own per check)
        self.retry_seconds = retry_seconds  # a failed /api/tags is asked again this soon
        self.controller = controller
        self._closed = closed or threading.Event()
        self._lock = threading.Lock()
        self._state = NodeState(url=url, declared_gpu=declared_gpu)
        _reset_gpu_evidence(self._state)
        self._sent = 0  # sequence number of the newest status request sent
        self._recorded = 0  # ... and of the newest reply recorded
        self._models_sent_at = 0.0  # time.monotonic() the request behind `models` was sent
        self._checking = False  # a monitor check is in flight
        self._last_body: bytes | None = None  # the /api/ps body behind the state (None: parse the next one)
        self._last_status: dict = {}  # ... and its status dict, models left out (they are in the state)
        self._version_reading = False  # an /api/version read is in flight
        self._installed_at = -1e9  # time.monotonic() of the last /api/tags attempt
        self._installed_ok = False  # ... and whether it worked
        self.lane = MoveLane(url, self._closed)

    # ------------------------------------------------------------------ state
    def snapshot(self) -> NodeState:
        with self._lock:
            state = self._state
            return dataclasses.replace(
                state,
                models=[dict(m) for m in state.models],
                installed=list(state.installed),
                previous_gpu_models=list(state.previous_gpu_models),
                vram_when_lost=list(state.vram_when_lost),
                unmovable={k: dict(v) for k, v in state.unmovable.items()},
                model_sizes_mb=dict(state.model_sizes_mb),
                in_flight_models=dict(state.in_flight_models),
                gpu_oom_at=dict(state.gpu_oom_at),
            )

    @property
    def online(self) -> bool | None:
        """The node's up/down verdict, without copying its state (the monitor asks this often)."""
        with self._lock:
            return self._state.online

    def counts(self) -> tuple[bool | None, bool | None, str, bool]:
        """(online, has_gpu, gpu verdict, stale) without copying the state: the toolbar's summary."""
        with self._lock:
            state = self._state
            return state.online, state.has_gpu, state.gpu, state.stale

    # ------------------------------------------------------------------ status reads
    def _take_seq(self) -> tuple[int, float]:
        with self._lock:
            self._sent += 1
            return self._sent, time.monotonic()

    def read_raw(self) -> tuple[int, float, RawStatus]:
        """One /api/ps read on the caller's thread: (sequence, time sent, the reply as received)."""
        seq, sent_at = self._take_seq()
        return seq, sent_at, self.controller.read_status_raw(self.url)

    def read_status(self) -> tuple[int, float, dict]:
        """One /api/ps read on the caller's thread: (sequence, time sent, status). Never raises."""
        seq, sent_at, raw = self.read_raw()
        return seq, sent_at, self.controller.status_from_raw(raw)

    def fetch(self, done: Callable[[int, float, RawStatus], None]) -> None:
        """Send an /api/ps read now, without a thread of its own (the status poller); `done(seq, sent_at,
        raw)` runs on the poller's thread, or on a worker for a node the poller cannot read (https)."""
        seq, sent_at = self._take_seq()
        if not self.controller.poll_status(self.url, lambda raw: done(seq, sent_at, raw)):
            self._run(lambda: done(seq, sent_at, self.controller.read_status_raw(self.url)))

    def fold_if_unchanged(self, seq: int, sent_at: float, raw: RawStatus, status: bool = True) -> dict | None:
        """The steady state's whole cost: a reply byte for byte the same as the last one recorded, from a
        node that is online, only says the node is still there. Returns its status (a copy of the last
        one), or None when it must be parsed and recorded (`fold`)."""
        with self._lock:
            state = self._state
            if (
                raw.error is not None
                or raw.http_status != 200
                or self._last_body is None
                or raw.body != self._last_body
                or state.online is not True
                or seq <= self._recorded
                or self._closed.is_set()
            ):
                return None
            self._recorded, self._models_sent_at = seq, sent_at
            state.last_seen, state.latency_ms = time.time(), raw.latency_ms
            if not status:  # the monitor's check only needs to know it was recorded
                return _RECORDED
            copy = dict(self._last_status)
            copy["models"] = [dict(m) for m in state.models]
            copy["latency_ms"], copy["requested_at"] = raw.latency_ms, raw.started
            return copy

    def fold(self, seq: int, sent_at: float, raw: RawStatus, patterns: list[str]) -> tuple[Folded, dict]:
        """Record a read (the light path when unchanged): what it changed, and its status."""
        status = self.fold_if_unchanged(seq, sent_at, raw)
        if status is not None:
            return Folded(), status
        status = self.controller.status_from_raw(raw)
        return self.record(seq, sent_at, status, patterns, raw.body), status

    def check(self, patterns: list[str]) -> Future[Folded] | None:
        """A monitor check: an /api/ps read through the status poller, then /api/tags and /api/version when
        due, the same way (no thread waits on a node); the replies are parsed and recorded on a worker only
        when the status changed. None when one is already in flight: a hung node has one check pending,
        never a growing pile."""
        with self._lock:
            if self._checking or self._closed.is_set():
                return None
            self._checking = True
        future: Future[Folded] = Future()

        def settle(work: Callable[[], Folded]) -> None:
            try:
                folded = work()
            except BaseException as error:  # never leave the node unchecked for good
                with self._lock:
                    self._checking = False
                future.set_exception(error)
                return
            with self._lock:
                self._checking = False
            future.set_result(folded)

        def on_reply(seq: int, sent_at: float, raw: RawStatus) -> None:
            extras = self._extras_due() if raw.error is None and raw.http_status == 200 else []
            if not extras and self.fold_if_unchanged(seq, sent_at, raw, status=False) is not None:
                settle(Folded)
                return

            def fold(got: dict[str, RawStatus]) -> None:
                self._run(lambda: settle(lambda: self._fold_check(seq, sent_at, raw, got, patterns)))

            self._get_all(extras, fold)

        self.fetch(on_reply)
        return future

    def _run(self, work: Callable[[], Any]) -> None:
        if self._submit is not None:
            self._submit(work)
        else:
            run_daemon(work, f"check-{self.url}")

    def _extras_due(self) -> list[str]:
        """What a check reads besides /api/ps: /api/tags when due, /api/version for a node not known
        online or whose version is unknown."""
        with self._lock:
            version = self._state.online is not True or self._state.ollama_version is None
            version = version and not self._version_reading  # one read at a time (see ensure_version)
            self._version_reading = self._version_reading or version
        return ["/api/tags"] * self._installed_due() + ["/api/version"] * version

    def _get_all(self, paths: list[str], done: Callable[[dict[str, RawStatus]], None]) -> None:
        """GET `paths` one after the other through the poller (no thread waits), then `done(replies)`."""
        got: dict[str, RawStatus] = {}

        def step(index: int) -> None:
            if index == len(paths):
                done(got)
                return
            path = paths[index]

            def keep(raw: RawStatus) -> None:
                got[path] = raw
                step(index + 1)

            if not self.controller.poll_status(self.url, keep, path):
                self._run(lambda: keep(self.controller.get_raw(self.url, path)))

        step(0)

    def _fold_check(
        self, seq: int, sent_at: float, raw: RawStatus, extras: dict[str, RawStatus], patterns: list[str]
    ) -> Folded:
        """A check's replies recorded: the installed list first (a node coming up gets a pass that needs
        it), the version, then the status."""
        if "/api/tags" in extras:
            self.record_installed(self.controller.installed_from_raw(extras["/api/tags"]))
        if "/api/version" in extras:
            version = self.controller.version_from_raw(extras["/api/version"])
            with self._lock:
                self._version_reading = False
                if version is not None:
                    self._state.ollama_version = version
        return self.fold(seq, sent_at, raw, patterns)[0]

    def _installed_due(self) -> bool:
        with self._lock:
            wait = INSTALLED_REFRESH_SECONDS if self._installed_ok else self.retry_seconds
            return self._state.online is not True or time.monotonic() - self._installed_at >= wait

    def ensure_version(self) -> None:
        """Read /api/version when the node comes up or it is not known yet; one read at a time, whoever
        saw the node first (the monitor, a report or a pass)."""
        with self._lock:
            due = self._state.online is not True or self._state.ollama_version is None
            if not due or self._version_reading:
                return
            self._version_reading = True
        version = None
        try:
            version = self.controller.version(self.url)
        finally:
            with self._lock:
                self._version_reading = False
                if version is not None:
                    self._state.ollama_version = version

    def record_installed(self, reply: dict) -> None:
        """A failed read is retried at the next check, never trusted as an empty list for 3 minutes."""
        with self._lock:
            self._installed_at = time.monotonic()
            self._installed_ok = "error" not in reply
            if self._installed_ok:
                self._state.installed = [model_key(name) for name in reply.get("models", [])]
                self._state.installed_known = True

    def installed(self) -> set[str]:
        """The installed models, read now if no read ever worked."""
        with self._lock:
            if self._state.installed_known:
                return set(self._state.installed)
        self.record_installed(self.controller.list_installed(self.url))
        with self._lock:
            return set(self._state.installed)

    def record(
        self, seq: int, sent_at: float, status: dict, patterns: list[str], body: bytes | None = None
    ) -> Folded:
        """Fold a status reply into the state, unless a newer one was recorded already. `body`: the reply
        as received, so that the next identical one takes the light path (`fold_if_unchanged`)."""
        with self._lock:
            if seq <= self._recorded or self._closed.is_set():
                return Folded()
            self._recorded = seq
            self._last_body = None
            if "error" in status:
                return Folded(events=tuple(self._record_failure(str(status["error"]))))
            folded = self._record_success(sent_at, status, patterns)
            self._last_body, self._last_status = body, {**status, "models": []}
            return folded

    def _record_failure(self, error: str) -> list[Event]:
        """Lock held. The node keeps its last known models, now stale."""
        state = self._state
        was_online = state.online
        state.online, state.last_error = False, error
        state.stale = state.last_seen is not None
        if was_online is False:
            return []
        return [
            Event("node_down", node=self.url, message=f"{self.url} is down: {error}", data={"error": error})
        ]

    def _record_success(self, sent_at: float, status: dict, patterns: list[str]) -> Folded:
        """Lock held."""
        state = self._state
        was_online = state.online
        previous_models = state.models
        previous_sent_at, self._models_sent_at = self._models_sent_at, sent_at
        state.online, state.last_error, state.stale = True, None, False
        state.last_seen = time.time()
        state.latency_ms = status.get("latency_ms", state.latency_ms)
        state.models = [dict(m) for m in status.get("models", [])]
        _note_sizes(state)
        # every model gone before its time: a restart no health check saw (or all unloaded by hand); our own
        # moves and unloads make models vanish too, so they do not count
        restarted = (
            was_online is True
            and _looks_restarted(previous_models, state.models)
            and not self.controller.changed_models_since(self.url, previous_sent_at)
        )
        if was_online is False or restarted:
            self._fresh_start(previous_models)
        events: list[Event] = []
        placed = _placements(state.models)
        if placed != _placements(previous_models):
            events.append(_placements_event(self.url, placed, _placements(previous_models)))
        in_vram = {model_key(m["name"]) for m in state.models if _in_vram(m)}
        if state.gpu != gs.GPU_LOST and in_vram:
            events += _note_gpu_seen(state, gs.EVIDENCE_VRAM)
        elif in_vram - set(state.vram_when_lost):
            # a lost GPU's old runners may still hold VRAM; a model in VRAM that was not loaded when the
            # loss was seen is a new runner on a working GPU (Ollama restarted between two checks)
            events += _note_gpu_seen(state, gs.EVIDENCE_NEW_VRAM)
        if restarted:
            message = (
                f"{self.url} has nothing loaded any more, though its models had time left: Ollama restarted "
                "(or every model was unloaded by hand)"
            )
            restart = Event("node_restarted", node=self.url, message=message)
            return Folded((restart, *events), fresh_start=True, warm_up=True, needs_pass=True)
        if was_online is True:
            fell = _priority_model_fell_off_gpu(previous_models, state.models, patterns)
            return Folded(tuple(events), needs_pass=fell)
        up = Event(
            "node_up", node=self.url, message=f"{self.url} is online", data={"latency_ms": state.latency_ms}
        )
        return Folded((up, *events), fresh_start=was_online is False, warm_up=True, needs_pass=True)

    def _fresh_start(self, previous_models: list[dict]) -> None:
        """Lock held. The node came back or restarted: remember what was on its GPU (the warm-up of glob
        priorities brings those back), forget Modelfile verdicts, and ask a no/lost GPU verdict again."""
        state = self._state
        on_gpu = [model_key(m["name"]) for m in previous_models if m.get("location") == LOCATION_GPU]
        if on_gpu:
            state.previous_gpu_models = on_gpu
        state.unmovable.clear()
        state.cpu_landings = 0
        if state.gpu in (gs.GPU_NO, gs.GPU_LOST):
            _reset_gpu_evidence(state, gs.EVIDENCE_RESTARTED)

    # ------------------------------------------------------------------ evidence from moves and probes
    def record_move(
        self, model: str, result: MoveResult, exporter_gpus: int | None = None, target: str = "GPU"
    ) -> list[Event]:
        """Moves are evidence: a load in VRAM proves a GPU; an all-layers load in RAM proves none, or that
        the GPU was lost when one was seen before (or the node's exporter lists one: `exporter_gpus`).
        Modelfile pins and MLX models are remembered."""
        with self._lock:
            self._last_body = None  # the verdict may have changed: fold the next reply in full
            state = self._state
            events: list[Event] = []
            if result.reason == Reason.NO_GPU:
                events = _note_cpu_landing(state, exporter_gpus)
            elif result.success and result.location == LOCATION_GPU and result.reason != Reason.ALREADY:
                events = _note_gpu_seen(state, gs.EVIDENCE_LOAD_VRAM)
            key = model_key(model)
            if result.reason == Reason.OUT_OF_MEMORY and target == "GPU":
                state.gpu_oom_at[key] = time.monotonic()
            elif result.success and result.location == LOCATION_GPU:
                state.gpu_oom_at.pop(key, None)
            if result.success and result.evicted:
                _learn_ceiling(state, key, result)
            if result.reason in UNMOVABLE_REASONS:
                state.unmovable[key] = {"reason": str(result.reason), "message": result.message}
            elif result.success:
                state.unmovable.pop(key, None)
            return events

    def record_probe(self, result: dict, exporter_gpus: int | None = None) -> list[Event]:
        with self._lock:
            self._last_body = None
            if result["gpu"] is True:
                return _note_gpu_seen(self._state, gs.EVIDENCE_LOAD_VRAM)
            if result["gpu"] is False:
                return _note_cpu_landing(self._state, exporter_gpus)
            return []

    def record_exporter(self, gpu_count: int) -> list[Event]:
        """The GPUs a fresh scrape of the node's exporter lists are evidence too (exporter_verdict)."""
        with self._lock:
            return _note_exporter(self._state, gpu_count)

    # ------------------------------------------------------------------ routed requests
    def request_started(self, model: str | None = None) -> bool:
        """A routed request began; with its model, that model counts as busy (never evicted meanwhile)."""
        with self._lock:
            self._state.requests += 1
            self._state.in_flight += 1
            if model:
                key = model_key(model)
                self._state.in_flight_models[key] = self._state.in_flight_models.get(key, 0) + 1
            return True

    def request_finished(self, node_error: str | None, model: str | None = None) -> bool:
        """A node's own failure counts as an error; a caller's rejected request (4xx) does not. True when
        that was the last request running on `model` (it may be evicted again)."""
        idle = False
        with self._lock:
            self._state.in_flight -= 1
            if model:
                key, busy = model_key(model), self._state.in_flight_models
                idle = busy.get(key, 0) <= 1
                if idle:
                    busy.pop(key, None)
                else:
                    busy[key] -= 1
            if node_error is not None:
                self._state.errors += 1
                self._state.last_error = node_error
        return idle

    def close(self) -> None:
        self.lane.close()


class MoveLane:
    """One node's moves, one at a time, on one daemon worker started on demand (it ends when idle).

    `submit(work, cancel, priority)` queues `work(cancel)` and returns a Future of its result. `close()`
    cancels what is queued (their futures end with a `cancelled` result at once) and sets the cancel
    Event of the move that runs, so it stops at its next step.
    """

    def __init__(self, url: str, closed: threading.Event) -> None:
        self.url = url
        self._closed = closed
        self._lock = threading.Lock()
        self._queue: queue.PriorityQueue[tuple[int, int, _Job]] = queue.PriorityQueue()
        self._order = itertools.count()
        self._worker_alive = False
        self._running: _Job | None = None

    def submit(
        self, work: Callable[[threading.Event], Any], cancel: threading.Event | None, priority: int
    ) -> Future[Any]:
        job = _Job(work, cancel or threading.Event(), Future())
        with self._lock:
            if self._closed.is_set():
                job.future.set_result(_cancelled(self.url))
                return job.future
            self._queue.put((priority, next(self._order), job))
            start = not self._worker_alive
            self._worker_alive = True
        if start:
            threading.Thread(target=self._work, name=f"moves-{self.url}", daemon=True).start()
        return job.future

    def _work(self) -> None:
        while True:
            with self._lock:
                try:
                    _, _, job = self._queue.get_nowait()
                except queue.Empty:
                    self._worker_alive = False
                    return
                self._running = job
            try:
                result = (
                    _cancelled(self.url)
                    if job.cancel.is_set() or self._closed.is_set()
                    else job.work(job.cancel)
                )
                job.future.set_result(result)
            except BaseException as error:  # the work promises not to raise; never lose the worker
                job.future.set_exception(error)
            finally:
                with self._lock:
                    self._running = None

    @property
    def busy(self) -> bool:
        with self._lock:
            return self._running is not None or not self._queue.empty()

    def close(self) -> None:
        with self._lock:
            running = self._running
            pending = []
            while True:
                try:
                    pending.append(self._queue.get_nowait()[2])
                except queue.Empty:
                    break
        if running is not None:
            running.cancel.set()
        for job in pending:
            job.cancel.set()
            job.future.set_result(_cancelled(self.url))


@dataclass
class _Job:
    work: Callable[[threading.Event], Any]
    cancel: threading.Event
    future: Future


def _cancelled(url: str) -> MoveResult:
    return MoveResult(False, f"cancelled: {url} is closing", Reason.CANCELLED)


def run_daemon(work: Callable[[], Any], name: str) -> Future:
    """Run `work` on a new daemon thread (it never holds the interpreter at exit); a Future of its result."""
    future: Future = Future()

    def run() -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            future.set_result(work())
        except BaseException as error:
            future.set_exception(error)

    threading.Thread(target=run, name=name, daemon=True).start()
    return future


# --------------------------------------------------------------------------------------------- verdict rules
def _set_gpu(state: NodeState, gpu: str, evidence: str) -> None:
    state.gpu, state.has_gpu, state.gpu_evidence = gpu, gs.has_gpu_flag(gpu), evidence


def _reset_gpu_evidence(state: NodeState, evidence: str = "") -> None:
    """Back to what configuration says, or unknown: evidence must be gathered again."""
    if state.declared_gpu is None:
        _set_gpu(state, gs.GPU_UNKNOWN, evidence)
    else:
        _set_gpu(state, gs.GPU_YES if state.declared_gpu else gs.GPU_NO, gs.EVIDENCE_DECLARED)
    if state.declared_gpu:
        state.gpu_seen = True


def _note_gpu_seen(state: NodeState, evidence: str) -> list[Event]:
    """A GPU is there; a loss in progress ends (one `gpu_back` event)."""
    state.cpu_landings, state.gpu_seen = 0, True
    events = []
    if state.gpu_lost_since is not None:
        lost_for = round(time.time() - state.gpu_lost_since, 1)
        state.gpu_lost_since = None
        message = f"{state.url} has its GPU again ({evidence})"
        events.append(Event("gpu_back", node=state.url, message=message, data={"lost_for_s": lost_for}))
    _set_gpu(state, gs.GPU_YES, evidence)
    return events


def _note_cpu_landing(state: NodeState, exporter_gpus: int | None = None) -> list[Event]:
    """An all-layers load landed in RAM: a CPU-only node, or a lost GPU (one `gpu_lost` event per loss,
    however many loads land in RAM until the GPU is seen again); gpu_state.landing_verdict decides."""
    state.cpu_landings += 1
    verdict = gs.landing_verdict(state.gpu_seen, state.cpu_landings, state.reports_estimates, exporter_gpus)
    if verdict is None:
        state.gpu_evidence = gs.EVIDENCE_ONE_LANDING
        return []
    if verdict == gs.GPU_NO:
        _set_gpu(state, gs.GPU_NO, gs.EVIDENCE_RAM)
        return []
    if exporter_gpus and not state.gpu_seen:
        return _mark_lost(state, gs.EVIDENCE_LOST_EXPORTER)
    return _mark_lost(state, gs.EVIDENCE_LOST)


def _note_exporter(state: NodeState, gpu_count: int) -> list[Event]:
    """The exporter's GPU list: `no` when it lists none, `lost` when it lists one Ollama does not use."""
    change = gs.exporter_verdict(state.gpu, state.gpu_evidence, state.gpu_seen, gpu_count)
    if change is None:
        return []
    gpu, evidence = change
    if gpu == gs.GPU_LOST:
        return _mark_lost(state, evidence)
    _set_gpu(state, gpu, evidence)
    return []


def _mark_lost(state: NodeState, evidence: str) -> list[Event]:
    """The node's GPU is lost: one `gpu_lost` event per loss (none while one is in force)."""
    _set_gpu(state, gs.GPU_LOST, evidence)
    if state.gpu_lost_since is not None:
        return []
    state.gpu_lost_since = time.time()
    state.vram_when_lost = [model_key(m["name"]) for m in state.models if _in_vram(m)]
    remedy = gs.lost_remedy_text(state.url)
    what = (
        "its GPU exporter lists a GPU, but a load with every layer on the GPU landed in RAM"
        if evidence == gs.EVIDENCE_LOST_EXPORTER
        else "a load with every layer on the GPU landed in RAM"
    )
    message = f"{state.url} lost its GPU: {what}. {remedy}"
    return [Event("gpu_lost", node=state.url, message=message, data={"remedy": remedy})]


def _note_sizes(state: NodeState) -> None:
    """Lock held. What the loaded models hold now is VRAM the GPU has (the floor), and each model's size is
    what it will need again (room.py)."""
    held, on_gpu = 0.0, []
    for m in state.models:
        size = m.get("size_mb")
        if isinstance(size, (int, float)) and size > 0:
            state.model_sizes_mb[model_key(m["name"])] = float(size)
        if not m.get("stopping"):
            held += float(m.get("vram_mb") or 0.0)
            if m.get("location") == LOCATION_GPU:
                on_gpu.append(model_key(m["name"]))
    state.vram_bounds = state.vram_bounds.seen(held, on_gpu)


def _learn_ceiling(state: NodeState, key: str, result: MoveResult) -> None:
    """Lock held. Ollama unloaded models to load `key`: what was held before, plus what it needs, was more
    than the GPU takes (room.VramBounds.evicted)."""
    need = float(result.vram_mb or state.model_sizes_mb.get(key) or 0.0)
    if need > 0 and result.evicted_vram_mb:
        together = [key, *(model_key(name) for name in result.in_vram_before or ())]
        bounds = state.vram_bounds.evicted(result.held_before_mb, need, result.evicted_vram_mb, together)
        state.vram_bounds = bounds


def _looks_restarted(previous: list[dict], now: list[dict]) -> bool:
    """Nothing loaded now, though models that were loaded (and not being unloaded) had time left: Ollama
    restarted (a restarted Ollama has nothing loaded, sched.go:97), even if no health check saw it down.
    Models that expired on time, or that were seen stopping, are not a restart."""
    if now or not previous:
        return False
    horizon = datetime.now(UTC) + timedelta(seconds=RESTART_MARGIN_S)
    for model in previous:
        expires = parse_expires_at(model.get("expires_at"))
        if not model.get("stopping") and expires is not None and expires > horizon:
            return True
    return False


def _priority_model_fell_off_gpu(previous: list[dict], models: list[dict], patterns: list[str]) -> bool:
    """A priority model not on GPU that was on GPU before, or that we see for the first time."""
    before = {model_key(m["name"]): m.get("location") for m in previous}
    for model in models:
        name = model_key(model["name"])
        if not is_off_gpu(model) or not matches_priority(name, patterns):
            continue
        if name not in before or before[name] == LOCATION_GPU:
            return True
    return False


PLACEMENT_FIELDS = ("location", "gpu_percent", "vram_mb", "size_mb", "context_length")


def _placements(models: list[dict]) -> dict[str, dict]:
    """What a history of placements needs of each loaded model (model key -> its placement fields)."""
    return {model_key(m["name"]): {f: m.get(f) for f in PLACEMENT_FIELDS} for m in models}


def _placements_event(url: str, now: dict[str, dict], before: dict[str, dict]) -> Event:
    """Every observed change of what a node holds where (for history; the console does not print it)."""
    changed = sorted(name for name in now.keys() | before.keys() if now.get(name) != before.get(name))
    return Event(
        "placements_changed",
        node=url,
        message=f"{url}: placement changed for {', '.join(changed)}",
        data={"models": now, "previous": before, "changed": changed},
    )


def _in_vram(model: dict) -> bool:
    return float(model.get("vram_mb") or 0) > 0 or float(model.get("gpu_percent") or 0) > 0
