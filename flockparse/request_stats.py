"""Per-node statistics of routed requests, in bounded memory, and the cool-down after a node's errors.

`lb_stats` shows, per node, p50/p95 of the request latency and of the time to the first byte (for a
streamed generation: the first token), and tokens per second as Ollama measures them (`eval_count` and
`eval_duration` of its final chunk). Only the last SAMPLES_KEPT requests per node are kept (a ring), so a
server that runs for months holds the same few kilobytes per node.

A node that fails a routed request (refused, reset, timed out, 5xx) cools down: routing skips it for
COOL_BASE_S, doubled for each further failure in a row up to COOL_MAX_S, while another node can serve;
its next success ends the cool-down. Requests/errors/in-flight counters stay with the node's owner
(NodeAgent); this module keeps what they do not, and its own in-flight count per node, which
routing reads for every request without copying any node's state.

Thread-safe (one lock, memory only); the clock is injectable so tests need no sleeps.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

SAMPLES_KEPT = 256
COOL_BASE_S = 1.0
COOL_MAX_S = 30.0


@dataclass(frozen=True)
class Sample:
    """One request that a node answered."""

    latency_s: float  # from sending the request to the reply's last byte
    first_byte_s: float | None = None  # to the first byte of the reply body (the first token of a stream)
    eval_count: int | None = None  # Ollama's final chunk: tokens generated ...
    eval_duration_ns: int | None = None  # ... and the time it took


@dataclass
class _Node:
    samples: deque[Sample] = field(default_factory=lambda: deque(maxlen=SAMPLES_KEPT))
    failures_in_row: int = 0
    cool_until: float = 0.0
    in_flight: int = 0
    last_error: str | None = None  # the last routed request's failure (a health check does not clear it)


def eval_metrics(reply: Any) -> tuple[int | None, int | None]:
    """(eval_count, eval_duration) from Ollama's final object, when both are positive integers."""
    if not isinstance(reply, Mapping):
        return None, None
    count, duration = reply.get("eval_count"), reply.get("eval_duration")
    if not (isinstance(count, int) and isinstance(duration, int)) or isinstance(count, bool):
        return None, None
    if count <= 0 or duration <= 0:
        return None, None
    return count, duration


def percentile(values: list[float], share: float) -> float | None:
    """Nearest-rank percentile (`share` 0.5 = median) of unsorted values; None when there are none."""
    if not values:
        return None
    ordered = sorted(values)
    index = max(0, math.ceil(share * len(ordered)) - 1)
    return ordered[index]


class RequestStats:
    """The rings and cool-downs of every node (see the module docstring)."""

    def __init__(self, keep: int = SAMPLES_KEPT, clock: Callable[[], float] = time.monotonic) -> None:
        self.keep = keep
        self._clock = clock
        self._lock = threading.Lock()
        self._nodes: dict[str, _Node] = {}

    def _node(self, url: str) -> _Node:
        node = self._nodes.get(url)
        if node is None:
            node = self._nodes[url] = _Node(deque(maxlen=self.keep))
        return node

    def begin(self, url: str) -> None:
        """A routed request was sent to the node (routing reads the count without copying node states)."""
        with self._lock:
            self._node(url).in_flight += 1

    def end(self, url: str) -> None:
        with self._lock:
            node = self._nodes.get(url)
            if node is not None and node.in_flight > 0:
                node.in_flight -= 1

    def in_flight(self) -> dict[str, int]:
        """Routed requests in flight per node (nodes with none left out)."""
        with self._lock:
            return {url: n.in_flight for url, n in self._nodes.items() if n.in_flight}

    def record(self, url: str, sample: Sample) -> None:
        """A request the node answered: kept in its ring; its cool-down, if any, ends."""
        with self._lock:
            node = self._node(url)
            node.samples.append(sample)
            node.failures_in_row = 0
            node.cool_until = 0.0

    def succeeded(self, url: str) -> None:
        """The node answered (e.g. a 4xx for the caller's own mistake): no sample, but no cool-down."""
        with self._lock:
            node = self._nodes.get(url)
            if node is not None:
                node.failures_in_row, node.cool_until = 0, 0.0

    def failed(self, url: str, error: str | None = None) -> float:
        """The node failed a request: it cools down (doubling per failure in a row); returns the seconds."""
        with self._lock:
            node = self._node(url)
            node.failures_in_row += 1
            node.last_error = error if error is not None else node.last_error
            seconds = min(COOL_MAX_S, COOL_BASE_S * 2 ** (node.failures_in_row - 1))
            node.cool_until = self._clock() + seconds
            return seconds

    def cooling(self) -> dict[str, float]:
        """Seconds of cool-down left per node that is cooling down."""
        now = self._clock()
        with self._lock:
            return {url: n.cool_until - now for url, n in self._nodes.items() if n.cool_until > now}

    def forget(self, url: str) -> None:
        with self._lock:
            self._nodes.pop(url, None)

    def summary(self, url: str) -> dict[str, Any]:
        """The additive keys `get_stats()` shows per node (None where there are no samples yet)."""
        now = self._clock()
        with self._lock:
            node = self._nodes.get(url)
            samples = list(node.samples) if node is not None else []
            cool_left = max(0.0, node.cool_until - now) if node is not None else 0.0
            last_error = node.last_error if node is not None else None
        latencies = [s.latency_s * 1000 for s in samples]
        firsts = [s.first_byte_s * 1000 for s in samples if s.first_byte_s is not None]
        timed = [(s.eval_count, s.eval_duration_ns) for s in samples if s.eval_count and s.eval_duration_ns]
        tokens = sum(count for count, _ in timed)
        seconds = sum(duration for _, duration in timed) / 1e9
        return {
            "samples": len(samples),
            "latency_p50_ms": _rounded(percentile(latencies, 0.5)),
            "latency_p95_ms": _rounded(percentile(latencies, 0.95)),
            "ttft_p50_ms": _rounded(percentile(firsts, 0.5)),
            "ttft_p95_ms": _rounded(percentile(firsts, 0.95)),
            "tokens_per_s": round(tokens / seconds, 1) if seconds > 0 else None,
            "cooling_down_s": round(cool_left, 1),
            "last_request_error": last_error,
        }


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 1)
