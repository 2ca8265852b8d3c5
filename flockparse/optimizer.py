"""GPUOptimizer: the background pass that puts priority models back on GPU.

Why it is shaped like this (see shared/spec/prior-art.md for what went wrong before):
- it waits on an `Event`, never `time.sleep`, so `stop()`, interval changes and node triggers wake it;
- a node that comes back online or is added gets a pass at once (the balancer's monitor triggers it), so a
  restarted node's models return to GPU in seconds instead of up to one interval;
- models already 100% on GPU are never touched: a steady state costs one `/api/ps` per node and no reload;
- a model the user forced to CPU is pinned there until forced back; a model that failed (e.g. out of
  memory) is backed off exponentially instead of being reloaded every pass.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future, wait
from typing import Any, Protocol

from flockparse import planner, room
from flockparse.events import Event
from flockparse.planner import PASS_ASKED, PASS_INTERVAL, PASS_NODE, Action, Backoff
from flockparse.results import MoveResult
from flockparse.rules import LOCATION_GPU, model_key, outranks, priority_patterns, priority_rank

logger = logging.getLogger(__name__)

FUTURE_POLL_SECONDS = 0.1  # how often a caller waiting on a pass checks for cancellation
UNMOVABLE_REASONS = planner.UNMOVABLE_REASONS


class Cluster(Protocol):
    """What the optimizer needs from the cluster (OllamaLoadBalancer): observe nodes, move through their
    owners, emit events. The optimizer imports no balancer and touches none of its private members."""

    events: Any
    gpu_priority_models: list[str]
    evict_to: str  # how room is made: "unload" or "cpu"

    @property
    def nodes(self) -> list[str]: ...
    def node_state(self, url: str) -> Any: ...
    def read_status(self, node: str, trigger: bool = False) -> dict: ...
    def read_statuses(self, nodes: Iterable[str]) -> dict[str, Future]: ...
    def installed_models(self, node: str) -> set[str]: ...
    def run_node_task(self, work: Callable[[], Any]) -> Future: ...
    def probe_gpu(
        self, node: str, cancel: threading.Event | None = None, trust_vram: bool = True
    ) -> MoveResult: ...
    def move(
        self, node: str, model: str, target: str, cancel: threading.Event | None = None, source: str = "user"
    ) -> MoveResult: ...
    def unload(
        self, node: str, model: str, cancel: threading.Event | None = None, source: str = "user"
    ) -> MoveResult: ...
    def load_back(self, node: str, model: str, on_cpu: bool = False) -> MoveResult: ...
    def vram_bounds(self, node: str, models: list[dict] | None = None) -> room.VramBounds: ...
    def model_need_mb(self, node: str, model: str) -> float | None: ...


class GPUOptimizer:
    """Background thread plus the pass logic; the balancer owns one and forwards its public methods."""

    def __init__(self, cluster: Cluster, interval: float = 300.0) -> None:
        self._cluster = cluster
        self._interval = _positive(interval)
        self._lock = threading.Lock()  # guards the fields below; never held during I/O
        self._pass_free = threading.Event()  # set while no pass runs: one pass at a time, whoever asks
        self._pass_free.set()
        self._control_lock = threading.Lock()  # start/stop from two threads cannot make two optimizers
        self._wake = threading.Event()
        self._stop: threading.Event = threading.Event()
        self._thread: threading.Thread | None = None
        self._pending_full = False
        self._pending_nodes: dict[str, bool] = {}  # node -> may load absent priority models
        self._last_full_start = time.monotonic()
        self._last_pass: dict | None = None
        self._pins: set[tuple[str, str]] = set()
        self._backoff: dict[tuple[str, str], Backoff] = {}
        self._no_room: set[tuple[str, str]] = set()  # said once (a `no_room` event) until it moves
        self._busy_wait: set[str] = set()  # nodes where a move waits for a model serving requests

    # ------------------------------------------------------------------ thread control
    @property
    def running(self) -> bool:
        thread = self._thread
        return thread is not None and thread.is_alive() and not self._stop.is_set()

    @property
    def interval(self) -> float:
        return self._interval

    @interval.setter
    def interval(self, seconds: float) -> None:
        """Takes effect at once: the waiting thread wakes and recomputes its deadline."""
        self._interval = _positive(seconds)
        self._wake.set()

    def start(self) -> bool:
        """Start the thread (a full pass runs at once); False if it was already running."""
        with self._control_lock:
            if self.running:
                return False
            stop = threading.Event()  # a fresh one per thread: a stopping old thread can never resume
            with self._lock:
                self._stop = stop
                self._pending_full = True
                self._last_full_start = time.monotonic() - self._interval  # the status says "now", not old
            self._thread = threading.Thread(target=self._run, args=(stop,), name="gpu-optimizer", daemon=True)
            self._thread.start()
        self._wake.set()
        self._emit("optimizer_started", f"GPU optimizer started (every {self._interval:g} s)")
        return True

    def stop(self, timeout: float = 1.0) -> bool:
        """Stop the thread, cancelling a pass in progress; returns within `timeout`; True if it ended."""
        with self._control_lock:
            was_running = self.running
            self._stop.set()
            self._wake.set()
            thread = self._thread
            if thread is not None and thread is not threading.current_thread():
                thread.join(timeout)
        if was_running:
            self._emit("optimizer_stopped", "GPU optimizer stopped")
        return thread is None or not thread.is_alive()

    def join(self) -> None:
        """Wait until the thread ends (after `stop()`); returns at once if it is not running."""
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()

    def trigger(self, node: str | None = None, load_absent: bool = False) -> None:
        """Queue an immediate pass: over one node, or the whole cluster when `node` is None."""
        if not self.running:
            return
        with self._lock:
            if node is None:
                self._pending_full = True
            else:
                self._pending_nodes[node] = load_absent or self._pending_nodes.get(node, False)
        self._wake.set()

    def _run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            self._wake.wait(self._seconds_to_next_pass())
            self._wake.clear()
            if stop.is_set():
                break
            full, nodes = self._take_pending()
            warm = [node for node, load_absent in nodes.items() if load_absent]
            plain = [node for node, load_absent in nodes.items() if not load_absent]
            try:
                if full:
                    self.run_pass(None, cancel=stop)
                elif plain:
                    self.run_pass(plain, cancel=stop)
                if warm:
                    self.run_pass(warm, cancel=stop, load_absent=True)
            except Exception:
                logger.exception("GPU optimizer pass failed")

    def _seconds_to_next_pass(self) -> float:
        with self._lock:
            return max(0.0, self._last_full_start + self._interval - time.monotonic())

    def _take_pending(self) -> tuple[bool, dict[str, bool]]:
        with self._lock:
            full = self._pending_full or time.monotonic() >= self._last_full_start + self._interval
            nodes = dict(sorted(self._pending_nodes.items()))
            self._pending_full = False
            self._pending_nodes.clear()
            if full:
                self._last_full_start = time.monotonic()
        return full, nodes

    def status(self) -> dict:
        """{'running','interval','next_pass_in','last_pass'} plus the pins and back-offs in force."""
        running = self.running
        with self._lock:
            next_in = max(0.0, self._last_full_start + self._interval - time.monotonic())
            return {
                "running": running,
                "interval": self._interval,
                "next_pass_in": round(next_in, 1) if running else None,
                "last_pass": dict(self._last_pass) if self._last_pass else None,
                "pinned_cpu": [{"node": n, "model": m} for n, m in sorted(self._pins)],
                "backed_off": [
                    {"node": n, "model": m, "reason": b.reason, "passes_to_skip": b.passes_to_skip}
                    for (n, m), b in sorted(self._backoff.items())
                ],
            }

    # ------------------------------------------------------------------ pins and back-off
    def pin_cpu(self, node: str, model: str) -> None:
        """The user forced `model` to CPU on `node`: the optimizer leaves it there until forced back."""
        with self._lock:
            self._pins.add((node, model_key(model)))

    def unpin_cpu(self, node: str, model: str) -> None:
        """A force to CPU that did nothing on `node` (the model was not loaded there) pins nothing."""
        with self._lock:
            self._pins.discard((node, model_key(model)))

    def is_pinned(self, node: str, model: str) -> bool:
        with self._lock:
            return (node, model_key(model)) in self._pins

    def release_model(self, model: str) -> None:
        """The user forced `model` somewhere: drop its pins and back-offs on every node."""
        name = model_key(model)
        with self._lock:
            self._pins = {key for key in self._pins if key[1] != name}
            self._backoff = {key: b for key, b in self._backoff.items() if key[1] != name}

    def export_state(self) -> dict:
        """The pins and back-offs as plain data, for a serve's state file (`import_state` reads it back):
        {'pinned_cpu': [{'node', 'model'}],
         'backed_off': [{'node', 'model', 'failures', 'passes_to_skip', 'reason'}]}.
        """
        with self._lock:
            return {
                "pinned_cpu": [{"node": n, "model": m} for n, m in sorted(self._pins)],
                "backed_off": [
                    {
                        "node": n,
                        "model": m,
                        "failures": b.failures,
                        "passes_to_skip": b.passes_to_skip,
                        "reason": b.reason,
                    }
                    for (n, m), b in sorted(self._backoff.items())
                ],
            }

    def import_state(self, state: dict, nodes: list[str] | None = None) -> int:
        """Add the pins and back-offs `export_state` wrote (on `nodes` only, when given: a node no longer in
        the cluster is dropped); malformed entries are skipped. Returns how many entries were taken."""
        pins: set[tuple[str, str]] = set()
        backoffs: dict[tuple[str, str], Backoff] = {}
        for entry in _entries(state.get("pinned_cpu")):
            pin = _node_model(entry, nodes)
            if pin is not None:
                pins.add(pin)
        for entry in _entries(state.get("backed_off")):
            key = _node_model(entry, nodes)
            failures, skip, reason = entry.get("failures"), entry.get("passes_to_skip"), entry.get("reason")
            if key is None or not isinstance(reason, str) or not _counts(failures, skip):
                continue
            backoffs[key] = Backoff(failures, min(skip, planner.BACKOFF_MAX_PASSES), reason)
        with self._lock:
            self._pins |= pins
            self._backoff.update(backoffs)
        return len(pins) + len(backoffs)

    def forget_node(self, node: str, keep_pins: bool = True) -> None:
        """A node restarted (memory is fresh: back-offs no longer apply) or was removed (drop pins too)."""
        with self._lock:
            self._backoff = {key: b for key, b in self._backoff.items() if key[0] != node}
            if not keep_pins:
                self._pins = {key for key in self._pins if key[0] != node}

    def _record_outcome(self, node: str, model: str, reason: str) -> int | None:
        """Back off after a failure or churn (planner.after_failure); the passes it will skip, or None."""
        with self._lock:
            backoff = planner.after_failure(self._backoff.get((node, model)), reason)
            if backoff is None:
                return None
            self._backoff[(node, model)] = backoff
            return backoff.passes_to_skip

    def _seen_on_gpu(self, node: str, model: str) -> None:
        """A failure back-off ends once the model is seen on GPU (or moved there); churn only counts down.
        A `no_room` said about it may be said again if it is kept off the GPU later."""
        with self._lock:
            self._no_room.discard((node, model))
            if planner.ends_on_gpu(self._backoff.get((node, model))):
                del self._backoff[(node, model)]

    def _decide(self, url: str, name: str, unmovable: dict | None, kind: str) -> Action | None:
        """The planner's decision with this optimizer's pins and back-offs; an interval skip counts down."""
        with self._lock:
            key = (url, name)
            backoff = self._backoff.get(key)
            skip = planner.decide(url, name, key in self._pins, unmovable, backoff, kind)
            if skip is not None and skip.reason == "backed_off" and backoff is not None:
                self._backoff[key] = planner.counted_down(backoff, kind)
            return skip

    # ------------------------------------------------------------------ the pass
    def run_pass(
        self,
        nodes: list[str] | None = None,
        cancel: threading.Event | None = None,
        load_absent: bool = False,
        asked: bool = False,
    ) -> list[dict]:
        """One pass now over `nodes` (all when None), nodes concurrently; returns the actions taken.

        `load_absent` also loads the priority models an idle node should hold (warm-up). Only a node that
        just came up (or a pass the user asked for) does that: on interval passes it would reload, every
        pass, a model that Ollama let expire because nobody used it. `asked`: the user wants this pass now,
        so back-offs do not hold it back.

        One pass at a time: the pass stays claimed until every node task has ended. A `cancel` stops further
        moves and returns at once with what is done; the pass itself then finishes in the background (a
        load already sent ends on the node) and only then emits `pass_finished`, with every move counted.
        """
        cancel = cancel or threading.Event()
        kind = PASS_ASKED if asked else PASS_INTERVAL if nodes is None else PASS_NODE
        if not self._claim_pass(cancel):
            return []
        actions: list[Action] = []
        finished = threading.Thread(
            target=self._run_claimed_pass,
            args=(nodes, cancel, load_absent, kind, actions),
            name="gpu-pass",
            daemon=True,
        )
        finished.start()
        while finished.is_alive() and not cancel.is_set():
            finished.join(FUTURE_POLL_SECONDS)
        with self._lock:
            return [a.as_dict() for a in actions]

    def plan_pass(self) -> list[dict]:
        """What a pass asked for now would do (`optimizer now --dry-run`), changing nothing.

        Status reads only: no probe, no move. Actions are `would_move`, `would_probe` or a pass's skips.
        """
        tasks = [self._cluster.run_node_task(lambda u=url: self._plan_node(u)) for url in self._cluster.nodes]
        wait(tasks)
        return [a.as_dict() for task in tasks if task.exception() is None for a in task.result()]

    def _plan_node(self, url: str) -> list[Action]:
        cluster = self._cluster
        state = cluster.node_state(url)
        if state is None:
            return []
        entry = planner.gate(url, state.online, state.gpu, state.gpu_evidence, PASS_ASKED)
        if entry.skip is not None:
            return [entry.skip]
        if entry.probe_lost_gpu:
            return [
                Action(url, None, "would_probe", "gpu_lost", f"would probe the lost GPU of {url}; no move")
            ]
        status = cluster.read_status(url)
        if "error" in status:
            return [Action(url, None, "skipped", "offline", f"{url}: {status['error']}")]
        patterns = priority_patterns(cluster.gpu_priority_models)
        installed = cluster.installed_models(url) if not status["models"] else set()
        wanted = planner.candidates(status["models"], patterns, installed, state.previous_gpu_models, True)
        actions = []
        if wanted.absent and state.gpu != "yes":
            actions.append(
                Action(url, None, "would_probe", "would_probe", f"would probe {url} for a GPU first")
            )
        where = {model_key(m["name"]): m.get("location") for m in status["models"]}
        with self._lock:
            pins, backoffs = set(self._pins), dict(self._backoff)
        planned = list(status["models"])  # what the node would hold after the moves planned so far
        for name in [*wanted.off_gpu, *wanted.absent]:
            key = (url, name)
            skip = planner.decide(
                url, name, key in pins, state.unmovable.get(name), backoffs.get(key), PASS_ASKED
            )
            if skip is not None:
                actions.append(skip)
                continue
            plan = self._room_for(url, name, status, planned)
            if plan.action in (room.NO_ROOM, room.BUSY):
                actions.append(Action(url, name, "skipped", plan.action, f"{name} on {url}: {plan.message}"))
                continue
            gone = {v.name for v in plan.victims} | {name}
            planned = [m for m in planned if model_key(m["name"]) not in gone]
            planned.append({"name": name, "vram_mb": plan.fit.need_mb or 0.0, "location": LOCATION_GPU})
            actions += [
                Action(url, v.name, "would_evict", "would_evict", f"would {self._eviction_text(v, name)}")
                for v in plan.victims
            ]
            now = where.get(name) or "not loaded: warm-up"
            actions.append(
                Action(url, name, "would_move", "would_move", f"would move {name} to GPU (now {now})")
            )
        return actions

    def _claim_pass(self, cancel: threading.Event) -> bool:
        """Wait (cancellably) until no other pass runs, then mark ours as running."""
        while True:
            with self._lock:
                if self._pass_free.is_set():
                    self._pass_free.clear()
                    return True
            if cancel.is_set():
                return False
            self._pass_free.wait(FUTURE_POLL_SECONDS)

    def _run_claimed_pass(
        self,
        nodes: list[str] | None,
        cancel: threading.Event,
        load_absent: bool,
        kind: str,
        actions: list[Action],
    ) -> None:
        try:
            known = self._cluster.nodes
            urls = known if nodes is None else [url for url in known if url in set(nodes)]
            started, t0 = time.time(), time.monotonic()
            scope = "all" if nodes is None else "nodes"
            only_node = urls[0] if scope == "nodes" and len(urls) == 1 else None
            self._emit(
                "pass_started",
                f"GPU optimization pass over {only_node or f'{len(urls)} node(s)'}",
                {"scope": scope, "nodes": len(urls), "node_urls": urls if scope == "nodes" else []},
                node=only_node,
            )
            checked = self._pass_over(urls, cancel, kind, load_absent, actions)
            with self._lock:
                done = list(actions)
            summary = {
                "moved": sum(a.action == "moved" for a in done),
                "failed": sum(a.action == "failed" for a in done),
                "skipped": sum(a.action == "skipped" for a in done),
                "evicted": sum(a.action == "evicted" for a in done),
                "undone": sum(a.action == "undone" for a in done),
                "checked_nodes": checked,
                "duration_s": round(time.monotonic() - t0, 3),
                "scope": scope,
                "started_at": started,
                "cancelled": cancel.is_set(),
            }
            with self._lock:
                self._last_pass = summary
            self._emit("pass_finished", _summary_sentence(summary), dict(summary), node=only_node)
        finally:
            self._pass_free.set()

    def _pass_over(
        self, urls: list[str], cancel: threading.Event, kind: str, load_absent: bool, actions: list[Action]
    ) -> int:
        """Gate every node (no I/O), read the others' status all at once, and give a node task only to the
        nodes with something to do; returns how many nodes' status was read.

        A steady node (every priority model already on GPU) costs its /api/ps read and nothing else: no
        thread, no task. A read is acted on as soon as it is in, so a hung node delays only itself."""
        cluster = self._cluster
        lock = threading.Lock()  # guards tasks and checked; no I/O under it
        tasks: list[Future] = []
        checked = [0]

        def add(action: Action) -> None:
            with self._lock:
                actions.append(action)

        def node_task(work: Callable[[], bool]) -> Future:
            task = cluster.run_node_task(work)
            with lock:
                tasks.append(task)
            return task

        to_read, probes = [], []
        for url in urls:
            state = cluster.node_state(url)
            if state is None or cancel.is_set():
                continue
            entry = planner.gate(url, state.online, state.gpu, state.gpu_evidence, kind)
            if entry.probe_lost_gpu:
                probe = functools.partial(self._optimize_node, url, cancel, kind, load_absent, actions)
                probes.append(node_task(probe))
            elif entry.skip is not None:
                add(entry.skip)
            else:
                to_read.append(url)

        reads = cluster.read_statuses(to_read)
        remaining = [len(reads)]
        all_read = threading.Event()  # set once every read's callback has run (wait() returns before that)

        def on_read(url: str, read: Future) -> None:
            try:
                status = _read_result(url, read)
                if "error" in status:
                    add(Action(url, None, "skipped", "offline", f"{url}: {status['error']}"))
                    return
                with lock:
                    checked[0] += 1
                if not cancel.is_set() and not self._steady(url, status, load_absent):
                    node_task(lambda: self._act_on_status(url, status, cancel, kind, load_absent, add))
            finally:
                with lock:
                    remaining[0] -= 1
                    if remaining[0] == 0:
                        all_read.set()

        if not reads:
            all_read.set()
        for url, read in reads.items():
            read.add_done_callback(functools.partial(on_read, url))
        all_read.wait()  # every read ends within the controller's timeout (the poller's deadlines)
        with lock:
            started = list(tasks)
        wait(started)
        for task in tasks:
            if not task.cancelled() and task.exception() is not None:
                logger.error("GPU optimizer node task failed", exc_info=task.exception())
        ok = [task for task in probes if not task.cancelled() and task.exception() is None]
        return checked[0] + sum(1 for task in ok if task.result())

    def _steady(self, url: str, status: dict, load_absent: bool) -> bool:
        """Nothing to do on this node (no I/O: it runs on the thread that delivered the read)."""
        state = self._cluster.node_state(url)
        if state is None or state.gpu in ("no", "lost"):
            return True
        if load_absent and not status["models"]:
            return False  # a warm-up needs the installed list: in a node task
        patterns = priority_patterns(self._cluster.gpu_priority_models)
        wanted = planner.candidates(status["models"], patterns, (), state.previous_gpu_models, False)
        for name in wanted.on_gpu_priority:
            self._seen_on_gpu(url, name)
        return not wanted.off_gpu

    def _optimize_node(
        self, url: str, cancel: threading.Event, kind: str, load_absent: bool, actions: list[Action]
    ) -> bool:
        """A node whose GPU was lost: probe it first; when the probe finds the GPU, read and act as any node.
        True when its status was read."""
        cluster = self._cluster

        def add(action: Action) -> None:
            with self._lock:
                actions.append(action)

        state = cluster.node_state(url)
        if state is None or cancel.is_set():
            return False
        entry = planner.gate(url, state.online, state.gpu, state.gpu_evidence, kind)
        if (
            entry.probe_lost_gpu
            and cluster.probe_gpu(url, cancel=cancel, trust_vram=False)["gpu"] is not True
        ):
            add(planner.lost_gpu_skip(url))
            return False
        if entry.skip is not None:
            add(entry.skip)
            return False
        status = cluster.read_status(url)
        if "error" in status:
            add(Action(url, None, "skipped", "offline", f"{url}: {status['error']}"))
            return False
        self._act_on_status(url, status, cancel, kind, load_absent, add)
        return True

    def _act_on_status(
        self,
        url: str,
        status: dict,
        cancel: threading.Event,
        kind: str,
        load_absent: bool,
        add: Callable[[Action], None],
    ) -> bool:
        """Ask the planner what the node's status calls for and have the node's owner move (a node task)."""
        cluster = self._cluster
        state = cluster.node_state(url)
        if state is None or state.gpu in ("no", "lost"):
            return True
        patterns = priority_patterns(cluster.gpu_priority_models)
        installed = cluster.installed_models(url) if load_absent and not status["models"] else set()
        wanted = planner.candidates(
            status["models"], patterns, installed, state.previous_gpu_models, load_absent
        )
        for name in wanted.on_gpu_priority:
            self._seen_on_gpu(url, name)
        absent = list(wanted.absent)
        if absent and state.gpu != "yes" and cluster.probe_gpu(url, cancel=cancel)["gpu"] is not True:
            absent = []  # never 41 GB into the RAM of a CPU-only node
        on_gpu = set(wanted.on_gpu_priority)
        for name in [*wanted.off_gpu, *absent]:
            if cancel.is_set():
                break
            action = self._consider_move(
                url, name, frozenset(on_gpu), state.unmovable.get(name), cancel, kind, status, add
            )
            add(action)
            self._say_no_room(url, name, action)
            if action.reason == "no_gpu":
                break  # the node just proved it has no GPU: reloading the others would land in RAM too
            if action.action == "moved":
                on_gpu.add(name)
            if action.action != "skipped":  # the next model's room is judged on what is loaded now
                fresh = cluster.read_status(url)
                status = status if "error" in fresh else fresh
        return True

    def _consider_move(
        self,
        url: str,
        name: str,
        priority_on_gpu: frozenset[str],
        unmovable: dict | None,
        cancel: threading.Event,
        kind: str,
        status: dict,
        add: Callable[[Action], None],
    ) -> Action:
        """Move one priority model to GPU unless the planner says skip, making room first when lower ones
        hold the VRAM it needs (room.py); back off on failure or churn."""
        skip = self._decide(url, name, unmovable, kind)
        if skip is not None:
            return skip
        plan = self._room_for(url, name, status)
        if plan.action in (room.NO_ROOM, room.BUSY):
            return Action(url, name, "skipped", plan.action, f"{name} on {url}: {plan.message}")
        evicted = self._evict(url, name, plan.victims, cancel, add)
        if isinstance(evicted, Action):
            return evicted
        result = self._cluster.move(url, name, "GPU", cancel=cancel, source="optimizer")
        reason, message = str(result.reason), result.message
        if not result.success:
            message += self._load_back(url, evicted, name, status)
            skipped = self._record_outcome(url, name, reason)
            if skipped:
                message = f"{message}; backed off for {skipped} pass(es)"
            return Action(url, name, "failed", reason, message)
        self._seen_on_gpu(url, name)  # a failure back-off ends with a move that worked
        if reason == "already":
            return Action(url, name, "skipped", "already", message)
        displaced = self._displaced_after_move(url, priority_on_gpu)
        higher, peers = self._ranked_against(name, displaced)
        if higher:
            was_loaded = any(model_key(m["name"]) == name for m in status["models"])
            return self._undo_move(url, name, higher, cancel, was_loaded)
        if result.evicted and self._cluster.evict_to == "cpu":
            self._to_cpu(url, name, result.evicted, cancel)
        if peers:  # a model of its own rank: neither may count on the other's place, so no ping-pong
            skipped = self._record_outcome(url, name, planner.DISPLACED)
            message = f"{message}; it displaced {', '.join(peers)} (backed off for {skipped} pass(es))"
        elif displaced:
            message = f"{message}; it displaced {', '.join(sorted(displaced))} (lower priority)"
        return Action(url, name, "moved", reason, message)

    # ------------------------------------------------------------------ room on the GPU (room.py)
    def _room_for(
        self, url: str, name: str, status: dict, planned: list[dict] | None = None
    ) -> room.RoomPlan:
        """The room planner's verdict for `name` on `url`, from the status just read, or (a dry run) what
        the node would hold after the moves `planned` before it (I/O: the exporter's figures, and the size
        of a model never seen loaded)."""
        cluster = self._cluster
        patterns = priority_patterns(cluster.gpu_priority_models)
        state = cluster.node_state(url)
        busy = state.in_flight_models if state is not None else {}
        residents = [
            room.Resident(
                model_key(m["name"]),
                float(m.get("vram_mb") or 0.0),
                priority_rank(m["name"], patterns),
                busy.get(model_key(m["name"]), 0) > 0,
                str(m.get("expires_at") or ""),
            )
            for m in (status["models"] if planned is None else planned)
            if not m.get("stopping")
        ]
        need = cluster.model_need_mb(url, name)
        bounds = cluster.vram_bounds(url, status["models"])
        return room.plan_room(name, priority_rank(name, patterns), need, residents, bounds)

    def _say_no_room(self, url: str, name: str, action: Action) -> None:
        """One `no_room` event when a priority model starts being kept off the GPU for want of room (not
        one every pass); said again only after it has moved or left."""
        key = (url, name)
        with self._lock:
            if action.reason == room.BUSY:
                self._busy_wait.add(url)
            new = action.reason == room.NO_ROOM and key not in self._no_room
            if action.reason == room.NO_ROOM:
                self._no_room.add(key)
            elif action.action != "skipped" or action.reason == "already":
                self._no_room.discard(key)
        if new:
            self._emit("no_room", action.message, {"reason": action.reason}, node=url, model=name)

    def model_idle(self, node: str) -> None:
        """The last routed request on a model of `node` ended: a move that waited for it is tried now."""
        with self._lock:
            waiting = node in self._busy_wait
            self._busy_wait.discard(node)
        if waiting:
            self.trigger(node)

    def _eviction_text(self, victim: room.Resident, name: str, done: bool = False) -> str:
        """`unload X (3.2 GB of VRAM, not a priority model, idle) to make room for Y`, or in the past."""
        to_cpu = self._cluster.evict_to == "cpu"
        how = ("moved to CPU" if to_cpu else "unloaded") if done else ("move to CPU" if to_cpu else "unload")
        what = "not a priority" if victim.rank is None else f"priority {victim.rank + 1}"
        held = f"{victim.vram_mb / 1024:.1f} GB of VRAM"
        return f"{how} {victim.name}, {held}, idle, {what}, to make room for {name}"

    def _evict(
        self,
        url: str,
        name: str,
        victims: Iterable[room.Resident],
        cancel: threading.Event,
        add: Callable[[Action], None],
    ) -> list[room.Resident] | Action:
        """Unload (or move to CPU) the victims in order; what was evicted, or a failed Action after loading
        back what had been evicted already (a failed eviction never costs a model)."""
        done: list[room.Resident] = []
        for victim in victims:
            if cancel.is_set():
                message = f"making room for {name} on {url} cancelled{self._load_back(url, done)}"
                return Action(url, name, "skipped", "cancelled", message)
            if self._cluster.evict_to == "cpu":
                result = self._cluster.move(url, victim.name, "CPU", cancel=cancel, source="optimizer")
            else:
                result = self._cluster.unload(url, victim.name, cancel=cancel, source="optimizer")
            if not result.success:
                message = f"could not make room for {name} on {url}: {result.message}"
                return Action(url, name, "failed", str(result.reason), message + self._load_back(url, done))
            done.append(victim)
            text = self._eviction_text(victim, name, done=True)
            add(Action(url, victim.name, "evicted", "evicted", text))
            data = {"for": name, "vram_mb": victim.vram_mb, "to": self._cluster.evict_to}
            self._emit("model_evicted", f"{url}: {text}", data, node=url, model=victim.name)
        return done

    def _load_back(
        self, url: str, evicted: list[room.Resident], name: str = "", status: dict | None = None
    ) -> str:
        """The move they made room for failed: the evicted models go back where they were, and `name`
        stays loaded (a load needing VRAM makes Ollama unload any idle model, even one in RAM: it is put
        back in RAM then, where a load evicts nothing). What happened, as a message tail."""
        said = []
        for victim in evicted:
            if self._cluster.evict_to == "cpu":
                back = self._cluster.move(url, victim.name, "GPU", source="optimizer")
            else:
                back = self._cluster.load_back(url, victim.name)
            said.append(f"{victim.name} loaded back" if back.success else f"{victim.name} not loaded back")
        before = next((m for m in (status or {}).get("models", []) if model_key(m["name"]) == name), None)
        if evicted and before is not None:
            now = self._cluster.read_status(url)
            if "error" not in now and not any(model_key(m["name"]) == name for m in now["models"]):
                again = self._cluster.load_back(url, name, on_cpu=True)
                said.append(f"{name} back in RAM" if again.success else f"{name} lost: {again.message}")
        return "".join(f"; {part}" for part in said)

    def _ranked_against(self, name: str, displaced: Iterable[str]) -> tuple[list[str], list[str]]:
        """The displaced models ranked above `name` (a lower priority never pushes out a higher one), and
        those of its own rank (neither may count on the other's place)."""
        patterns = priority_patterns(self._cluster.gpu_priority_models)
        rank = priority_rank(name, patterns)
        ranks = {d: priority_rank(d, patterns) for d in displaced}
        higher = sorted(d for d, r in ranks.items() if outranks(r, rank))
        return higher, sorted(d for d, r in ranks.items() if r == rank)

    def _undo_move(
        self, url: str, name: str, higher: list[str], cancel: threading.Event, was_loaded: bool
    ) -> Action:
        """Ollama made room for `name` by unloading higher priority models: put `name` back in RAM (or
        away, if a warm-up loaded it) and those back on the GPU. The node's owner has learned the VRAM it
        has (room.VramBounds.evicted), so the next pass finds no room instead of swapping again."""
        if was_loaded:
            back = self._cluster.move(url, name, "CPU", cancel=cancel, source="optimizer")
        else:
            back = self._cluster.unload(url, name, cancel=cancel, source="optimizer")
        where = "is back on CPU" if was_loaded else "is unloaded again"
        restored = [h for h in higher if self._cluster.move(url, h, "GPU", source="optimizer").success]
        missing = [h for h in higher if h not in restored]
        message = (
            f"{name} on {url} went to GPU but Ollama unloaded {', '.join(higher)} (higher priority) for it: "
            f"{name} {where if back.success else 'could not be moved back: ' + back.message}"
        )
        message += f"; {', '.join(restored)} back on GPU" if restored else ""
        message += f"; not restored yet: {', '.join(missing)}" if missing else ""
        return Action(url, name, "undone", room.NO_ROOM, message)

    def _to_cpu(self, url: str, name: str, evicted: Iterable[str], cancel: threading.Event) -> None:
        """With evict_to = cpu, models Ollama unloaded to load `name` go to RAM instead of away."""
        for model in evicted:
            if not cancel.is_set():
                self._cluster.move(url, model, "CPU", cancel=cancel, source="optimizer")

    def _displaced_after_move(self, url: str, priority_on_gpu: frozenset[str]) -> set[str]:
        """Priority models that were on GPU before a move and are not any more (churn guard)."""
        if not priority_on_gpu:
            return set()
        status = self._cluster.read_status(url)
        if "error" in status:
            return set()
        now_on_gpu = {model_key(m["name"]) for m in status["models"] if m.get("location") == "GPU (VRAM)"}
        return set(priority_on_gpu) - now_on_gpu

    def _emit(
        self,
        kind: str,
        message: str,
        data: dict[str, Any] | None = None,
        node: str | None = None,
        model: str | None = None,
    ) -> None:
        self._cluster.events.emit(Event(kind, node=node, model=model, message=message, data=data or {}))


def _read_result(url: str, read: Future) -> dict:
    """A read's status dict; a read that failed inside (never expected) is an error, not a lost node."""
    if read.cancelled():
        return {"node_url": url, "models": [], "error": "not read: closing"}
    error = read.exception()
    if error is not None:
        logger.error("status read of %s failed", url, exc_info=error)
        return {"node_url": url, "models": [], "error": f"status read failed ({type(error).__name__})"}
    return read.result()


def _summary_sentence(summary: dict) -> str:
    return (
        f"GPU pass finished in {summary['duration_s']:.2f} s: {summary['moved']} moved, "
        f"{summary['failed']} failed, {summary['skipped']} skipped, "
        f"{summary['checked_nodes']} node(s) checked"
    )


def _entries(value: Any) -> list[dict]:
    return [entry for entry in value if isinstance(entry, dict)] if isinstance(value, list) else []


def _node_model(entry: dict, nodes: list[str] | None) -> tuple[str, str] | None:
    """(node, model key) of a saved entry, or None when it is malformed or its node is gone."""
    node, model = entry.get("node"), entry.get("model")
    if not isinstance(node, str) or not isinstance(model, str) or not model.strip():
        return None
    if nodes is not None and node not in nodes:
        return None
    return node, model_key(model)


def _counts(failures: Any, skip: Any) -> bool:
    """Whole non-negative numbers (bool is an int in Python, and no count)."""
    return all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (failures, skip))


def _positive(seconds: float) -> float:
    value = float(seconds)
    if value <= 0:
        raise ValueError(f"interval must be positive, got {seconds!r}")
    return value
