"""Prometheus metrics (flockparse/metrics.py) parsed by prometheus_client's own text parser."""

from __future__ import annotations

import urllib.request

import pytest
from helpers import EMBED, LLAMA, wait_until
from prometheus_client.parser import text_string_to_metric_families

from flockparse.history import HistoryRecorder
from flockparse.metrics import metrics_text, parse_address, start_metrics_server
from flockparse.stats import Histogram
from ollama_sim.exporter import SimExporter


def parse(text: str) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value}, and every family's type checked on the way."""
    samples: dict[tuple[str, tuple], float] = {}
    for family in text_string_to_metric_families(text):
        assert family.name.startswith("flockparse_")
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def types(text: str) -> dict[str, str]:
    return {family.name: family.type for family in text_string_to_metric_families(text)}


def test_metrics_of_a_cluster_parse_and_say_what_happened(sim_node, make_balancer, tmp_path) -> None:
    gpu_node = sim_node(vram_gb=24, preload=[("mxbai-embed-large", "cpu"), ("llama3.1", "gpu")])
    cpu_node = sim_node(vram_gb=0, preload=[("llama3.2:3b", "auto")])
    dead = sim_node()
    dead.set_fault("down")
    lb = make_balancer([gpu_node.url, cpu_node.url, dead.url], health_interval=3600)
    wait_until(lambda: all(s.online is not None for s in lb.node_states()), "every node checked once")
    recorder = HistoryRecorder(tmp_path / "history.sqlite").attach(lb)

    lb.generate("llama3.1", "hi")
    [moved] = [r for r in lb.force_gpu_all_nodes(EMBED, nodes=[gpu_node.url])]
    assert moved["result"]["reason"] == "moved"
    [failed] = lb.force_gpu_all_nodes("llama3.1:70b", nodes=[gpu_node.url])  # 42 GB into 24: out of memory
    assert failed["result"]["reason"] == "out_of_memory"
    lb.optimize_gpu_once()
    lb.read_status(gpu_node.url)
    assert recorder.flush()

    sent_before = [len(node.request_log) for node in (gpu_node, cpu_node)]
    text = metrics_text(lb, history=recorder)
    assert [len(node.request_log) for node in (gpu_node, cpu_node)] == sent_before  # no I/O on a scrape
    samples = parse(text)
    g, c, d = gpu_node.url, cpu_node.url, dead.url

    assert samples[("flockparse_node_up", (("node", g),))] == 1
    assert samples[("flockparse_node_up", (("node", c),))] == 1
    assert samples[("flockparse_node_up", (("node", d),))] == 0
    assert samples[("flockparse_node_gpu_state", (("node", g), ("state", "yes")))] == 1
    assert samples[("flockparse_node_gpu_state", (("node", g), ("state", "lost")))] == 0
    assert samples[("flockparse_node_gpu_state", (("node", c), ("state", "yes")))] == 0
    assert samples[("flockparse_node_models", (("node", g), ("placement", "gpu")))] == 2
    assert samples[("flockparse_node_models", (("node", c), ("placement", "cpu")))] == 1
    assert samples[("flockparse_model_gpu_ratio", (("model", EMBED), ("node", g)))] == 1.0
    assert samples[("flockparse_model_gpu_ratio", (("model", "llama3.2:3b"), ("node", c)))] == 0.0
    held = sum(m["size_vram"] for m in gpu_node.loaded() if not m["stopping"])
    assert samples[("flockparse_node_vram_bytes", (("node", g),))] == pytest.approx(held, rel=1e-3)
    assert samples[("flockparse_node_vram_bytes", (("node", c),))] == 0
    assert ("flockparse_node_vram_bytes", (("node", d),)) not in samples  # no stale figures of a dead node
    assert (
        samples[("flockparse_moves_total", (("reason", "moved"), ("source", "user"), ("target", "GPU")))] == 1
    )
    failure = (
        "flockparse_move_failures_total",
        (("reason", "out_of_memory"), ("source", "user"), ("target", "GPU")),
    )
    assert samples[failure] == 1
    assert samples[("flockparse_optimizer_passes_total", ())] == 1
    assert samples[("flockparse_request_duration_seconds_count", (("endpoint", "/api/generate"),))] == 1
    assert (
        samples[
            ("flockparse_request_duration_seconds_bucket", (("endpoint", "/api/generate"), ("le", "+Inf")))
        ]
        == 1
    )
    assert samples[("flockparse_node_requests_total", (("node", g),))] == 1
    assert samples[("flockparse_history_enabled", ())] == 1
    assert samples[("flockparse_history_rows_written_total", ())] >= 3
    kinds = types(text)
    assert kinds["flockparse_request_duration_seconds"] == "histogram"
    assert kinds["flockparse_moves"] == "counter"
    assert kinds["flockparse_node_vram_bytes"] == "gauge"
    recorder.close()


def test_gpu_exporter_figures_are_exported_when_a_node_has_one(sim_node, make_balancer) -> None:
    """A node with a (simulated) dcgm-exporter beside it: total, used, free and other programs' VRAM."""
    node = sim_node(vram_gb=24, preload=[("llama3.1", "gpu")], external_vram_gb=4)
    with SimExporter(node, format="dcgm") as exporter:
        lb = make_balancer([node.url], gpu_metrics={node.url: exporter.url}, gpu_metrics_interval=0.2)
        wait_until(lambda: (m := lb.gpu_memory(node.url)) is not None and m.known, "the exporter's figures")
        wait_until(lambda: lb.node_states()[0].models, "llama3.1 seen")
        memory = lb.gpu_memory(node.url)
        samples = parse(metrics_text(lb))
    figure = {
        kind: samples[("flockparse_node_gpu_memory_bytes", (("kind", kind), ("node", node.url)))]
        for kind in ("total", "used", "free", "other")
    }
    assert figure["total"] == pytest.approx(memory.total_mb * 1024 * 1024)
    assert figure["total"] == pytest.approx(24 * 1024**3, rel=0.01)
    assert figure["used"] + figure["free"] == pytest.approx(figure["total"], rel=0.01)
    assert figure["other"] >= 4 * 1024**3 * 0.99  # the training job's 4 GB (and the runner's CUDA context)
    assert samples[("flockparse_node_gpu_memory_stale", (("node", node.url),))] == 0


def test_the_metrics_server_serves_the_same_text_on_loopback(sim_node, make_balancer) -> None:
    node = sim_node(vram_gb=24, preload=[("llama3.1", "gpu")])
    lb = make_balancer([node.url])
    wait_until(lambda: lb.node_states()[0].online, "node online")
    server = start_metrics_server(("127.0.0.1", 0), lb)
    try:
        host, port = server.address
        assert host == "127.0.0.1"
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
            assert reply.headers["Content-Type"].startswith("text/plain; version=0.0.4")
            samples = parse(reply.read().decode())
        assert samples[("flockparse_node_up", (("node", node.url),))] == 1
        assert samples[("flockparse_model_gpu_ratio", (("model", LLAMA), ("node", node.url)))] == 1.0
    finally:
        server.close()


@pytest.mark.parametrize(
    ("text", "expected"),
    [("9101", ("127.0.0.1", 9101)), ("0.0.0.0:9101", ("0.0.0.0", 9101)), ("[::1]:9101", ("::1", 9101)),
     ("localhost:80", ("localhost", 80))],
)  # fmt: skip
def test_metrics_addresses_default_to_loopback(text: str, expected: tuple[str, int]) -> None:
    assert parse_address(text) == expected


@pytest.mark.parametrize("text", ["", "abc", ":9101", "host:0", "host:70000", "[::1]9101", "a b:1"])
def test_bad_metrics_addresses_are_one_line_errors(text: str) -> None:
    with pytest.raises(ValueError, match="--metrics"):
        parse_address(text)


def test_histogram_buckets_are_cumulative_and_end_at_inf() -> None:
    histogram = Histogram(bounds=(0.1, 1.0))
    for value in (0.05, 0.1, 0.5, 3.0):
        histogram.observe(value)
    assert histogram.cumulative() == [(0.1, 2), (1.0, 3), (float("inf"), 4)]
    assert histogram.total == pytest.approx(3.65)
