"""Prometheus metrics of a balancer, from state it already holds: a scrape sends nothing to any node.

`metrics_text(balancer, history=None, alerter=None)` returns the text exposition (what `/metrics` serves
on `serve`'s port); `start_metrics_server(("127.0.0.1", 9101), balancer, ...)` serves the same on a daemon
thread for a console (`--metrics HOST:PORT`). Both use `ClusterCollector`, a prometheus_client custom
collector registered in a registry of its own (never the process-global one), so two balancers in one
process never mix and a scrape reads the current state instead of counters mirrored on every change.

Names follow Prometheus' conventions: a `flockparse_` prefix, base units (`_seconds`, `_bytes`), `_total`
for counters, `_ratio` for 0..1 fractions. Per node: up, GPU verdict, VRAM held, models by placement,
health-check latency, routed requests and errors; per model and node: the share in VRAM and the bytes held;
optimizer passes, moves and move failures by source, target and reason; routed request latency as a
histogram per endpoint; and, when given, the history writer's and the alert sender's own health.
"""

from __future__ import annotations

import ipaddress
import socket
import threading
from collections.abc import Iterator
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CONTENT_TYPE_LATEST, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector, CollectorRegistry

from flockparse import __version__
from flockparse import gpu_state as gs
from flockparse.gpu_metrics.vram import other_vram_mb
from flockparse.rules import model_key
from flockparse.timeline import CPU, GPU, SPLIT, placement_of

__all__ = ["CONTENT_TYPE_LATEST", "ClusterCollector", "metrics_text", "parse_address", "start_metrics_server"]

MIB = 1024 * 1024
DEFAULT_HOST = "127.0.0.1"
SCRAPE_SOCKET_TIMEOUT_S = 10.0  # a scraper that stops sending or reading holds one daemon thread this long


class ClusterCollector(Collector):
    """Reads the balancer's node snapshots, its ClusterStats and the optional history/alerter status."""

    def __init__(self, balancer: Any, history: Any = None, alerter: Any = None) -> None:
        self.balancer, self.history, self.alerter = balancer, history, alerter

    def collect(self) -> Iterator[Metric]:
        yield from self._nodes()
        yield from self._optimizer()
        yield from self._requests()
        if self.history is not None:
            yield from _history(self.history.status())
        if self.alerter is not None:
            yield from _alerts(self.alerter.status())

    def _nodes(self) -> Iterator[Metric]:
        info = GaugeMetricFamily(
            "flockparse_build_info", "The running flockparse version.", labels=["version"]
        )
        info.add_metric([__version__], 1)
        yield info
        up = GaugeMetricFamily("flockparse_node_up", "1 when the node answered its last health check.",
                               labels=["node"])  # fmt: skip
        gpu = GaugeMetricFamily(
            "flockparse_node_gpu_state",
            "The node's GPU verdict: 1 for the current state (yes, no, unknown, lost), 0 for the others.",
            labels=["node", "state"],
        )
        vram = GaugeMetricFamily(
            "flockparse_node_vram_bytes", "VRAM held by the node's loaded models (Ollama's size_vram).",
            labels=["node"],
        )  # fmt: skip
        by_placement = GaugeMetricFamily(
            "flockparse_node_models",
            "Loaded models by placement (gpu, split, cpu).",
            labels=["node", "placement"],
        )
        latency = GaugeMetricFamily(
            "flockparse_node_check_latency_seconds",
            "Latency of the node's last health check.",
            labels=["node"],
        )
        requests = CounterMetricFamily(
            "flockparse_node_requests", "Routed requests sent to the node.", labels=["node"]
        )
        errors = CounterMetricFamily(
            "flockparse_node_request_errors", "Routed requests the node failed.", labels=["node"]
        )
        ratio = GaugeMetricFamily(
            "flockparse_model_gpu_ratio",
            "Share of the loaded model in VRAM, 0..1 (as `ollama ps`: 1 is 100% GPU, 0 is 100% CPU).",
            labels=["node", "model"],
        )
        model_vram = GaugeMetricFamily(
            "flockparse_model_vram_bytes", "VRAM held by the loaded model.", labels=["node", "model"]
        )
        gpu_memory = GaugeMetricFamily(
            "flockparse_node_gpu_memory_bytes",
            "The node's GPU memory as its GPU exporter last showed it (all GPUs): total, used, free, and "
            "held by other programs than Ollama's models (used minus their VRAM).",
            labels=["node", "kind"],
        )
        gpu_stale = GaugeMetricFamily(
            "flockparse_node_gpu_memory_stale", "1 when the exporter's last scrape failed (figures are old).",
            labels=["node"],
        )  # fmt: skip
        for state in self.balancer.node_states():
            node = state.url
            up.add_metric([node], 1 if state.online else 0)
            for verdict in gs.GPU_STATES:
                gpu.add_metric([node, verdict], 1 if state.gpu == verdict else 0)
            requests.add_metric([node], state.requests)
            errors.add_metric([node], state.errors)
            if not state.online:  # an offline node's models are its last known ones: not exported as now
                continue
            if state.latency_ms is not None:
                latency.add_metric([node], state.latency_ms / 1000)
            counts = dict.fromkeys((GPU, SPLIT, CPU), 0)
            held = 0.0
            for model in state.models:
                placement = placement_of(model.get("location"))
                if placement in counts:
                    counts[placement] += 1
                vram_mb = float(model.get("vram_mb") or 0.0)
                held += vram_mb
                name = model_key(str(model.get("name", "")))
                ratio.add_metric([node, name], float(model.get("gpu_percent") or 0) / 100)
                model_vram.add_metric([node, name], vram_mb * MIB)
            vram.add_metric([node], held * MIB)
            for placement, count in counts.items():
                by_placement.add_metric([node, placement], count)
            self._gpu_memory(state, gpu_memory, gpu_stale)
        yield from (
            up,
            gpu,
            vram,
            by_placement,
            latency,
            requests,
            errors,
            ratio,
            model_vram,
            gpu_memory,
            gpu_stale,
        )

    def _gpu_memory(self, state: Any, figures: GaugeMetricFamily, stale: GaugeMetricFamily) -> None:
        """The exporter's figures the balancer already holds (flockparse/gpu_metrics); none without one."""
        read = getattr(self.balancer, "gpu_memory", None)
        memory = read(state.url) if read is not None else None
        if memory is None or not memory.known:
            return
        other = other_vram_mb(memory, state.models)
        for kind, value in (("total", memory.total_mb), ("used", memory.used_mb), ("free", memory.free_mb),
                            ("other", other)):  # fmt: skip
            if value is not None:
                figures.add_metric([state.url, kind], value * MIB)
        stale.add_metric([state.url], int(bool(memory.stale)))

    def _optimizer(self) -> Iterator[Metric]:
        status = self.balancer.optimizer_status()
        stats = self.balancer.stats.snapshot()
        yield GaugeMetricFamily(
            "flockparse_optimizer_running",
            "1 when the background optimizer runs.",
            value=int(bool(status["running"])),
        )
        yield GaugeMetricFamily(
            "flockparse_optimizer_interval_seconds",
            "Seconds between optimizer passes.",
            value=status["interval"],
        )
        yield CounterMetricFamily("flockparse_optimizer_passes", "Optimizer passes run.", value=stats.passes)
        yield CounterMetricFamily(
            "flockparse_optimizer_pass_seconds", "Time spent in optimizer passes.", value=stats.pass_seconds
        )
        moves = CounterMetricFamily(
            "flockparse_moves",
            "Moves that reached their target (reason moved, already, unloaded), by who asked and where to.",
            labels=["source", "target", "reason"],
        )
        failures = CounterMetricFamily(
            "flockparse_move_failures", "Moves that failed, by reason (out_of_memory, timeout, ...).",
            labels=["source", "target", "reason"],
        )  # fmt: skip
        for key, count in sorted(stats.moves.items(), key=lambda item: str(item[0])):
            (moves if key.ok else failures).add_metric([key.source, key.target, key.reason], count)
        yield moves
        yield failures

    def _requests(self) -> Iterator[Metric]:
        stats = self.balancer.stats.snapshot()
        latency = HistogramMetricFamily(
            "flockparse_request_duration_seconds",
            "Routed request attempts (generate, embed) per endpoint: time from send to the whole reply.",
            labels=["endpoint"],
        )
        failures = CounterMetricFamily(
            "flockparse_request_failures", "Routed request attempts a node failed (then failed over).",
            labels=["endpoint"],
        )  # fmt: skip
        for endpoint, histogram in sorted(stats.requests.items()):
            buckets = [(_bound(bound), count) for bound, count in histogram.cumulative()]
            latency.add_metric([endpoint], buckets, sum_value=histogram.total)
            failures.add_metric([endpoint], stats.request_failures.get(endpoint, 0))
        yield latency
        yield failures


def _bound(value: float) -> str:
    return "+Inf" if value == float("inf") else repr(float(value))


def _history(status: dict) -> Iterator[Metric]:
    yield GaugeMetricFamily(
        "flockparse_history_enabled", "1 while history is written (0 after a write failed).",
        value=int(bool(status.get("enabled"))),
    )  # fmt: skip
    yield CounterMetricFamily(
        "flockparse_history_rows_written", "History rows committed.", value=status.get("written", 0)
    )
    yield CounterMetricFamily(
        "flockparse_history_dropped",
        "Observations dropped: the writer fell behind.",
        value=status.get("dropped", 0),
    )


def _alerts(status: dict) -> Iterator[Metric]:
    sent = CounterMetricFamily("flockparse_alerts_sent", "Alert messages delivered.", labels=["channel"])
    failed = CounterMetricFamily(
        "flockparse_alert_send_failures", "Alert messages given up after every retry.", labels=["channel"]
    )
    for channel in status.get("channels", []):
        sent.add_metric([channel["name"]], channel["sent"])
        failed.add_metric([channel["name"]], channel["failed"])
    yield sent
    yield failed
    yield CounterMetricFamily(
        "flockparse_alerts_suppressed",
        "Alert changes not sent during a cool-down.",
        value=status.get("suppressed", 0),
    )


def registry_for(balancer: Any, history: Any = None, alerter: Any = None) -> CollectorRegistry:
    """A registry of its own holding one ClusterCollector (the global one is never touched)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ClusterCollector(balancer, history, alerter))
    return registry


def metrics_text(balancer: Any, history: Any = None, alerter: Any = None) -> str:
    """The Prometheus text exposition (version 0.0.4, CONTENT_TYPE_LATEST) of a balancer, now."""
    return generate_latest(registry_for(balancer, history, alerter)).decode("utf-8")


def parse_address(text: str, flag: str = "--metrics") -> tuple[str, int]:
    """`9101` -> 127.0.0.1:9101 (loopback unless a host is named); `0.0.0.0:9101`; `[::1]:9101`.
    A ValueError says what is wrong in one line, naming `flag` (also `--dashboard`'s syntax)."""
    value = text.strip()
    host, port_text = DEFAULT_HOST, value
    if value.startswith("["):
        inner, sep, rest = value[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise ValueError(f"{flag} {text}: expected [IPv6]:PORT")
        host, port_text = inner, rest[1:]
    elif ":" in value:
        host, _, port_text = value.rpartition(":")
    if not host or any(c.isspace() for c in host):
        raise ValueError(f"{flag} {text}: no host before the port")
    try:
        port = int(port_text)
    except ValueError:
        raise ValueError(f"{flag} {text}: `{port_text}` is not a port number") from None
    if not 1 <= port <= 65535:
        raise ValueError(f"{flag} {text}: port must be 1 to 65535")
    return host, port


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True  # a scrape in progress never holds the interpreter at exit


class _V6Server(_Server):
    address_family = socket.AF_INET6


class _QuietHandler(WSGIRequestHandler):
    timeout = SCRAPE_SOCKET_TIMEOUT_S

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the stdlib's name
        """Scrapes are not printed into the console."""


class MetricsServer:
    """A running `/metrics` endpoint; `close()` stops it."""

    def __init__(self, server: WSGIServer, thread: threading.Thread, collector: ClusterCollector) -> None:
        self._server, self._thread = server, thread
        self.collector = collector  # its `history` and `alerter` may be set once they run

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(1.0)


def start_metrics_server(
    address: tuple[str, int], balancer: Any, history: Any = None, alerter: Any = None
) -> MetricsServer:
    """Serve the balancer's metrics on `address` from a daemon thread; OSError if it cannot listen."""
    host, port = address
    try:
        v6 = ipaddress.ip_address(host).version == 6
    except ValueError:
        v6 = False
    collector = ClusterCollector(balancer, history, alerter)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    server = make_server(
        host, port, make_wsgi_app(registry), _V6Server if v6 else _Server, handler_class=_QuietHandler
    )
    thread = threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True)
    thread.start()
    return MetricsServer(server, thread, collector)
