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


@dataclass(eq=False, slots=True)
class Candidate:
    """What routing knows about one node for one request (built per request: plain slots, compared by
    identity; treat it as read-only)."""

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


@dataclass(frozen=True, eq=False)
class NodeView:
    """What routing reads of a node, taken from a NodeState snapshot once (`view`) and reused for many
    requests: model placements by model key, the installed keys, the GPU verdict, latency."""

    url: str
    online: bool | None
    gpu: str
    estimates: bool
    latency_ms: float | None
    placements: dict[str, tuple[str, float]]  # model key -> (location, gpu_percent); stopping ones left out
    installed: frozenset[str] | None  # None: the node's model list was never read


def view(state: Any) -> NodeView:
    """A NodeView of a NodeState snapshot (url, online, gpu, models, installed, latency)."""
    placements = {
        model_key(str(m.get("name", ""))): (str(m.get("location") or ""), float(m.get("gpu_percent") or 0))
        for m in state.models
        if not m.get("stopping")
    }
    known = getattr(state, "installed_known", bool(state.installed))
    return NodeView(
        url=state.url,
        online=state.online,
        gpu=state.gpu,
        estimates=bool(getattr(state, "reports_estimates", False)),
        latency_ms=state.latency_ms,
        placements=placements,
        installed=frozenset(state.installed) if known else None,
    )


def candidate(node: NodeView, key: str | None, in_flight: int = 0, cooling_s: float = 0.0) -> Candidate:
    """The Candidate of one node for a request for the model whose `model_key` is `key` (None: no model)."""
    placed = node.placements.get(key) if key is not None else None
    installed = None if key is None or node.installed is None else key in node.installed
    return Candidate(
        url=node.url,
        online=node.online,
        gpu=node.gpu,
        estimates=node.estimates,
        placement=None if placed is None else placed[0],
        gpu_percent=0.0 if placed is None else placed[1],
        installed=installed,
        in_flight=in_flight,
        latency_ms=node.latency_ms,
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
    """Every node: the usable ones in the strategy's order, then the skipped ones (offline, not installed,
    cooling down while another node can serve) with why."""
    strategy = check_strategy(strategy)
    name = canonical_name(model) if model else None
    usable, last_resort, skipped = _sort_out(list(nodes), name)
    ordered = [(n, False) for n in _order(usable, name, strategy, turn)]
    ordered += [(n, True) for n in _order(last_resort, name, strategy, turn)]
    return [_ranked(n, name, strategy, flag) for n, flag in ordered] + sorted(skipped, key=lambda r: r.url)


def choose(
    nodes: Iterable[Candidate],
    model: str | None,
    strategy: str = DEFAULT_STRATEGY,
    turn: int = 0,
    exclude: Iterable[str] = (),
) -> str | None:
    """The node to send the request to (None: no usable node); `exclude` = nodes already tried.
    The same choice as `rank`'s first, in one pass over the nodes (no reasons are phrased)."""
    strategy = check_strategy(strategy)
    excluded = set(exclude)
    usable, last_resort, _ = _sort_out([n for n in nodes if n.url not in excluded], model, explain=False)
    group = usable or last_resort
    if not group:
        return None
    if strategy == ROUND_ROBIN:
        return _order(group, model, strategy, turn)[0].url
    return min(group, key=_sort_key(model, strategy)).url


# --------------------------------------------------------------------------------------------- internals
def _sort_out(
    nodes: list[Candidate], name: str | None, explain: bool = True
) -> tuple[list[Candidate], list[Candidate], list[Ranked]]:
    """(usable, cooling down but the last resort, skipped with why)."""
    skipped: list[Ranked] = []
    alive = [n for n in nodes if n.online is not False]
    if explain:
        skipped += [_skip(n, "offline") for n in nodes if n.online is False]
    if name is not None:
        holders = [n for n in alive if n.installed is not False or n.placement is not None]
        if holders:  # else no node has it: any node answers Ollama's own 404
            if explain:
                lacking = [n for n in alive if n.installed is False and n.placement is None]
                skipped += [_skip(n, f"{name} is not installed there") for n in lacking]
            alive = holders
    fresh = [n for n in alive if n.cooling_s <= 0]
    cooling = [n for n in alive if n.cooling_s > 0]
    if fresh:
        if explain:
            skipped += [_skip(n, f"cooling down {n.cooling_s:.0f}s after errors") for n in cooling]
        return fresh, [], skipped
    return [], cooling, skipped


# --------------------------------------------------------------------------------------------- internals
def _latency(node: Candidate) -> float:
    return node.latency_ms if node.latency_ms is not None else float("inf")


def _sort_key(model: str | None, strategy: str) -> Any:
    """The order of a strategy other than round robin; nodes not checked yet after online ones."""
    if strategy == LEAST_LOADED:
        return lambda n: (n.online is not True, n.in_flight, _latency(n), n.url)
    if strategy == LOWEST_LATENCY:
        return lambda n: (n.online is not True, _latency(n), n.in_flight, n.url)
    if model is None:
        return lambda n: (n.online is not True, 0, n.in_flight, _latency(n), n.url)
    return lambda n: (n.online is not True, tier(n), n.in_flight, _latency(n), n.url)


def _order(nodes: list[Candidate], model: str | None, strategy: str, turn: int) -> list[Candidate]:
    if strategy == ROUND_ROBIN:
        by_url = sorted(nodes, key=lambda n: (n.online is not True, n.url))
        online = [n for n in by_url if n.online is True]
        shift = turn % len(online) if online else 0
        return online[shift:] + online[:shift] + [n for n in by_url if n.online is not True]
    return sorted(nodes, key=_sort_key(model, strategy))


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
