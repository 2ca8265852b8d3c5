"""Placement history as pure functions: rows in, shares, fallbacks, moves and sparkline buckets out.

The history store (flockparse/history.py) records only changes: a placement row when what a node holds
where changes, a node row when a node goes up or down or its GPU is lost, a move row per move outcome, and
sessions (the spans of time something was recording). This module replays those rows over a window and
says, per (node, model), how long the model was on GPU, split, on CPU, not loaded, on a node that was down,
or unknown (nobody was recording, or the node was not checked yet). No I/O, no clock: tests feed rows.

Rules:
- time outside every session is `unknown`; when recording starts again, every placement is forgotten (a
  model may have been loaded or unloaded meanwhile) and each node is `unknown` until its first check;
- a node that is down makes its models `offline` (their last placement is kept for when it comes back);
- a fallback is a placement change to split or CPU whose previous loaded placement was GPU, not caused by
  a move (a user's force_cpu is not a fallback): `gpu -> cpu`, `gpu -> split`, `gpu -> not loaded -> cpu`;
- shares are over the known time of the window (unknown time left out), so they add up to 1.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field

from flockparse.rules import LOCATION_CPU, LOCATION_GPU

GPU, SPLIT, CPU, NOT_LOADED, OFFLINE, UNKNOWN = "gpu", "split", "cpu", "not_loaded", "offline", "unknown"
LOADED = (GPU, SPLIT, CPU)
CATEGORIES = (GPU, SPLIT, CPU, NOT_LOADED, OFFLINE, UNKNOWN)
KNOWN = (GPU, SPLIT, CPU, NOT_LOADED, OFFLINE)
NODE_UP, NODE_GPU_LOST, NODE_DOWN = "up", "gpu_lost", "down"
NODE_CATEGORIES = (NODE_UP, NODE_GPU_LOST, NODE_DOWN, UNKNOWN)
NODE_KINDS = ("node_up", "node_down", "node_restarted", "node_added", "node_removed", "gpu_lost", "gpu_back")
CAUSE_MOVE = "move"
# A short fall must not vanish in a sparkline bucket dominated by GPU time: these win a bucket when they
# last at least this share of it.
SALIENT = (OFFLINE, CPU, SPLIT)
SALIENT_SHARE = 0.1
_WORST_FIRST = (OFFLINE, CPU, SPLIT, NOT_LOADED, GPU, UNKNOWN)
_NODE_WORST_FIRST = (NODE_DOWN, NODE_GPU_LOST, NODE_UP, UNKNOWN)


def placement_of(location: str | None) -> str:
    """`GPU (VRAM)` -> gpu, `CPU (RAM)` -> cpu, `Split (NN% GPU)` -> split, anything else unknown."""
    if location == LOCATION_GPU:
        return GPU
    if location == LOCATION_CPU:
        return CPU
    if isinstance(location, str) and location.startswith("Split"):
        return SPLIT
    return UNKNOWN


@dataclass(frozen=True)
class Span:
    """A time something was recording (a session), wall-clock seconds."""

    start: float
    end: float


@dataclass(frozen=True)
class PlacementRow:
    t: float
    node: str
    model: str
    placement: str  # gpu | split | cpu | not_loaded | unknown
    cause: str = ""  # "move" when a move of this model on this node made the change


@dataclass(frozen=True)
class NodeRow:
    t: float
    node: str
    kind: str  # one of NODE_KINDS


@dataclass(frozen=True)
class MoveRow:
    t: float  # when it ended
    node: str
    model: str
    target: str  # GPU | CPU | unload
    source: str  # user | optimizer
    ok: bool
    reason: str


@dataclass
class Rows:
    """What the store read for a window: every row in it, plus the last row per pair and per node before."""

    sessions: list[Span] = field(default_factory=list)
    nodes: list[NodeRow] = field(default_factory=list)
    placements: list[PlacementRow] = field(default_factory=list)
    moves: list[MoveRow] = field(default_factory=list)


@dataclass(frozen=True)
class PairHistory:
    """One model on one node over the window."""

    node: str
    model: str
    seconds: dict[str, float]  # every category of CATEGORIES
    fallbacks: int
    moves: int
    failed_moves: int
    timeline: tuple[str, ...]  # one category per bucket, oldest first
    now: str  # the category at the end of the window

    @property
    def shares(self) -> dict[str, float]:
        """Share of the known time per category of KNOWN (all 0 when nothing is known)."""
        return _shares(self.seconds, KNOWN)

    def as_dict(self) -> dict:
        return {
            "node": self.node,
            "model": self.model,
            "shares": {k: round(v, 4) for k, v in self.shares.items()},
            "seconds": {k: round(v, 1) for k, v in self.seconds.items()},
            "fallbacks": self.fallbacks,
            "moves": self.moves,
            "failed_moves": self.failed_moves,
            "now": self.now,
            "timeline": list(self.timeline),
        }


@dataclass(frozen=True)
class NodeHistory:
    """One node over the window: up, up with its GPU lost, down, unknown."""

    node: str
    seconds: dict[str, float]  # every category of NODE_CATEGORIES
    downs: int
    restarts: int
    gpu_losses: int
    timeline: tuple[str, ...]
    now: str

    @property
    def shares(self) -> dict[str, float]:
        return _shares(self.seconds, (NODE_UP, NODE_GPU_LOST, NODE_DOWN))

    def as_dict(self) -> dict:
        return {
            "node": self.node,
            "shares": {k: round(v, 4) for k, v in self.shares.items()},
            "seconds": {k: round(v, 1) for k, v in self.seconds.items()},
            "downs": self.downs,
            "restarts": self.restarts,
            "gpu_losses": self.gpu_losses,
            "now": self.now,
            "timeline": list(self.timeline),
        }


@dataclass(frozen=True)
class Summary:
    since: float
    until: float
    pairs: list[PairHistory]
    nodes: list[NodeHistory]
    recorded_s: float = 0.0  # how much of the window something was recording

    def as_dict(self) -> dict:
        return {
            "since": self.since,
            "until": self.until,
            "recorded_s": round(self.recorded_s, 1),
            "buckets": len(self.pairs[0].timeline) if self.pairs else None,
            "models": [pair.as_dict() for pair in self.pairs],
            "nodes": [node.as_dict() for node in self.nodes],
        }


def _shares(seconds: dict[str, float], categories: Iterable[str]) -> dict[str, float]:
    categories = tuple(categories)
    known = sum(seconds.get(c, 0.0) for c in categories)
    return {c: (seconds.get(c, 0.0) / known if known > 0 else 0.0) for c in categories}


def coverage(sessions: Iterable[Span]) -> list[Span]:
    """The union of the sessions' spans, sorted, overlapping ones merged."""
    merged: list[Span] = []
    for span in sorted(sessions, key=lambda s: s.start):
        if span.end < span.start:
            continue
        if merged and span.start <= merged[-1].end:
            merged[-1] = Span(merged[-1].start, max(merged[-1].end, span.end))
        else:
            merged.append(span)
    return merged


class _Buckets:
    """Seconds per category in `count` equal buckets over [since, until]."""

    def __init__(self, since: float, until: float, count: int) -> None:
        self.since, self.until, self.count = since, until, max(1, count)
        self.width = (until - since) / self.count
        self.cells: list[dict[str, float]] = [defaultdict(float) for _ in range(self.count)]

    def add(self, start: float, end: float, category: str) -> None:
        if self.width <= 0 or end <= start:
            return
        first = max(0, min(self.count - 1, int((start - self.since) / self.width)))
        for index in range(first, self.count):
            low = self.since + index * self.width
            high = self.until if index == self.count - 1 else low + self.width
            if low >= end:
                break
            overlap = min(end, high) - max(start, low)
            if overlap > 0:
                self.cells[index][category] += overlap

    def timeline(self, worst_first: tuple[str, ...], salient: tuple[str, ...] = ()) -> tuple[str, ...]:
        out = []
        for cell in self.cells:
            known = {c: s for c, s in cell.items() if c != UNKNOWN and s > 0}
            total = sum(cell.values())
            if not known:
                out.append(UNKNOWN)
                continue
            loud = [c for c in salient if cell.get(c, 0.0) >= SALIENT_SHARE * total]
            if loud:
                out.append(min(loud, key=worst_first.index))
                continue
            longest = max(known.values())
            out.append(min((c for c, s in known.items() if s == longest), key=worst_first.index))
        return tuple(out)


@dataclass
class _NodeState:
    covered: bool = False
    seen: str = UNKNOWN  # up | down | unknown (not checked since recording started)
    gpu_lost: bool = False

    def category(self) -> str:
        if not self.covered or self.seen == UNKNOWN:
            return UNKNOWN
        if self.seen == NODE_DOWN:
            return NODE_DOWN
        return NODE_GPU_LOST if self.gpu_lost else NODE_UP


def _apply_node(state: _NodeState, kind: str) -> None:
    if kind in ("node_up", "node_restarted"):
        state.seen, state.gpu_lost = NODE_UP, False  # a node back or restarted has its GPU asked again
    elif kind == "node_down":
        state.seen = NODE_DOWN
    elif kind in ("node_added", "node_removed"):
        state.seen, state.gpu_lost = UNKNOWN, False
    elif kind == "gpu_lost":
        state.gpu_lost = True
    elif kind == "gpu_back":
        state.gpu_lost = False


# change order at one instant: recording ends, starts, then node news, then placements
_END, _BEGIN, _NODE, _PLACE = 0, 1, 2, 3


def _changes(spans: list[Span], node_rows: list[NodeRow], placements: list[PlacementRow]) -> list[tuple]:
    changes: list[tuple] = []
    for span in spans:
        changes.append((span.start, _BEGIN, None))
        changes.append((span.end, _END, None))
    changes += [(row.t, _NODE, row) for row in node_rows]
    changes += [(row.t, _PLACE, row) for row in placements]
    changes.sort(key=lambda change: (change[0], change[1]))
    return changes


def summarize(rows: Rows, since: float, until: float, buckets: int = 48) -> Summary:
    """Replay `rows` over [since, until]: per (node, model) and per node, seconds by category, counts and a
    `buckets`-long timeline. Rows before `since` set the state at `since`; rows after `until` are ignored."""
    until = max(until, since)
    spans = coverage(rows.sessions)
    node_rows: dict[str, list[NodeRow]] = defaultdict(list)
    for row in rows.nodes:
        node_rows[row.node].append(row)
    pair_rows: dict[tuple[str, str], list[PlacementRow]] = defaultdict(list)
    for row in rows.placements:
        pair_rows[(row.node, row.model)].append(row)
    moves: dict[tuple[str, str], list[MoveRow]] = defaultdict(list)
    for move in rows.moves:
        if since <= move.t <= until:
            moves[(move.node, move.model)].append(move)
    nodes = sorted(set(node_rows) | {node for node, _ in pair_rows} | {node for node, _ in moves})
    pairs: list[PairHistory] = []
    node_histories: list[NodeHistory] = []
    for node in nodes:
        node_histories.append(_node_history(node, spans, node_rows[node], since, until, buckets))
        for key in sorted(k for k in set(pair_rows) | set(moves) if k[0] == node):
            pair = _pair_history(
                key, spans, node_rows[node], pair_rows[key], moves[key], since, until, buckets
            )
            if pair is not None:
                pairs.append(pair)
    recorded = sum(max(0.0, min(span.end, until) - max(span.start, since)) for span in spans)
    return Summary(since, until, pairs, node_histories, recorded)


def _node_history(
    node: str, spans: list[Span], rows: list[NodeRow], since: float, until: float, buckets: int
) -> NodeHistory:
    state = _NodeState()
    seconds = dict.fromkeys(NODE_CATEGORIES, 0.0)
    cells = _Buckets(since, until, buckets)
    counts = {"node_down": 0, "node_restarted": 0, "gpu_lost": 0}
    cursor = since
    for t, order, row in _changes(spans, rows, []):
        if t >= until:  # the state AT `until` is the one before its changes (a live session ends there)
            break
        _accumulate(cursor, t, state.category(), seconds, cells)
        cursor = max(cursor, t)
        if order == _BEGIN:
            state.covered, state.seen, state.gpu_lost = True, UNKNOWN, False
        elif order == _END:
            state.covered = False
        else:
            if t >= since and row.kind in counts and (row.kind != "node_down" or state.seen != NODE_DOWN):
                counts[row.kind] += 1
            _apply_node(state, row.kind)
    _accumulate(cursor, until, state.category(), seconds, cells)
    return NodeHistory(
        node, seconds, counts["node_down"], counts["node_restarted"], counts["gpu_lost"],
        cells.timeline(_NODE_WORST_FIRST, (NODE_DOWN, NODE_GPU_LOST)), state.category(),
    )  # fmt: skip


def _pair_history(
    key: tuple[str, str],
    spans: list[Span],
    node_rows: list[NodeRow],
    rows: list[PlacementRow],
    moves: list[MoveRow],
    since: float,
    until: float,
    buckets: int,
) -> PairHistory | None:
    node_state = _NodeState()
    placement = NOT_LOADED
    last_loaded: str | None = None
    seconds = dict.fromkeys(CATEGORIES, 0.0)
    cells = _Buckets(since, until, buckets)
    fallbacks, changed_in_window = 0, False

    def category() -> str:
        node_category = node_state.category()
        if node_category == UNKNOWN:
            return UNKNOWN
        return OFFLINE if node_category == NODE_DOWN else placement

    cursor = since
    for t, order, row in _changes(spans, node_rows, rows):
        if t >= until:  # the state AT `until` is the one before its changes (a live session ends there)
            break
        _accumulate(cursor, t, category(), seconds, cells)
        cursor = max(cursor, t)
        if order == _BEGIN:
            node_state.covered, node_state.seen, node_state.gpu_lost = True, UNKNOWN, False
            placement, last_loaded = NOT_LOADED, None  # anything may have happened while nobody recorded
        elif order == _END:
            node_state.covered = False
        elif order == _NODE:
            _apply_node(node_state, row.kind)
            if row.kind in ("node_added", "node_removed"):  # a new owner starts from nothing loaded
                placement, last_loaded = NOT_LOADED, None
        else:
            if t >= since:
                changed_in_window = True
                if row.placement in (SPLIT, CPU) and last_loaded == GPU and row.cause != CAUSE_MOVE:
                    fallbacks += 1
            placement = row.placement
            if placement in LOADED:
                last_loaded = placement
    _accumulate(cursor, until, category(), seconds, cells)
    ok = [m for m in moves if m.ok and m.reason in ("moved", "unloaded")]
    failed = [m for m in moves if not m.ok and m.reason != "cancelled"]
    if not (changed_in_window or moves or any(seconds[c] > 0 for c in LOADED)):
        return None  # not loaded all along: not worth a line
    node, model = key
    return PairHistory(
        node, model, seconds, fallbacks, len(ok), len(failed),
        cells.timeline(_WORST_FIRST, SALIENT), category(),
    )  # fmt: skip


def _accumulate(start: float, end: float, category: str, seconds: dict[str, float], cells: _Buckets) -> None:
    if end > start:
        seconds[category] += end - start
        cells.add(start, end, category)


TARGET_PLACEMENT = {"GPU": GPU, "CPU": CPU, "unload": NOT_LOADED}


class MoveAttribution:
    """Which observed placement changes a move made (a user's force_cpu is not a fallback, nor an alert).

    A change is the move's while the move runs, and the first change to its target after it succeeded (the
    next health check usually sees it after the move's own verification). Any other change ends that.
    Not thread-safe: one owner (the history writer, the alert dispatcher) feeds it in event order.
    """

    def __init__(self) -> None:
        self._running: dict[tuple[str, str], list] = {}  # key -> [target placement, started at, seen]
        self._done: dict[tuple[str, str], str] = {}  # key -> target placement not observed yet

    def started(self, node: str, model: str, target: str, t: float) -> None:
        self._running[(node, model)] = [TARGET_PLACEMENT.get(target, UNKNOWN), t, False]
        self._done.pop((node, model), None)

    def finished(self, node: str, model: str, ok: bool) -> float | None:
        """The move ended; returns when it started (None if its start was not seen)."""
        running = self._running.pop((node, model), None)
        if running is None:
            return None
        target, started, seen = running
        if ok and not seen:
            self._done[(node, model)] = target
        return started

    def cause(self, node: str, model: str, placement: str) -> str:
        """CAUSE_MOVE when a move made this change, else ""."""
        key = (node, model)
        running = self._running.get(key)
        if running is not None:
            running[2] = running[2] or placement == running[0]
            return CAUSE_MOVE
        target = self._done.pop(key, None)
        return CAUSE_MOVE if target is not None and target == placement else ""
