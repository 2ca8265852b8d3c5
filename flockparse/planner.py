"""The optimizer's decisions as pure functions: from what was observed to what to do. No sockets, no clock.

The optimizer (optimizer.py) observes a node (its state, a fresh `/api/ps`, the installed models), asks
these functions what to do, and has the node's owner carry it out. Keeping the decisions here means the
rules (which models, which nodes, pins, Modelfile verdicts, back-offs, no ping-pong, no warm-up next to
models clients loaded) are tested as plain data in tests/test_planner.py.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace

from flockparse import gpu_state as gs
from flockparse.rules import LOCATION_GPU, explicit_priority_names, is_off_gpu, matches_priority, model_key

PASS_INTERVAL, PASS_NODE, PASS_ASKED = "interval", "node", "asked"  # what started a pass
BACKOFF_MAX_PASSES = 32
DISPLACED = "displaced"
# node-level trouble, handled by the node's online state or GPU verdict: never a back-off of the model
NO_BACKOFF_REASONS = frozenset({"unreachable", "cancelled", "no_gpu"})
UNMOVABLE_REASONS = frozenset({"pinned_by_modelfile", "not_controllable"})  # remembered by the node's owner


@dataclass(frozen=True)
class Backoff:
    """A (node, model) that failed or churned: interval passes skip it `passes_to_skip` more times."""

    failures: int
    passes_to_skip: int
    reason: str


@dataclass(frozen=True)
class Action:
    """One entry of a pass result (the spec's dict at the edge: `as_dict`)."""

    node: str
    model: str | None
    action: str  # "moved" | "failed" | "skipped"
    reason: str
    message: str

    def as_dict(self) -> dict:
        return {"node": self.node, "model": self.model, "action": self.action, "reason": self.reason,
                "message": self.message}  # fmt: skip


@dataclass(frozen=True)
class Gate:
    """Before a node's status is read: skip it (`skip`), ask a lost GPU again by a probe, or go on."""

    skip: Action | None = None
    probe_lost_gpu: bool = False


@dataclass(frozen=True)
class Candidates:
    """What a node's fresh status asks for: priority models to bring back, and absent ones to warm up."""

    off_gpu: tuple[str, ...]  # loaded priority models on CPU or split, in the node's order
    absent: tuple[str, ...]  # installed priority models to load (warm-up of an idle node only)
    on_gpu_priority: frozenset[str]  # priority models already 100% on GPU (churn guard)


def gate(url: str, online: bool | None, gpu: str, gpu_evidence: str, kind: str) -> Gate:
    """Offline and CPU-only nodes are skipped; a lost GPU gets no move, only a probe on interval and
    asked-for passes (VRAM still held by runners from before the loss proves nothing)."""
    if online is False:
        return Gate(skip=Action(url, None, "skipped", "offline", f"{url} is offline"))
    if gpu == gs.GPU_NO:
        return Gate(skip=Action(url, None, "skipped", "no_gpu", f"{url} has no GPU ({gpu_evidence})"))
    if gpu == gs.GPU_LOST:
        if kind == PASS_NODE:
            return Gate(skip=lost_gpu_skip(url))
        return Gate(probe_lost_gpu=True)
    return Gate()


def lost_gpu_skip(url: str) -> Action:
    message = f"{url} has lost its GPU: no move is tried until it is seen again. {gs.lost_remedy_text(url)}"
    return Action(url, None, "skipped", "gpu_lost", message)


def candidates(
    models: Iterable[Mapping],
    patterns: list[str],
    installed: Iterable[str],
    previous_gpu_models: Iterable[str],
    load_absent: bool,
) -> Candidates:
    """Loaded priority models off the GPU (not MLX: Ollama places those itself), and, for a warm-up of a
    node that holds nothing, the priority models named exactly plus glob matches that were on its GPU
    before, installed ones only. A node holding models gets no warm-up: loading more could evict them."""
    loaded = {model_key(m["name"]): m for m in models}
    off_gpu = tuple(
        name
        for name, m in loaded.items()
        if matches_priority(name, patterns) and is_off_gpu(m) and m.get("controllable", True)
    )
    on_gpu = frozenset(
        name
        for name, m in loaded.items()
        if m.get("location") == LOCATION_GPU and matches_priority(name, patterns)
    )
    absent: tuple[str, ...] = ()
    if load_absent and not loaded:
        wanted = explicit_priority_names(patterns)
        wanted += [n for n in previous_gpu_models if matches_priority(n, patterns)]
        have = set(installed)
        absent = tuple(n for n in dict.fromkeys(wanted) if n in have)
    return Candidates(off_gpu, absent, on_gpu)


def decide(
    url: str,
    model: str,
    pinned: bool,
    unmovable: Mapping | None,
    backoff: Backoff | None,
    kind: str,
) -> Action | None:
    """A skip for this model now, or None to move it. Pins and Modelfile/MLX verdicts always hold;
    back-offs hold on interval passes until counted down, always on node passes, never on asked passes."""
    if pinned:
        return Action(url, model, "skipped", "pinned_cpu", f"{model} on {url} is pinned to CPU by the user")
    if unmovable is not None:  # a Modelfile pin or an MLX model: retrying would only reload it
        return Action(url, model, "skipped", str(unmovable["reason"]), str(unmovable["message"]))
    if backoff is None or kind == PASS_ASKED or (kind == PASS_INTERVAL and backoff.passes_to_skip <= 0):
        return None
    left = backoff.passes_to_skip - 1 if kind == PASS_INTERVAL else backoff.passes_to_skip
    message = f"{model} on {url} is backed off after {backoff.reason} ({max(left, 0)} more pass(es))"
    return Action(url, model, "skipped", "backed_off", message)


def counted_down(backoff: Backoff, kind: str) -> Backoff:
    """The back-off after an interval pass skipped the model (other passes do not count)."""
    if kind != PASS_INTERVAL or backoff.passes_to_skip <= 0:
        return backoff
    return replace(backoff, passes_to_skip=backoff.passes_to_skip - 1)


def after_failure(previous: Backoff | None, reason: str) -> Backoff | None:
    """The back-off after a failed move (None: this failure is not the model's fault, no back-off).

    A failed move is retried at the next interval pass (VRAM another program held may be free by then,
    and Ollama cannot tell us), then after 1, 3, 7 ... skipped ones. A move that displaced another priority
    model waits 1, 2, 4 ... passes, so two models that do not fit together never swap every pass.
    """
    if reason in NO_BACKOFF_REASONS or reason in UNMOVABLE_REASONS:
        return None
    failures = previous.failures + 1 if previous else 1
    doubling = 2 ** (failures - 1)
    skip = min(doubling if reason == DISPLACED else doubling - 1, BACKOFF_MAX_PASSES)
    return Backoff(failures, skip, reason)


def ends_on_gpu(backoff: Backoff | None) -> bool:
    """A failure back-off ends once the model is seen on GPU; a churn back-off only counts down."""
    return backoff is not None and backoff.reason != DISPLACED
