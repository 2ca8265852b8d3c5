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

import logging
import threading
import time
from concurrent.futures import Future, wait
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from flockparse import gpu_state as gs
from flockparse.events import Event
from flockparse.rules import (
    LOCATION_GPU,
    explicit_priority_names,
    is_off_gpu,
    matches_priority,
    model_key,
    priority_patterns,
)

if TYPE_CHECKING:
    from flockparse.balancer import NodeState, OllamaLoadBalancer

logger = logging.getLogger(__name__)

GLOB_CHARS = frozenset("*?[")
BACKOFF_MAX_PASSES = 32
NO_BACKOFF_REASONS = frozenset({"unreachable", "cancelled"})  # node-level trouble, handled by online state
UNMOVABLE_REASONS = frozenset({"pinned_by_modelfile", "not_controllable"})  # remembered by the balancer
FUTURE_POLL_SECONDS = 0.1  # how often a pass waiting on its nodes checks for cancellation
PASS_INTERVAL, PASS_NODE, PASS_ASKED = "interval", "node", "asked"  # what started a pass


# --------------------------------------------------------------------------------------------- names
# --------------------------------------------------------------------------------------------- policy
@dataclass
class Backoff:
    """A (node, model) that failed: skip it for `passes_to_skip` more passes (1, 2, 4 ... capped)."""

    failures: int
    passes_to_skip: int
    reason: str


def action(node: str, model: str | None, kind: str, reason: str, message: str) -> dict:
    """One entry of a pass result: kind is 'moved' | 'failed' | 'skipped'."""
    return {"node": node, "model": model, "action": kind, "reason": reason, "message": message}


class GPUOptimizer:
    """Background thread plus the pass logic; the balancer owns one and forwards its public methods."""

    def __init__(self, balancer: OllamaLoadBalancer, interval: float = 300.0) -> None:
        self._balancer = balancer
        self._interval = _positive(interval)
        self._lock = threading.Lock()  # guards the fields below; never held during I/O
        self._no_pass_running = threading.Event()  # one pass at a time, whoever asks (waited on, not locked)
        self._no_pass_running.set()
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
        with self._lock:
            self._pins.add((node, model_key(model)))

    def is_pinned(self, node: str, model: str) -> bool:
        with self._lock:
            return (node, model_key(model)) in self._pins

    def release_model(self, model: str) -> None:
        """The user forced `model` somewhere: drop its pins and back-offs on every node."""
        name = model_key(model)
        with self._lock:
            self._pins = {key for key in self._pins if key[1] != name}
            self._backoff = {key: b for key, b in self._backoff.items() if key[1] != name}

    def forget_node(self, node: str, keep_pins: bool = True) -> None:
        """A node restarted (memory is fresh: back-offs no longer apply) or was removed (drop pins too)."""
        with self._lock:
            self._backoff = {key: b for key, b in self._backoff.items() if key[0] != node}
            if not keep_pins:
                self._pins = {key for key in self._pins if key[0] != node}

    def _back_off(self, node: str, model: str, reason: str) -> int:
        """Record a failure (or churn); returns how many interval passes will skip the model.

        A failed move is retried at the next interval pass, then after 1, 3, 7 ... skipped ones: VRAM
        another program held may be free by then, and Ollama cannot tell us. A move that displaced
        another priority model waits 1, 2, 4 ... passes, so two models never swap every pass.
        """
        with self._lock:
            previous = self._backoff.get((node, model))
            failures = previous.failures + 1 if previous else 1
            doubling = 2 ** (failures - 1)
            skip = min(doubling if reason == "displaced" else doubling - 1, BACKOFF_MAX_PASSES)
            self._backoff[(node, model)] = Backoff(failures, skip, reason)
            return skip

    def _consume_backoff(self, node: str, model: str, kind: str) -> Backoff | None:
        """The back-off in force for this kind of pass (None means go ahead).

        Interval passes count it down. Node passes triggered by the monitor never retry a backed-off
        model (a failed move's own unload/reload can look like a model falling off the GPU). A pass the
        user asked for ignores back-offs: it is asked because something changed.
        """
        with self._lock:
            entry = self._backoff.get((node, model))
            if entry is None or kind == PASS_ASKED:
                return None
            if kind == PASS_INTERVAL:
                if entry.passes_to_skip <= 0:
                    return None
                entry.passes_to_skip -= 1
            return Backoff(entry.failures, entry.passes_to_skip, entry.reason)

    def _seen_on_gpu(self, node: str, model: str) -> None:
        """A failure back-off ends once the model is seen on GPU; a churn back-off only expires."""
        with self._lock:
            entry = self._backoff.get((node, model))
            if entry is not None and entry.reason != "displaced":
                del self._backoff[(node, model)]

    # ------------------------------------------------------------------ the pass
    def run_pass(
        self,
        nodes: list[str] | None = None,
        cancel: threading.Event | None = None,
        load_absent: bool = False,
        asked: bool = False,
    ) -> list[dict]:
        """One pass now over `nodes` (all when None), nodes concurrently; returns the actions taken.

        `load_absent` also loads the priority models a node should hold (warm-up). Only a node that just
        came up (or a pass the user asked for) does that: on interval passes it would reload, every pass,
        a model that Ollama let expire because nobody used it. `asked`: the user wants this pass now, so
        back-offs do not hold it back.
        """
        cancel = cancel or threading.Event()
        kind = PASS_ASKED if asked else PASS_INTERVAL if nodes is None else PASS_NODE
        if not self._claim_pass(cancel):
            return []
        try:
            return self._run_claimed_pass(nodes, cancel, load_absent, kind)
        finally:
            self._no_pass_running.set()

    def _claim_pass(self, cancel: threading.Event) -> bool:
        """Wait (cancellably) until no other pass runs, then mark ours as running."""
        while True:
            with self._lock:
                if self._no_pass_running.is_set():
                    self._no_pass_running.clear()
                    return True
            if cancel.is_set():
                return False
            self._no_pass_running.wait(FUTURE_POLL_SECONDS)

    def _run_claimed_pass(
        self, nodes: list[str] | None, cancel: threading.Event, load_absent: bool, kind: str
    ) -> list[dict]:
        known = self._balancer.nodes
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
        submit = self._balancer._work_pool.submit
        futures = [submit(self._optimize_node, url, cancel, kind, load_absent) for url in urls]
        results = _collect(futures, cancel)
        actions = [a for _, node_actions in results for a in node_actions]
        summary = {
            "moved": sum(a["action"] == "moved" for a in actions),
            "failed": sum(a["action"] == "failed" for a in actions),
            "skipped": sum(a["action"] == "skipped" for a in actions),
            "checked_nodes": sum(checked for checked, _ in results),
            "duration_s": round(time.monotonic() - t0, 3),
            "scope": scope,
            "started_at": started,
            "cancelled": cancel.is_set(),
        }
        with self._lock:
            self._last_pass = summary
        self._emit("pass_finished", _summary_sentence(summary), dict(summary), node=only_node)
        return actions

    def _optimize_node(
        self, url: str, cancel: threading.Event, kind: str, load_absent: bool
    ) -> tuple[bool, list[dict]]:
        """Read one node's status and move what needs moving; (status read?, actions)."""
        balancer = self._balancer
        state = balancer.node_state(url)
        if state is None or cancel.is_set():
            return False, []
        if state.online is False:
            return False, [action(url, None, "skipped", "offline", f"{url} is offline")]
        if state.gpu == gs.GPU_NO:
            return False, [action(url, None, "skipped", "no_gpu", f"{url} has no GPU ({state.gpu_evidence})")]
        if state.gpu == gs.GPU_LOST and not self._gpu_found_again(url, cancel, kind):
            message = f"{url} has lost its GPU: no move is tried until it is seen again. "
            return False, [action(url, None, "skipped", "gpu_lost", message + gs.lost_remedy_text(url))]
        status = balancer.controller.get_model_status(url)
        balancer._record_status(url, status, trigger=False)
        if "error" in status:
            return False, [action(url, None, "skipped", "offline", f"{url}: {status['error']}")]
        state = balancer.node_state(url)
        if state is None or state.gpu in (gs.GPU_NO, gs.GPU_LOST):
            return True, []
        patterns = priority_patterns(balancer.gpu_priority_models)
        loaded = {model_key(m["name"]): m for m in status.get("models", [])}
        on_gpu = {name for name, m in loaded.items() if m.get("location") == LOCATION_GPU}
        candidates = []
        for name, model in loaded.items():
            if not matches_priority(name, patterns):
                continue
            if name in on_gpu:
                self._seen_on_gpu(url, name)
            elif is_off_gpu(model) and model.get("controllable", True):
                candidates.append(name)
        if load_absent:
            candidates += self._absent_to_warm(url, state, loaded, patterns, cancel)
        actions = []
        for name in candidates:
            if cancel.is_set():
                break
            priority_on_gpu = {n for n in on_gpu if matches_priority(n, patterns)}
            actions.append(self._consider_move(url, name, priority_on_gpu, cancel, kind))
            if actions[-1]["reason"] == "no_gpu":
                break  # the node just proved it has no GPU: reloading the others would land in RAM too
            if actions[-1]["action"] == "moved":
                on_gpu.add(name)
        return True, actions

    def _gpu_found_again(self, url: str, cancel: threading.Event, kind: str) -> bool:
        """A lost GPU is asked again on interval and asked-for passes, by a tiny probe load (never a
        priority model): VRAM still held by runners from before the loss proves nothing."""
        if kind == PASS_NODE:
            return False
        return self._balancer.probe_gpu(url, cancel=cancel, trust_vram=False)["gpu"] is True

    def _absent_to_warm(
        self,
        url: str,
        state: NodeState,
        loaded: dict[str, dict],
        patterns: list[str],
        cancel: threading.Event,
    ) -> list[str]:
        """Warm-up of a node that holds nothing (after a restart Ollama has nothing loaded): priority models
        named exactly, and those matching a glob that were on this node's GPU before; installed ones. They
        are loaded only onto a GPU that is known, declared or shown by a small probe (never 41 GB into the
        RAM of a CPU-only node). A node holding models gets none: loading more could evict them."""
        if loaded:  # a warm-up never evicts what clients loaded: it is for a node that holds nothing
            return []
        balancer = self._balancer
        installed = set(state.installed)
        if not state.installed_checked_at:  # seen up by this pass before the monitor read /api/tags
            reply = balancer.controller.list_installed(url)
            balancer._record_installed(url, reply)
            installed = {model_key(name) for name in reply.get("models", [])}
        wanted = explicit_priority_names(patterns)
        wanted += [n for n in state.previous_gpu_models if matches_priority(n, patterns)]
        absent = [n for n in dict.fromkeys(wanted) if n not in loaded and n in installed]
        if not absent or state.gpu == gs.GPU_YES:
            return absent
        return absent if balancer.probe_gpu(url, cancel=cancel)["gpu"] is True else []

    def _consider_move(
        self, url: str, name: str, priority_on_gpu: set[str], cancel: threading.Event, kind: str
    ) -> dict:
        """Move one priority model to GPU unless pinned or backed off; back off on failure or churn."""
        if self.is_pinned(url, name):
            return action(url, name, "skipped", "pinned_cpu", f"{name} on {url} is pinned to CPU by the user")
        state = self._balancer.node_state(url)
        known = state.unmovable.get(name) if state is not None else None
        if known is not None:  # a Modelfile pin or an MLX model: retrying would only reload it
            return action(url, name, "skipped", known["reason"], known["message"])
        entry = self._consume_backoff(url, name, kind)
        if entry is not None:
            return action(
                url, name, "skipped", "backed_off",
                f"{name} on {url} is backed off after {entry.reason} ({entry.passes_to_skip} more pass(es))",
            )  # fmt: skip
        result = self._balancer._move(url, name, "GPU", cancel=cancel, source="optimizer")
        reason = str(result.get("reason") or ("moved" if result.get("success") else "error"))
        message = str(result.get("message", ""))
        if not result.get("success"):
            if reason not in NO_BACKOFF_REASONS and reason not in UNMOVABLE_REASONS:
                skip = self._back_off(url, name, reason)
                message = f"{message} (backed off for {skip} pass(es))"
            return action(url, name, "failed", reason, message)
        self._seen_on_gpu(url, name)  # a failure back-off ends with a move that worked
        if reason == "already":
            return action(url, name, "skipped", "already", message)
        displaced = self._displaced_after_move(url, priority_on_gpu)
        if displaced:
            skip = self._back_off(url, name, "displaced")
            message = (
                f"{message}; it displaced {', '.join(sorted(displaced))} (backed off for {skip} pass(es))"
            )
        return action(url, name, "moved", reason, message)

    def _displaced_after_move(self, url: str, priority_on_gpu: set[str]) -> set[str]:
        """Priority models that were on GPU before a move and are not any more (churn guard)."""
        if not priority_on_gpu:
            return set()
        status = self._balancer.controller.get_model_status(url)
        self._balancer._record_status(url, status, trigger=False)
        if "error" in status:
            return set()
        now_on_gpu = {
            model_key(m["name"]) for m in status.get("models", []) if m.get("location") == LOCATION_GPU
        }
        return priority_on_gpu - now_on_gpu

    def _emit(
        self, kind: str, message: str, data: dict[str, Any] | None = None, node: str | None = None
    ) -> None:
        self._balancer.events.emit(Event(kind, node=node, message=message, data=data or {}))


def _collect(futures: list[Future], cancel: threading.Event) -> list[tuple[bool, list[dict]]]:
    """Results of the node tasks in node order; stops waiting when cancelled (tasks finish on their own)."""
    pending = set(futures)
    while pending and not cancel.is_set():
        _, pending = wait(pending, timeout=FUTURE_POLL_SECONDS)
    results = []
    for future in futures:
        if not future.done() or future.cancelled():
            continue
        try:
            results.append(future.result())
        except Exception:
            logger.exception("GPU optimizer node task failed")
    return results


def _summary_sentence(summary: dict) -> str:
    return (
        f"GPU pass finished in {summary['duration_s']:.2f} s: {summary['moved']} moved, "
        f"{summary['failed']} failed, {summary['skipped']} skipped, "
        f"{summary['checked_nodes']} node(s) checked"
    )


def _positive(seconds: float) -> float:
    value = float(seconds)
    if value <= 0:
        raise ValueError(f"interval must be positive, got {seconds!r}")
    return value
