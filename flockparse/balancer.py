"""OllamaLoadBalancer: the public API of the core.

It keeps one `NodeState` per node (online, latency, last error, GPU evidence, last good model list), a
health monitor that checks every node concurrently, request routing with fail-over, cluster-wide
force-GPU/force-CPU, and owns the `GPUOptimizer`. It never prints: everything it has to say is an `Event`.

Locking rule: `self._lock` guards the node states and nothing else; no network call runs while it is held.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from flockparse import gpu_state as gs
from flockparse.events import Event, EventBus
from flockparse.optimizer import UNMOVABLE_REASONS, GPUOptimizer
from flockparse.rules import (
    LOCATION_GPU,
    canonical_name,
    is_off_gpu,
    matches_priority,
    model_key,
    normalize_url,
    parse_expires_at,
    priority_patterns,
    same_model,
)
from gpu_controller import GPUController, NodeError

logger = logging.getLogger(__name__)

DEFAULT_PRIORITY_MODELS = ["mxbai-embed-large", "llama3.1"]
OFFLINE_RECHECK_SECONDS = 1.0  # an offline node is re-checked this often (a refused connect is cheap)
INSTALLED_REFRESH_SECONDS = 180.0  # how often the monitor re-reads /api/tags (for completion only)
MAX_WORKERS = 64  # threads are created lazily; 200 nodes x 50 ms still finish in well under a second
RESTART_MARGIN_S = 10.0  # models gone this long before their expiry did not expire: the node restarted


class AllNodesFailedError(RuntimeError):
    """No node could serve a routed request; `errors` lists (node, reason) for every node tried."""

    def __init__(self, model: str, errors: list[tuple[str, str]]) -> None:
        self.model = model
        self.errors = errors
        tried = "; ".join(f"{node}: {reason}" for node, reason in errors) or "no node is online"
        super().__init__(f"no node could serve {model}: {tried}")


class RequestRejectedError(RuntimeError):
    """The node answered with a client error (4xx other than 404): another node would say the same."""

    def __init__(self, node: str, status_code: int, message: str) -> None:
        self.node = node
        self.status_code = status_code
        super().__init__(f"{node} rejected the request ({status_code}): {message}")


@dataclass
class NodeState:
    """What the balancer knows about one node; handed out as copies (see `node_states`)."""

    url: str
    online: bool | None = None  # None until the first check
    gpu: str = gs.GPU_UNKNOWN  # yes | no | unknown | lost (gpu_state.py): only evidence or configuration
    has_gpu: bool | None = None  # the same as a tri-state: True, False (no or lost), None (unknown)
    declared_gpu: bool | None = None
    gpu_evidence: str = ""
    gpu_seen: bool = False  # a GPU was seen here once: a load landing in RAM now means it was lost
    gpu_lost_since: float | None = None  # time.time() the current loss began; None when not lost
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
    installed_checked_at: float = 0.0  # time.monotonic(); 0 = never
    models_requested_at: float = 0.0  # time.monotonic() the status behind `models` was asked for

    def snapshot(self) -> NodeState:
        return dataclasses.replace(
            self,
            models=[dict(m) for m in self.models],
            installed=list(self.installed),
            previous_gpu_models=list(self.previous_gpu_models),
            unmovable={k: dict(v) for k, v in self.unmovable.items()},
        )

    @property
    def reports_estimates(self) -> bool:
        """Ollama < 0.30: /api/ps figures are estimates, and one RAM landing proves nothing."""
        return gs.reports_estimates(self.ollama_version)


class OllamaLoadBalancer:
    """Nodes, health, routing, cluster-wide placement and the background GPU optimizer."""

    def __init__(
        self,
        nodes: Iterable[str] = (),
        auto_optimize_gpu: bool = True,
        gpu_priority_models: list[str] | None = None,
        check_interval: float = 300,
        health_interval: float = 5.0,
        gpu_capability: dict[str, bool] | None = None,
        keep_alive: str | int | float | None = None,
        controller: GPUController | None = None,
        start: bool = True,
        request_timeout: float = 300.0,
        on_gpu_lost: str | None = None,
        remedy_timeout: float = gs.REMEDY_TIMEOUT_S,
    ) -> None:
        self.events = EventBus()
        self.controller = controller if controller is not None else GPUController(keep_alive=keep_alive)
        self.gpu_priority_models: list[str] = list(
            DEFAULT_PRIORITY_MODELS if gpu_priority_models is None else gpu_priority_models
        )
        self.health_interval = float(health_interval)
        self.request_timeout = float(request_timeout)
        self.on_gpu_lost = on_gpu_lost  # the operator's remedy command; off by default
        self.remedy_timeout = float(remedy_timeout)
        self._lock = threading.Lock()  # guards _states and _checks_in_flight; never held during I/O
        self._states: dict[str, NodeState] = {}
        self._checks_in_flight: set[str] = set()
        self._closed = threading.Event()
        self._monitor_stop = threading.Event()
        self._monitor_thread: threading.Thread | None = None
        self._check_pool = ThreadPoolExecutor(MAX_WORKERS, thread_name_prefix="lb-check")
        self._work_pool = ThreadPoolExecutor(MAX_WORKERS, thread_name_prefix="lb-work")
        self._optimizer = GPUOptimizer(self, interval=check_interval)
        self._auto_optimize_gpu = bool(auto_optimize_gpu)
        self._started = False
        declared = {normalize_url(url): gpu for url, gpu in (gpu_capability or {}).items()}
        for url in dict.fromkeys(normalize_url(u) for u in nodes):
            self.add_node(url, has_gpu=declared.get(url))
        if start:
            self.start()

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Start the health monitor and, if `auto_optimize_gpu`, the optimizer (`__init__` does it)."""
        if self._started or self._closed.is_set():
            return
        self._started = True
        if self._auto_optimize_gpu:  # first, so that it hears the node_up of the first health checks
            self._start_gpu_optimization()
        self._monitor_stop.clear()
        self._monitor_thread = threading.Thread(target=self._monitor_loop, name="lb-health", daemon=True)
        self._monitor_thread.start()

    def close(self) -> None:
        """Stop the threads, drop connections and close the controller; safe to call twice."""
        if self._closed.is_set():
            return
        self._closed.set()
        self._optimizer.stop()
        self._monitor_stop.set()
        if self._monitor_thread is not None:
            self._monitor_thread.join(1.0)
        self._check_pool.shutdown(wait=False, cancel_futures=True)
        self._work_pool.shutdown(wait=False, cancel_futures=True)
        self.controller.close()

    def __enter__(self) -> OllamaLoadBalancer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ------------------------------------------------------------------ optimizer facade
    @property
    def auto_optimize_gpu(self) -> bool:
        return self._auto_optimize_gpu

    @auto_optimize_gpu.setter
    def auto_optimize_gpu(self, enabled: bool) -> None:
        """Setting it really switches the optimizer on or off (the old code only had a dead flag)."""
        self._auto_optimize_gpu = bool(enabled)
        if not self._started:
            return
        if enabled:
            self._start_gpu_optimization()
        else:
            self.stop_gpu_optimization()

    @property
    def optimization_running(self) -> bool:
        return self._optimizer.running

    @property
    def check_interval(self) -> float:
        return self._optimizer.interval

    @check_interval.setter
    def check_interval(self, seconds: float) -> None:
        self._optimizer.interval = seconds

    @property
    def optimizer(self) -> GPUOptimizer:
        return self._optimizer

    def _start_gpu_optimization(self) -> bool:
        """Start the background optimizer (a full pass runs at once); False if it was already running."""
        if self._closed.is_set():
            return False
        self._auto_optimize_gpu = True
        return self._optimizer.start()

    def _gpu_optimization_loop(self) -> None:
        """The product spec's name for the background loop: start it and block until it is stopped."""
        self._start_gpu_optimization()
        self._optimizer.join()

    def stop_gpu_optimization(self) -> bool:
        """Stop the optimizer within a second, also mid-wait or mid-pass; True if its thread ended."""
        self._auto_optimize_gpu = False
        return self._optimizer.stop()

    def optimize_gpu_once(self, cancel: threading.Event | None = None) -> list[dict]:
        """One pass now over all nodes (works with the optimizer off); returns the actions taken.

        Setting `cancel` (e.g. on Ctrl-C) stops waiting for the nodes and stops further moves.
        """
        return self._optimizer.run_pass(None, cancel=cancel or self._closed, load_absent=True, asked=True)

    def optimizer_status(self) -> dict:
        return self._optimizer.status()

    def subscribe(self, callback: Callable[[Event], None]) -> Callable[[], None]:
        return self.events.subscribe(callback)

    # ------------------------------------------------------------------ nodes
    @property
    def nodes(self) -> list[str]:
        with self._lock:
            return list(self._states)

    def add_node(self, url: str, has_gpu: bool | None = None) -> NodeState:
        """Add a node at run time; it is checked at once and gets an optimizer pass when it answers."""
        node = normalize_url(url)
        with self._lock:
            if node in self._states:
                raise ValueError(f"node already in the cluster: {node}")
            state = NodeState(url=node, declared_gpu=has_gpu)
            _reset_gpu_evidence(state)
            self._states[node] = state
            snapshot = state.snapshot()
        self.events.emit(Event("node_added", node=node, message=f"added node {node}"))
        if self._started:
            self._schedule_check(node)
        return snapshot

    def remove_node(self, url: str) -> bool:
        """Forget a node (its pins and back-offs too); False if it was not in the cluster."""
        try:
            node = normalize_url(url)
        except ValueError:
            return False
        with self._lock:
            state = self._states.pop(node, None)
        if state is None:
            return False
        self.controller.forget_node(node)
        self._optimizer.forget_node(node, keep_pins=False)
        self.events.emit(Event("node_removed", node=node, message=f"removed node {node}"))
        return True

    def node_state(self, url: str) -> NodeState | None:
        with self._lock:
            state = self._states.get(url)
            return state.snapshot() if state is not None else None

    def node_states(self) -> list[NodeState]:
        with self._lock:
            return [state.snapshot() for state in self._states.values()]

    # ------------------------------------------------------------------ health monitor
    def _monitor_loop(self) -> None:
        """Check every node now, then every `health_interval`; offline nodes every second, so a node
        that comes back gets its optimizer pass quickly. A slow node only delays itself."""
        next_round = 0.0
        while True:
            every_node = time.monotonic() >= next_round
            if every_node:
                next_round = time.monotonic() + self.health_interval
            with self._lock:
                due = [url for url, s in self._states.items() if every_node or s.online is False]
            for node in due:
                self._schedule_check(node)
            if self._monitor_stop.wait(min(self.health_interval, OFFLINE_RECHECK_SECONDS)):
                return

    def _schedule_check(self, node: str) -> None:
        with self._lock:
            if node in self._checks_in_flight or node not in self._states or self._closed.is_set():
                return
            self._checks_in_flight.add(node)
        try:
            self._check_pool.submit(self._check_node, node)
        except RuntimeError:  # pool shut down by close()
            with self._lock:
                self._checks_in_flight.discard(node)

    def _check_node(self, node: str) -> None:
        try:
            status = self.controller.get_model_status(node)
            up = "error" not in status
            installed = self.controller.list_installed(node) if up and self._installed_due(node) else None
            version = self.controller.version(node) if up and self._version_due(node) else None
            # before the status is recorded: a node coming up gets a pass that needs the installed list
            if installed is not None:
                self._record_installed(node, installed)
            self._record_version(node, version)
            self._record_status(node, status)
        except Exception as error:  # the controller promises not to raise; never let the monitor die
            logger.exception("health check of %s failed", node)
            self._record_status(node, {"node_url": node, "models": [], "error": f"check failed: {error}"})
        finally:
            with self._lock:
                self._checks_in_flight.discard(node)

    def _installed_due(self, node: str) -> bool:
        with self._lock:
            state = self._states.get(node)
            return state is not None and (
                state.online is not True
                or state.installed_checked_at == 0.0
                or time.monotonic() - state.installed_checked_at >= INSTALLED_REFRESH_SECONDS
            )

    def _version_due(self, node: str) -> bool:
        """Read /api/version when a node comes up (it may have been upgraded while down)."""
        with self._lock:
            state = self._states.get(node)
            return state is not None and (state.online is not True or state.ollama_version is None)

    def _record_version(self, node: str, version: str | None) -> None:
        with self._lock:
            state = self._states.get(node)
            if state is not None and version is not None:
                state.ollama_version = version

    def _record_installed(self, node: str, reply: dict) -> None:
        with self._lock:
            state = self._states.get(node)
            if state is None:
                return
            state.installed_checked_at = time.monotonic()
            if "error" not in reply:
                state.installed = [model_key(name) for name in reply.get("models", [])]

    def _record_status(self, node: str, status: dict, trigger: bool = True) -> None:
        """Fold one get_model_status reply into the node's state; emit up/down; maybe trigger a pass.

        A node that comes (back) online or restarted gets its no-GPU or lost-GPU verdict asked again (a
        restarted Ollama discovers its GPUs anew), its back-offs dropped and an immediate warm-up pass. A
        priority model newly seen off GPU gets an immediate pass too.
        """
        with self._lock:
            state = self._states.get(node)
            if state is None:
                return
            if "error" in status:
                events, fresh_start, needs_pass = (
                    self._record_failure(state, str(status["error"])),
                    False,
                    False,
                )
            else:
                events, fresh_start, needs_pass = self._record_success(state, status)
        if fresh_start:
            self._optimizer.forget_node(node)  # fresh memory after a restart: old back-offs no longer apply
        for event in events:
            self.events.emit(event)
        warm_up = any(e.kind in ("node_up", "node_restarted") for e in events)
        if warm_up or (trigger and needs_pass):
            # a node that just came up or restarted also gets its absent priority models loaded (warm-up),
            # even when the optimizer's own pass saw it first; a model that fell off the GPU is only moved
            self._optimizer.trigger(node, load_absent=warm_up)

    def _record_failure(self, state: NodeState, error: str) -> list[Event]:
        """Lock held. The node keeps its last known models, now stale."""
        was_online = state.online
        state.online, state.last_error = False, error
        state.stale = state.last_seen is not None
        if was_online is False:
            return []
        return [
            Event("node_down", node=state.url, message=f"{state.url} is down: {error}", data={"error": error})
        ]

    def _record_success(self, state: NodeState, status: dict) -> tuple[list[Event], bool, bool]:
        """Lock held. Returns (events, came back or restarted, needs an optimizer pass)."""
        was_online = state.online
        previous_models = state.models
        previous = {model_key(m["name"]): m.get("location") for m in previous_models}
        state.online, state.last_error, state.stale = True, None, False
        state.last_seen = time.time()
        state.latency_ms = status.get("latency_ms", state.latency_ms)
        state.models = [dict(m) for m in status.get("models", [])]
        # every model gone before its time: a restart no health check saw (or all unloaded by hand)
        previous_at, state.models_requested_at = state.models_requested_at, status.get("requested_at", 0.0)
        restarted = (
            was_online is True
            and _looks_restarted(previous_models, state.models)
            and not self.controller.changed_models_since(state.url, previous_at)  # our moves unload too
        )
        events: list[Event] = []
        if was_online is False or restarted:
            self._fresh_start(state, previous_models)
        if state.gpu != gs.GPU_LOST and any(_in_vram(m) for m in state.models):
            # a lost GPU's old runners may still hold VRAM: only a new load (or a restart) ends a loss
            events += _note_gpu_seen(state, gs.EVIDENCE_VRAM)
        if restarted:
            message = (
                f"{state.url} has nothing loaded any more, though its models had time left: Ollama restarted "
                "(or every model was unloaded by hand)"
            )
            return [Event("node_restarted", node=state.url, message=message), *events], True, True
        if was_online is True:
            return events, False, self._priority_model_fell_off_gpu(previous, state.models)
        up = Event(
            "node_up", node=state.url, message=f"{state.url} is online", data={"latency_ms": state.latency_ms}
        )
        return [up, *events], was_online is False, True

    @staticmethod
    def _fresh_start(state: NodeState, previous_models: list[dict]) -> None:
        """Lock held. The node came back or restarted: remember what was on its GPU (the warm-up of glob
        priorities brings those back), forget Modelfile verdicts, and ask a no/lost GPU verdict again."""
        on_gpu = [model_key(m["name"]) for m in previous_models if m.get("location") == LOCATION_GPU]
        if on_gpu:
            state.previous_gpu_models = on_gpu
        state.unmovable.clear()
        state.cpu_landings = 0
        if state.gpu in (gs.GPU_NO, gs.GPU_LOST):
            _reset_gpu_evidence(state, gs.EVIDENCE_RESTARTED)

    def _priority_model_fell_off_gpu(self, previous: dict[str, str | None], models: list[dict]) -> bool:
        """A priority model not on GPU that was on GPU before, or that we see for the first time."""
        patterns = priority_patterns(self.gpu_priority_models)
        for model in models:
            name = model_key(model["name"])
            if not is_off_gpu(model) or not matches_priority(name, patterns):
                continue
            if name not in previous or previous[name] == LOCATION_GPU:
                return True
        return False

    def _record_move_result(self, node: str, model: str, result: dict) -> None:
        """Moves are evidence: a load in VRAM proves a GPU; an all-layers load in RAM proves none, or that
        the GPU was lost when one was seen before. Modelfile pins and MLX models are remembered."""
        with self._lock:
            state = self._states.get(node)
            if state is None:
                return
            events = self._note_load_evidence(state, result)
            key = model_key(model)
            if result.get("reason") in UNMOVABLE_REASONS:
                state.unmovable[key] = {"reason": result["reason"], "message": str(result.get("message", ""))}
            elif result.get("success"):
                state.unmovable.pop(key, None)
        self._emit_gpu_events(events)
        if result.get("reason") in ("unreachable", "timeout"):
            self._schedule_check(node)

    @staticmethod
    def _note_load_evidence(state: NodeState, result: dict) -> list[Event]:
        """Lock held."""
        if result.get("reason") == "no_gpu":
            return _note_cpu_landing(state)
        if (
            result.get("success")
            and result.get("location") == LOCATION_GPU
            and result.get("reason") != "already"
        ):
            return _note_gpu_seen(state, gs.EVIDENCE_LOAD_VRAM)
        return []

    def _emit_gpu_events(self, events: list[Event]) -> None:
        """Emit; a GPU loss also starts the operator's remedy command (once per loss, in the background)."""
        for event in events:
            self.events.emit(event)
            if event.kind == "gpu_lost" and self.on_gpu_lost and not self._closed.is_set():
                threading.Thread(
                    target=self._run_remedy, args=(event.node,), name="gpu-remedy", daemon=True
                ).start()

    def _run_remedy(self, node: str) -> None:
        command = gs.remedy_command(str(self.on_gpu_lost), node)
        self.events.emit(Event("remedy_started", node=node, message=f"running the GPU remedy: {command}",
                               data={"command": command}))  # fmt: skip
        outcome = gs.run_remedy(str(self.on_gpu_lost), node, self.remedy_timeout)
        if outcome.error is not None:
            message = f"the GPU remedy for {node} could not start: {outcome.error}"
        elif outcome.timed_out:
            message = (
                f"the GPU remedy for {node} did not finish within {self.remedy_timeout:g}s and was stopped"
            )
        else:
            message = f"the GPU remedy for {node} exited with {outcome.exit_code}"
        data = dataclasses.asdict(outcome)
        self.events.emit(Event("remedy_finished", node=node, message=message, data=data))

    def probe_gpu(self, node: str, cancel: threading.Event | None = None, trust_vram: bool = True) -> dict:
        """Ask the node whether it has a usable GPU with a tiny load (see GPUController.probe_gpu) and
        record the answer as evidence; returns the probe's dict."""
        result = self.controller.probe_gpu(node, cancel=cancel or self._closed, trust_vram=trust_vram)
        with self._lock:
            state = self._states.get(node)
            if state is None:
                return result
            if result["gpu"] is True:
                events = _note_gpu_seen(state, gs.EVIDENCE_LOAD_VRAM)
            elif result["gpu"] is False:
                events = _note_cpu_landing(state)
            else:
                events = []
        self._emit_gpu_events(events)
        return result

    # ------------------------------------------------------------------ reports
    def vram_report(self) -> list[dict]:
        """Fresh placement of every model on every node, nodes concurrently, bounded by the timeout.

        A node that does not answer keeps its last known models, marked `stale`.
        """
        nodes = self.nodes
        futures = {node: self._check_pool.submit(self.controller.get_model_status, node) for node in nodes}
        wait(futures.values(), timeout=float(getattr(self.controller, "timeout", 5.0)) + 1.0)
        late: set[str] = set()
        for node, future in futures.items():
            if not future.done():
                late.add(node)
                continue
            try:
                self._record_status(node, future.result())
            except Exception as error:
                self._record_status(node, {"node_url": node, "models": [], "error": str(error)})
        report = []
        for state in self.node_states():
            if state.url not in futures:
                continue
            error = "no reply within the timeout" if state.url in late else state.last_error
            report.append({
                "node": state.url,
                "online": state.online,
                "stale": state.stale or state.url in late,
                "last_seen": state.last_seen,
                "error": error,
                **_gpu_fields(state),
                "latency_ms": state.latency_ms,
                "models": _report_models(state),
            })  # fmt: skip
        return report

    def get_stats(self) -> dict:
        """Per-node counters and evidence plus the optimizer's status (no network call)."""
        nodes = [
            {
                "node": s.url,
                "online": s.online,
                **_gpu_fields(s),
                "latency_ms": s.latency_ms,
                "requests": s.requests,
                "errors": s.errors,
                "in_flight": s.in_flight,
                "last_error": s.last_error,
                "last_seen": s.last_seen,
                "stale": s.stale,
                "models_loaded": len(s.models),
                "models_on_gpu": sum(m.get("location") == LOCATION_GPU for m in s.models),
            }
            for s in self.node_states()
        ]
        return {"nodes": nodes, "optimizer": self.optimizer_status()}

    def known_models(self) -> list[str]:
        """Canonical names installed or loaded on any node (for completion); no network call."""
        names: set[str] = set()
        for state in self.node_states():
            names.update(state.installed)
            names.update(model_key(m["name"]) for m in state.models)
        return sorted(names)

    # ------------------------------------------------------------------ placement
    def force_gpu_all_nodes(self, model: str, cancel: threading.Event | None = None) -> list[dict]:
        """Move `model` to GPU on every node (concurrently); lifts a CPU pin and any back-off."""
        self._optimizer.release_model(model)
        return self._force_all_nodes(model, "GPU", cancel)

    def force_cpu_all_nodes(self, model: str, cancel: threading.Event | None = None) -> list[dict]:
        """Move `model` to CPU on every node where it is loaded, and pin it there (the optimizer leaves it
        alone); nodes where it is not loaded are skipped: nothing is loaded just to sit in RAM."""
        self._optimizer.release_model(model)
        for node in self.nodes:
            self._optimizer.pin_cpu(node, model)
        return self._force_all_nodes(model, "CPU", cancel)

    def _force_all_nodes(self, model: str, target: str, cancel: threading.Event | None) -> list[dict]:
        nodes = self.nodes
        futures = [self._work_pool.submit(self._force_one, node, model, target, cancel) for node in nodes]
        return [
            {"node": node, "result": future.result()} for node, future in zip(nodes, futures, strict=True)
        ]

    def _force_one(self, node: str, model: str, target: str, cancel: threading.Event | None) -> dict:
        """Do no harm: a model is loaded where it was not only onto a GPU known, declared or probed."""
        state = self.node_state(node)
        if state is None:
            return _skipped("removed", f"{node} was removed from the cluster")
        if state.online is False:
            return _skipped("offline", f"skipped {node}: offline ({state.last_error})")
        if target == "GPU" and state.gpu == gs.GPU_LOST:
            return _skipped("gpu_lost", f"skipped {node}: its GPU is lost. {gs.lost_remedy_text(node)}")
        if target == "GPU" and state.gpu == gs.GPU_NO:
            return _skipped("no_gpu", f"skipped {node}: no GPU ({state.gpu_evidence})")
        if target == "GPU" and state.gpu == gs.GPU_YES:
            return self._move(node, model, target, cancel=cancel, source="user")
        status = self.controller.get_model_status(node)
        self._record_status(node, status, trigger=False)
        if "error" in status:
            return _skipped("offline", f"skipped {node}: {status['error']}")
        if not any(same_model(m["name"], model) for m in status["models"]):
            if target == "CPU":
                return _skipped("not_loaded", f"skipped {node}: {canonical_name(model)} is not loaded there")
            probe = self.probe_gpu(node, cancel=cancel)
            if probe["gpu"] is not True:
                reason = "no_gpu" if probe["gpu"] is False else "gpu_unknown"
                return _skipped(reason, f"skipped {node}: no GPU shown by a probe ({probe['message']})")
        return self._move(node, model, target, cancel=cancel, source="user")

    def _move(self, node: str, model: str, target: str, cancel: threading.Event | None, source: str) -> dict:
        """One verified move through the controller (which serialises moves per node and model)."""
        name = model_key(model)
        data: dict[str, Any] = {"target": target, "source": source}
        self.events.emit(Event("move_started", node=node, model=name, data=dict(data),
                               message=f"moving {name} to {target} on {node}"))  # fmt: skip
        mover = self.controller.force_gpu_load if target == "GPU" else self.controller.force_cpu_load
        try:
            result = mover(node, model, cancel=cancel)
        except Exception as error:  # the controller promises not to raise; report it as a failed move
            logger.exception("move of %s on %s failed", name, node)
            result = {"success": False, "message": str(error), "location": None, "vram_mb": 0.0,
                      "reason": "error", "restored": False}  # fmt: skip
        self._record_move_result(node, name, result)
        data.update(
            location=result.get("location"), reason=result.get("reason"), vram_mb=result.get("vram_mb")
        )
        kind = "move_finished" if result.get("success") else "move_failed"
        self.events.emit(
            Event(kind, node=node, model=name, data=data, message=str(result.get("message", "")))
        )
        return result

    # ------------------------------------------------------------------ routing
    def pick_node(self, model: str | None = None, exclude: Iterable[str] = ()) -> str | None:
        """Best node for `model`: where it is in VRAM, then loaded anywhere, then GPU, unknown, CPU-only.

        Ties go to the fewest requests in flight, then the lowest latency. Nodes not checked yet come
        after every online node; offline nodes are never chosen.
        """
        excluded = set(exclude)
        name = model_key(model) if model else None
        with self._lock:
            candidates = [s for s in self._states.values() if s.online is not False and s.url not in excluded]
            if not candidates:
                return None
            return min(candidates, key=lambda s: _route_rank(s, name)).url

    def generate(self, model: str, prompt: str, **options: Any) -> dict:
        """POST /api/generate (stream false) on the best node, failing over to other nodes.

        Extra keyword arguments go into the request body as they are (options={...}, keep_alive=...).
        """
        return self._routed_post("/api/generate", model, {"model": model, "prompt": prompt, **options})

    def embed(self, model: str, input: str | list[str], **options: Any) -> dict:
        """POST /api/embed on the best node, failing over to other nodes."""
        return self._routed_post("/api/embed", model, {"model": model, "input": input, **options})

    def _routed_post(self, path: str, model: str, body: dict) -> dict:
        body = {**body, "stream": False}
        tried: list[str] = []
        errors: list[tuple[str, str]] = []
        while (node := self.pick_node(model, exclude=tried)) is not None:
            tried.append(node)
            reply, error = self._post_once(node, path, body)
            if error is None:
                return reply
            errors.append((node, error))
        raise AllNodesFailedError(model, errors)

    def _post_once(self, node: str, path: str, body: dict) -> tuple[dict, str | None]:
        """One attempt; returns (reply, None) or ({}, reason to fail over). 4xx other than 404 raises."""
        with self._lock:
            state = self._states.get(node)
            if state is None:
                return {}, "removed from the cluster"
            state.requests += 1
            state.in_flight += 1
        error: str | None = None
        reply: dict = {}
        try:
            answer = self.controller.call(node, "POST", path, body, read_timeout=self.request_timeout)
            if 400 <= answer.status < 500 and answer.status != 404:
                error = f"HTTP {answer.status}: {answer.error_text()}"
                raise RequestRejectedError(node, answer.status, answer.error_text())
            if answer.status != 200:
                error = f"HTTP {answer.status}: {answer.error_text()}"
            elif not isinstance(answer.body, dict):
                error = "reply is not a JSON object"
            else:
                reply = answer.body
        except NodeError as exc:  # refused, reset, timed out: fail over
            error = exc.message
        finally:
            self._finish_request(node, error)
        return reply, error

    def _finish_request(self, node: str, error: str | None) -> None:
        with self._lock:
            state = self._states.get(node)
            if state is None:
                return
            state.in_flight -= 1
            if error is not None:
                state.errors += 1
                state.last_error = error
        if error is not None:
            self._schedule_check(node)  # let the monitor confirm up/down now rather than in 5 s


# --------------------------------------------------------------------------------------------- helpers
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
    """Lock held. A GPU is there; a loss in progress ends (one `gpu_back` event)."""
    state.cpu_landings, state.gpu_seen = 0, True
    events = []
    if state.gpu_lost_since is not None:
        lost_for = time.time() - state.gpu_lost_since
        state.gpu_lost_since = None
        message = f"{state.url} has its GPU again ({evidence})"
        events.append(
            Event("gpu_back", node=state.url, message=message, data={"lost_for_s": round(lost_for, 1)})
        )
    _set_gpu(state, gs.GPU_YES, evidence)
    return events


def _note_cpu_landing(state: NodeState) -> list[Event]:
    """Lock held. An all-layers load landed in RAM: a CPU-only node, or a lost GPU (one `gpu_lost` event
    per loss, however many loads land in RAM until the GPU is seen again)."""
    state.cpu_landings += 1
    if state.reports_estimates and state.cpu_landings < 2:
        state.gpu_evidence = gs.EVIDENCE_ONE_LANDING
        return []
    if not state.gpu_seen:
        _set_gpu(state, gs.GPU_NO, gs.EVIDENCE_RAM)
        return []
    _set_gpu(state, gs.GPU_LOST, gs.EVIDENCE_LOST)
    if state.gpu_lost_since is not None:
        return []
    state.gpu_lost_since = time.time()
    message = f"{state.url} lost its GPU: a load with every layer on the GPU landed in RAM. "
    message += gs.lost_remedy_text(state.url)
    return [
        Event("gpu_lost", node=state.url, message=message, data={"remedy": gs.lost_remedy_text(state.url)})
    ]


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


def _gpu_fields(state: NodeState) -> dict[str, Any]:
    """The GPU verdict as reports and stats show it."""
    return {
        "gpu": state.gpu,
        "has_gpu": state.has_gpu,
        "gpu_evidence": state.gpu_evidence,
        "gpu_lost_since": state.gpu_lost_since,
        "ollama_version": state.ollama_version,
        "estimates": state.reports_estimates,
    }


def _report_models(state: NodeState) -> list[dict]:
    """The node's model rows, each saying why it cannot be moved when that is known."""
    rows = []
    for model in state.models:
        row = dict(model)
        known = state.unmovable.get(model_key(row["name"]))
        if known is not None:
            row["unmovable"] = known["reason"]
            row["unmovable_message"] = known["message"]
        elif row.get("controllable") is False:
            row["unmovable"] = "not_controllable"
            row["unmovable_message"] = "a safetensors (MLX) model: Ollama ignores num_gpu for it"
        rows.append(row)
    return rows


def _in_vram(model: dict) -> bool:
    return float(model.get("vram_mb") or 0) > 0 or float(model.get("gpu_percent") or 0) > 0


def _route_rank(state: NodeState, model: str | None) -> tuple:
    location = None
    if model is not None:
        location = next((m.get("location") for m in state.models if model_key(m["name"]) == model), None)
    if location == LOCATION_GPU:
        tier = 0
    elif location is not None:
        tier = 1
    else:
        tier = {gs.GPU_YES: 2, gs.GPU_UNKNOWN: 3}.get(state.gpu, 4)
    latency = state.latency_ms if state.latency_ms is not None else float("inf")
    return (state.online is not True, tier, state.in_flight, latency)


def _skipped(reason: str, message: str) -> dict:
    return {"success": False, "skipped": True, "reason": reason, "message": message, "location": None,
            "vram_mb": 0.0, "restored": False}  # fmt: skip
