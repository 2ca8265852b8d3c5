"""Counters the core keeps for metrics: optimizer passes, moves by outcome, routed request latencies.

The balancer owns one `ClusterStats` from its start (so nothing is missed before a metrics endpoint is
asked): it subscribes `on_event` to its own bus and calls `observe_request` after each routed request.
Both only add numbers under a lock (no I/O); `snapshot()` copies them for a scrape. Node-level figures
(up, GPU verdict, VRAM, requests and errors per node) are not kept here: they are the nodes' own state.
"""

from __future__ import annotations

import bisect
import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

# Routed requests are generations and embeddings: from tens of milliseconds to minutes (a cold load).
LATENCY_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
MOVE_OUTCOME_KINDS = ("move_finished", "move_failed", "model_unloaded")


@dataclass
class Histogram:
    """Observations per bucket (`counts[i]` for `<= bounds[i]`, the last one above every bound)."""

    bounds: tuple[float, ...] = LATENCY_BUCKETS_S
    counts: list[int] = field(default_factory=list)
    total: float = 0.0

    def __post_init__(self) -> None:
        if not self.counts:
            self.counts = [0] * (len(self.bounds) + 1)

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value

    @property
    def count(self) -> int:
        return sum(self.counts)

    def cumulative(self) -> list[tuple[float, int]]:
        """(upper bound, observations at or below it), ending with (inf, count): Prometheus' buckets."""
        out, running = [], 0
        for bound, count in zip((*self.bounds, float("inf")), self.counts, strict=True):
            running += count
            out.append((bound, running))
        return out

    def copy(self) -> Histogram:
        return Histogram(self.bounds, list(self.counts), self.total)


@dataclass(frozen=True)
class MoveKey:
    source: str  # user | optimizer
    target: str  # GPU | CPU | unload
    reason: str  # moved, already, out_of_memory, ...
    ok: bool


@dataclass
class StatsSnapshot:
    passes: int = 0
    pass_seconds: float = 0.0
    moves: Counter[MoveKey] = field(default_factory=Counter)
    requests: dict[str, Histogram] = field(default_factory=dict)  # endpoint -> latency
    request_failures: Counter[str] = field(default_factory=Counter)  # endpoint -> failed attempts


class ClusterStats:
    """Thread-safe counters; `on_event` runs on the emitting thread, so it only adds numbers."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._data = StatsSnapshot()

    def on_event(self, event: Any) -> None:
        kind, data = event.kind, event.data or {}
        if kind == "pass_finished" and "moved" in data:
            with self._lock:
                self._data.passes += 1
                self._data.pass_seconds += float(data.get("duration_s") or 0.0)
        elif kind in MOVE_OUTCOME_KINDS:
            key = MoveKey(
                str(data.get("source") or "user"),
                str(data.get("target") or ""),
                str(data.get("reason") or ""),
                kind != "move_failed",
            )
            with self._lock:
                self._data.moves[key] += 1

    def observe_request(self, endpoint: str, seconds: float, failed: bool) -> None:
        """One routed attempt on one node: its latency, and whether the node failed it."""
        with self._lock:
            histogram = self._data.requests.get(endpoint)
            if histogram is None:
                histogram = self._data.requests[endpoint] = Histogram()
            histogram.observe(seconds)
            if failed:
                self._data.request_failures[endpoint] += 1

    def snapshot(self) -> StatsSnapshot:
        with self._lock:
            data = self._data
            return StatsSnapshot(
                data.passes,
                data.pass_seconds,
                Counter(data.moves),
                {endpoint: h.copy() for endpoint, h in data.requests.items()},
                Counter(data.request_failures),
            )
