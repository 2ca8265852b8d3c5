"""Which node serves a request, and why: the routing strategies as pure functions.

One module for both routers: the balancer's Python routing (`OllamaLoadBalancer.pick_node`, `generate`,
`embed`) and `serve`'s HTTP proxy. Input is one `Candidate` per node (the facts routing needs, built from a
NodeState snapshot by `candidate()`); output is the nodes in preference order, each with a one-phrase
reason, then the nodes skipped and why (`route MODEL` prints exactly that). No I/O and no clock: the caller
passes how long each node still cools down after errors, and a turn number for round robin.

Strategies:
- `adaptive` (default): by tier (`Tier`: the model 100% in VRAM, loaded on a GPU node, installed on a GPU
  node, split, in RAM, installed where the GPU is unknown, installed on a CPU-only node), then fewest in
  flight, then lowest latency;
- `round_robin`: the usable nodes in turn;
- `least_loaded`: fewest requests in flight, then lowest latency;
- `lowest_latency`: lowest health-check latency, then fewest in flight.

Every strategy skips nodes that are offline, nodes cooling down after errors (used only when nothing else
is left) and nodes whose model list is known and lacks the model (unless no node has it: then a node's own
404 is the honest answer). Nodes not checked yet come after every online node.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

from flockparse import gpu_state as gs
from flockparse.rules import LOCATION_CPU, LOCATION_GPU, canonical_name, model_key

ADAPTIVE, ROUND_ROBIN = "adaptive", "round_robin"
LEAST_LOADED, LOWEST_LATENCY = "least_loaded", "lowest_latency"
STRATEGIES = (ADAPTIVE, ROUND_ROBIN, LEAST_LOADED, LOWEST_LATENCY)
DEFAULT_STRATEGY = ADAPTIVE
STRATEGY_WORDS = {
    ADAPTIVE: "the model's placement first (VRAM, GPU node, split, CPU), then fewest in flight",
    ROUND_ROBIN: "each usable node in turn",
    LEAST_LOADED: "fewest requests in flight, then lowest latency",
    LOWEST_LATENCY: "lowest health-check latency, then fewest in flight",
}


class Tier(IntEnum):
    """The adaptive order: lower is better. The first five are the issue's order; the last three say why
    a node without the model loaded ranks after one that holds it in RAM."""

    IN_VRAM = 0  # loaded, 100% in VRAM (measured: Ollama >= 0.30)
    LOADED_GPU_NODE = 1  # loaded on a GPU node, placement not measured (Ollama < 0.30 estimates) or unknown
    INSTALLED_GPU_NODE = 2  # not loaded; installed on a node with a GPU: Ollama loads it onto the GPU first
    SPLIT = 3  # loaded split between VRAM and RAM
    IN_RAM = 4  # loaded 100% in RAM
    GPU_UNKNOWN = 5  # not loaded; installed on a node whose GPU is not known yet
    CPU_NODE = 6  # not loaded; installed on a CPU-only node or one that lost its GPU
    NOT_INSTALLED = 7  # no node has it: the node answers Ollama's own 404


@dataclass(frozen=True)
class Candidate:
    """What routing knows about one node for one request."""

    url: str
    online: bool | None  # None: not checked yet
    gpu: str = gs.GPU_UNKNOWN  # yes | no | unknown | lost
    estimates: bool = False  # Ollama < 0.30: /api/ps placements are predictions
    placement: str | None = None  # the model's location there (`GPU (VRAM)`, `Split (..)`); None: not loaded
    gpu_percent: float = 0.0
    installed: bool | None = None  # None: the node's model list was never read
    in_flight: int = 0
    latency_ms: float | None = None
    cooling_s: float = 0.0  # > 0: cooling down after errors for this long


@dataclass(frozen=True)
class Ranked:
    """One node's place in the order (or why it is skipped), as `route MODEL` shows it."""

    url: str
    reason: str  # one phrase: why it ranks here, or why it is skipped
    tier: Tier | None = None  # adaptive only
    in_flight: int = 0
    latency_ms: float | None = None
    skipped: bool = False
    last_resort: bool = False  # cooling down, used only because nothing else is left

    def as_dict(self) -> dict[str, Any]:
        return {
            "node": self.url,
            "reason": self.reason,
            "tier": None if self.tier is None else self.tier.name.lower(),
            "in_flight": self.in_flight,
            "latency_ms": self.latency_ms,
            "skipped": self.skipped,
            "last_resort": self.last_resort,
        }


def check_strategy(name: str) -> str:
    """The strategy's name, or a ValueError naming the four (one line for the console and config)."""
    value = str(name).strip().lower().replace("-", "_")
    if value not in STRATEGIES:
        raise ValueError(f"unknown routing `{name}` (one of: {', '.join(STRATEGIES)})")
    return value


def candidate(state: Any, model: str | None, cooling_s: float = 0.0) -> Candidate:
    """A Candidate from a NodeState snapshot (url, online, gpu, models, installed, in_flight, latency)."""
    key = model_key(model) if model else None
    row = None
    if key is not None:
        row = next(
            (m for m in state.models if not m.get("stopping") and model_key(str(m.get("name", ""))) == key),
            None,
        )
    installed: bool | None = None
    if key is not None and getattr(state, "installed_known", bool(state.installed)):
        installed = key in state.installed
    return Candidate(
        url=state.url,
        online=state.online,
        gpu=state.gpu,
        estimates=bool(getattr(state, "reports_estimates", False)),
        placement=None if row is None else str(row.get("location") or ""),
        gpu_percent=float((row or {}).get("gpu_percent") or 0),
        installed=installed,
        in_flight=int(state.in_flight),
        latency_ms=state.latency_ms,
        cooling_s=cooling_s,
    )


def tier(node: Candidate) -> Tier:
    """The adaptive tier of a node for the request's model (see `Tier`)."""
    gpu_node = node.gpu == gs.GPU_YES
    if node.placement is not None:
        if node.placement == LOCATION_GPU:
            return Tier.LOADED_GPU_NODE if node.estimates else Tier.IN_VRAM
        if node.placement == LOCATION_CPU:
            return Tier.IN_RAM
        if node.placement.startswith("Split"):
            return Tier.SPLIT
        return Tier.LOADED_GPU_NODE if gpu_node else Tier.IN_RAM  # `Unknown`: Ollama's figures disagree
    if node.installed is False:
        return Tier.NOT_INSTALLED
    if gpu_node:
        return Tier.INSTALLED_GPU_NODE
    return Tier.GPU_UNKNOWN if node.gpu == gs.GPU_UNKNOWN else Tier.CPU_NODE


def _tier_reason(node: Candidate, level: Tier, model: str) -> str:
    if level == Tier.IN_VRAM:
        return f"{model} is 100% in VRAM"
    if level == Tier.LOADED_GPU_NODE:
        why = "Ollama < 0.30 only estimates it" if node.estimates else "its placement is unknown"
        return f"{model} is loaded on a GPU node ({why})"
    if level == Tier.INSTALLED_GPU_NODE:
        return f"{model} is installed on a GPU node: Ollama loads it first"
    if level == Tier.SPLIT:
        return f"{model} is split ({node.gpu_percent:.0f}% in VRAM, the rest in RAM)"
    if level == Tier.IN_RAM:
        return f"{model} is loaded 100% in RAM"
    if level == Tier.GPU_UNKNOWN:
        return f"{model} is installed; the node's GPU is not known yet: Ollama loads it first"
    if level == Tier.CPU_NODE:
        what = "its GPU is lost" if node.gpu == gs.GPU_LOST else "CPU only"
        return f"{model} is installed ({what}): Ollama loads it into RAM first"
    return f"no node has {model}: this node answers for Ollama"


def rank(
    nodes: Iterable[Candidate], model: str | None, strategy: str = DEFAULT_STRATEGY, turn: int = 0
) -> list[Ranked]:
    """Every node: the usable ones in the strategy's order, then the skipped ones (offline, not installed)."""
    strategy = check_strategy(strategy)
    nodes = list(nodes)
    name = canonical_name(model) if model else None
    skipped: list[Ranked] = []
    usable: list[Candidate] = []
    for node in nodes:
        if node.online is False:
            skipped.append(_skip(node, "offline"))
        else:
            usable.append(node)
    if name is not None and any(n.installed is not False or n.placement is not None for n in usable):
        keep = [n for n in usable if n.installed is not False or n.placement is not None]
        skipped += [_skip(n, f"{name} is not installed there") for n in usable if n not in keep]
        usable = keep
    fresh = [n for n in usable if n.cooling_s <= 0]
    cooling = [n for n in usable if n.cooling_s > 0]
    if fresh:
        skipped += [_skip(n, f"cooling down {n.cooling_s:.0f}s after errors") for n in cooling]
        cooling = []
    ordered = _order(fresh, name, strategy, turn) + _order(cooling, name, strategy, turn)
    return [_ranked(n, name, strategy, n in cooling) for n in ordered] + sorted(skipped, key=lambda r: r.url)


def choose(
    nodes: Iterable[Candidate],
    model: str | None,
    strategy: str = DEFAULT_STRATEGY,
    turn: int = 0,
    exclude: Iterable[str] = (),
) -> str | None:
    """The node to send the request to (None: no usable node); `exclude` = nodes already tried."""
    excluded = set(exclude)
    order = rank([n for n in nodes if n.url not in excluded], model, strategy, turn)
    return next((r.url for r in order if not r.skipped), None)


# --------------------------------------------------------------------------------------------- internals
def _latency(node: Candidate) -> float:
    return node.latency_ms if node.latency_ms is not None else float("inf")


def _order(nodes: list[Candidate], model: str | None, strategy: str, turn: int) -> list[Candidate]:
    unchecked = lambda n: n.online is not True  # noqa: E731 - nodes not checked yet come after online ones
    if strategy == ROUND_ROBIN:
        by_url = sorted(nodes, key=lambda n: (unchecked(n), n.url))
        online = [n for n in by_url if not unchecked(n)]
        shift = turn % len(online) if online else 0
        return online[shift:] + online[:shift] + [n for n in by_url if unchecked(n)]
    if strategy == LEAST_LOADED:
        return sorted(nodes, key=lambda n: (unchecked(n), n.in_flight, _latency(n), n.url))
    if strategy == LOWEST_LATENCY:
        return sorted(nodes, key=lambda n: (unchecked(n), _latency(n), n.in_flight, n.url))
    level = (lambda n: tier(n)) if model is not None else (lambda n: 0)
    return sorted(nodes, key=lambda n: (unchecked(n), level(n), n.in_flight, _latency(n), n.url))


def _ranked(node: Candidate, model: str | None, strategy: str, last_resort: bool) -> Ranked:
    level: Tier | None = None
    if strategy == ADAPTIVE and model is not None:
        level = tier(node)
        reason = _tier_reason(node, level, model)
    elif strategy == ADAPTIVE:
        reason = "no model named: any node"
    else:
        reason = STRATEGY_WORDS[strategy]
    if node.online is None:
        reason += "; not checked yet"
    if last_resort:
        reason += f"; cooling down {node.cooling_s:.0f}s after errors, but no other node is left"
    return Ranked(node.url, reason, level, node.in_flight, node.latency_ms, last_resort=last_resort)


def _skip(node: Candidate, why: str) -> Ranked:
    return Ranked(node.url, why, None, node.in_flight, node.latency_ms, skipped=True)
