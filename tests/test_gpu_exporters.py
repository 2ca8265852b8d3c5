"""Real VRAM figures from GPU exporters served on 127.0.0.1 next to simulated nodes (issue 13).

Exporters run beside Ollama, not inside it: `SimExporter` serves either a recorded page (the fixtures) or
the simulated node's driver figures in an exporter's format. Everything goes over real sockets.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import LLAMA, Recorder, wait_until

from flockparse.gpu_metrics import GpuMemory
from flockparsecli import main
from gpu_controller import GPUController
from ollama_sim import SimNode
from ollama_sim.exporter import SimExporter

FIXTURES = Path(__file__).parent / "fixtures"
FAST = 0.2  # scrape interval in these tests (production: at most every 15 s)


@pytest.fixture
def exporter() -> Iterator[Callable[..., SimExporter]]:
    """Factory: `exporter(node, format="dcgm")` or `exporter(page=text)`, started; stopped at teardown."""
    started: list[SimExporter] = []

    def start(node: SimNode | None = None, **kwargs: Any) -> SimExporter:
        started.append(SimExporter(node, **kwargs).start())
        return started[-1]

    yield start
    for item in started:
        item.stop()


def quick_controller() -> GPUController:
    """A 1 s deadline per request: what a hung exporter costs each scrape."""
    return GPUController(timeout=1.0, load_timeout=20.0, verify_timeout=10.0)


def fixture_page(name: str) -> str:
    return (FIXTURES / name).read_text()


def scraped(balancer, node: str) -> GpuMemory:
    """The node's figures once a scrape has given some (polled with a deadline)."""
    return wait_until(lambda: (m := balancer.gpu_memory(node)) is not None and m.known and m, "figures")


# ------------------------------------------------------------------ the figures in vram_report
@pytest.mark.parametrize(
    ("name", "total", "used", "free", "gpus"),
    [
        ("dcgm-exporter-2gpu.prom", 92136.0, 20413.0, 70505.0, 2),
        ("nvidia_gpu_exporter.prom", 24564.0, 9423.0, 14838.0, 1),
        ("nvitop-exporter.prom", 98280.0, 27918.0, 69660.0, 2),
        ("dcgm-exporter-mig-pods.prom", 162455.0, 51212.0, 110764.0, 3),
    ],
)
def test_report_figures_match_the_exporter_page(
    sim_node, make_balancer, exporter, name: str, total: float, used: float, free: float, gpus: int
) -> None:
    node = sim_node(vram_gb=24)  # nothing loaded: every MiB used belongs to other programs
    page = exporter(page=fixture_page(name))
    balancer = make_balancer([node.url], gpu_metrics={node.url: page.url})
    scraped(balancer, node.url)

    [entry] = balancer.vram_report()

    assert (entry["vram_total_mb"], entry["vram_used_mb"], entry["vram_free_mb"]) == (total, used, free)
    assert entry["vram_other_mb"] == used and entry["vram_ollama_mb"] == 0
    assert (entry["vram_stale"], entry["vram_error"]) == (False, None)
    assert len(entry["gpus"]) == gpus
    assert sum(g["total_mb"] for g in entry["gpus"]) == total
    assert entry["online"] is True and entry["models"] == []  # the node's own keys are unchanged


def test_one_shot_vram_report_json_reads_the_exporter_named_by_the_flag(sim_node, exporter, capsys) -> None:
    node = sim_node(vram_gb=24)
    page = exporter(page=fixture_page("dcgm-exporter-2gpu.prom"))

    code = main(["--nodes", node.url, "--gpu-metrics", f"{node.url}={page.url}", "vram_report", "--json"])

    [entry] = json.loads(capsys.readouterr().out)
    assert code == 0
    assert (entry["vram_total_mb"], entry["vram_used_mb"], entry["vram_free_mb"]) == (
        92136.0,
        20413.0,
        70505.0,
    )
    assert [(g["index"], g["name"], g["used_mb"], g["other_mb"]) for g in entry["gpus"]] == [
        ("0", "NVIDIA L40S", 20412.0, None),  # two GPUs: Ollama does not say which holds what
        ("1", "NVIDIA L40S", 1.0, None),
    ]
    assert entry["vram_format"] == "dcgm-exporter" and entry["vram_exporter"] == page.url


@pytest.mark.parametrize("kind", ["dcgm", "nvidia_smi", "nvitop"])
def test_vram_held_by_another_program_is_vram_other(sim_node, make_balancer, exporter, kind: str) -> None:
    node = sim_node(vram_gb=24, external_vram_gb=6, preload=[("llama3.1", "gpu")])
    page = exporter(node, format=kind)
    balancer = make_balancer([node.url], gpu_metrics={node.url: page.url})
    scraped(balancer, node.url)

    [entry] = balancer.vram_report()

    [llama] = node.loaded()
    cuda_context_mb = (
        llama["held_vram"] - llama["size_vram"]
    ) / 2**20  # held by the runner, not in size_vram
    assert entry["vram_ollama_mb"] == pytest.approx(llama["size_vram"] / 2**20, abs=0.1)
    assert entry["vram_other_mb"] == pytest.approx(6 * 1024 + cuda_context_mb, abs=1.5)
    assert entry["vram_total_mb"] == 24 * 1024
    assert entry["vram_free_mb"] == pytest.approx(24 * 1024 - 6 * 1024 - llama["held_vram"] / 2**20, abs=1.5)
    assert entry["gpus"][0]["other_mb"] == entry["vram_other_mb"]  # one GPU: the node's figure


def test_figures_follow_the_node_and_never_go_below_zero(sim_node, make_balancer, exporter) -> None:
    node = sim_node(vram_gb=24, external_vram_gb=10)
    page = exporter(node, format="dcgm")
    balancer = make_balancer([node.url], gpu_metrics={node.url: page.url}, gpu_metrics_interval=FAST)
    assert scraped(balancer, node.url).used_mb == 10 * 1024

    node.external_vram_gb = 2  # the training job ends

    wait_until(lambda: balancer.gpu_memory(node.url).used_mb == 2 * 1024, "the next scrape")
    [entry] = balancer.vram_report()
    assert entry["vram_other_mb"] == 2 * 1024 and entry["vram_free_mb"] == 22 * 1024


def test_reports_never_scrape_more_often_than_the_interval(sim_node, make_balancer, exporter) -> None:
    node = sim_node(vram_gb=24)
    page = exporter(node, format="nvitop")
    balancer = make_balancer([node.url], gpu_metrics={node.url: page.url})  # the default: every 15 s
    scraped(balancer, node.url)

    for _ in range(3):
        balancer.vram_report()
    balancer.get_stats()

    assert page.scrapes == 1


def test_unchanged_figures_are_not_parsed_again(sim_node, make_balancer, exporter, monkeypatch) -> None:
    from flockparse.gpu_metrics import scraper

    parsed: list[str] = []
    real = scraper.parse_memory_lines
    monkeypatch.setattr(
        scraper, "parse_memory_lines", lambda lines, **kw: parsed.append(lines) or real(lines, **kw)
    )
    node = sim_node(vram_gb=24, external_vram_gb=2)
    page = exporter(node, format="dcgm")
    balancer = make_balancer([node.url], gpu_metrics={node.url: page.url}, gpu_metrics_interval=FAST)
    wait_until(lambda: page.scrapes >= 3, "three scrapes of the same figures")
    assert len(parsed) == 1 and balancer.gpu_memory(node.url).used_mb == 2048

    node.external_vram_gb = 5

    wait_until(lambda: balancer.gpu_memory(node.url).used_mb == 5 * 1024, "the new figures")
    assert len(parsed) == 2


def test_get_stats_has_the_vram_keys_and_nodes_without_an_exporter_none(sim_node, make_balancer, exporter):
    with_exporter, without = sim_node(vram_gb=24), sim_node(vram_gb=24)
    page = exporter(with_exporter, format="dcgm")
    balancer = make_balancer([with_exporter.url, without.url], gpu_metrics={with_exporter.url: page.url})
    scraped(balancer, with_exporter.url)

    first, second = balancer.get_stats()["nodes"]

    assert first["vram_total_mb"] == 24 * 1024 and first["vram_stale"] is False
    assert "vram_total_mb" not in second and "gpus" not in second


# ------------------------------------------------------------------ faults: on time, stale, marked
@pytest.mark.parametrize(("fault", "words"), [("down", "connection refused"), ("hang", "did not answer")])
def test_an_exporter_that_never_answers_leaves_the_report_without_figures_marked(
    sim_node, make_balancer, exporter, fault: str, words: str
) -> None:
    node = sim_node(vram_gb=24)
    page = exporter(node)
    page.set_fault(fault)
    balancer = make_balancer([node.url], gpu_metrics={node.url: page.url}, controller=quick_controller())
    events = Recorder(balancer)

    [entry] = balancer.vram_report()  # returns: its wait for the first scrape ends at the scrape's deadline

    assert entry["online"] is True and entry["stale"] is False  # the node itself is fine
    assert (entry["vram_total_mb"], entry["vram_other_mb"], entry["vram_stale"]) == (None, None, True)
    assert words in entry["vram_error"]
    [failed] = events.wait("gpu_metrics_failed")
    assert "no figures yet" in failed.message


@pytest.mark.parametrize(
    ("fault", "words"),
    [
        ("down", "connection refused"),
        ("hang", "did not answer /metrics within"),
        ("garbage", "no GPU memory metrics"),
        ("huge", "too large to read (over 4 MiB)"),
        ("error500", "HTTP 500"),
    ],
)
def test_a_failing_exporter_keeps_the_last_figures_marked_stale(
    sim_node, make_balancer, exporter, fault: str, words: str
) -> None:
    node = sim_node(vram_gb=24, external_vram_gb=3)
    page = exporter(node, format="dcgm")
    balancer = make_balancer(
        [node.url], gpu_metrics={node.url: page.url}, gpu_metrics_interval=FAST, controller=quick_controller()
    )
    events = Recorder(balancer)
    scraped(balancer, node.url)

    page.set_fault(fault)  # a 50 MB page for "huge"
    node.external_vram_gb = 8  # what a fresh scrape would show: must not appear

    wait_until(lambda: balancer.gpu_memory(node.url).stale, "the failed scrape")
    [entry] = balancer.vram_report()
    assert entry["online"] is True and entry["stale"] is False
    assert entry["vram_stale"] is True and words in entry["vram_error"]
    assert (entry["vram_used_mb"], entry["vram_other_mb"]) == (3 * 1024, 3 * 1024)  # the last good ones
    assert len(events.wait("gpu_metrics_failed")) == 1

    page.clear_fault()

    wait_until(lambda: not balancer.gpu_memory(node.url).stale, "a good scrape again")
    assert balancer.gpu_memory(node.url).used_mb == 8 * 1024
    assert len(events.wait("gpu_metrics_back")) == 1 and len(events.of("gpu_metrics_failed")) == 1


def test_one_hung_exporter_never_holds_another_nodes_figures(sim_node, make_balancer, exporter) -> None:
    hung_node, good_node = sim_node(vram_gb=24), sim_node(vram_gb=24, external_vram_gb=1)
    hung, good = exporter(hung_node), exporter(good_node, format="nvidia_smi")
    hung.set_fault("hang")
    balancer = make_balancer(
        [hung_node.url, good_node.url],
        gpu_metrics={hung_node.url: hung.url, good_node.url: good.url},
        gpu_metrics_interval=FAST,
    )

    wait_until(lambda: good.scrapes >= 3, "three scrapes of the good exporter while the other hangs")

    assert balancer.gpu_memory(good_node.url).used_mb == 1024
    assert balancer.gpu_memory(hung_node.url).known is False


def test_after_close_the_scraper_stops_and_sends_nothing(sim_node, make_balancer, exporter) -> None:
    node = sim_node(vram_gb=24)
    page = exporter(node)
    balancer = make_balancer([node.url], gpu_metrics={node.url: page.url}, gpu_metrics_interval=0.05)
    wait_until(lambda: page.scrapes >= 2, "two scrapes")

    balancer.close()
    wait_until(lambda: not balancer.gpu_metrics._thread.is_alive(), "the scrape loop ended")
    sent = page.scrapes

    assert balancer.gpu_metrics._pool.waiting == 0  # nothing queued that could still go out
    balancer.gpu_metrics.set_exporter(node.url, page.url)  # even a new target is never scraped now
    assert page.scrapes == sent


def test_an_exporter_for_a_node_not_in_the_cluster_or_a_bad_address_is_refused(sim_node, make_balancer):
    node = sim_node(vram_gb=24)
    balancer = make_balancer([node.url])
    with pytest.raises(ValueError, match="not in the cluster"):
        balancer.set_gpu_exporter("http://127.0.0.1:1", "http://127.0.0.1:9400/metrics")
    for bad in ("ftp://h/metrics", "http://user:pw@h:9400/metrics", "http://h:0/metrics", "  "):
        with pytest.raises(ValueError):
            balancer.set_gpu_exporter(node.url, bad)
    balancer.set_gpu_exporter(node.url, "127.0.0.1:9400")
    assert balancer.gpu_memory(node.url).exporter == "http://127.0.0.1:9400/metrics"


def test_a_removed_node_is_no_longer_scraped(sim_node, make_balancer, exporter) -> None:
    node = sim_node(vram_gb=24)
    page = exporter(node)
    balancer = make_balancer([node.url], gpu_metrics={node.url: page.url})
    scraped(balancer, node.url)
    balancer.remove_node(node.url)
    assert balancer.gpu_memory(node.url) is None and balancer.gpu_metrics.nodes == []


# ------------------------------------------------------------------ decisions
def test_exporter_shows_a_gpu_ollama_did_not_find_lost_at_the_first_landing_even_before_0_30(
    sim_node, make_balancer, exporter
) -> None:
    """Ollama < 0.30 reports estimates, so one RAM landing alone proves nothing; the exporter makes it
    certain: the GPU is there (dcgm-exporter reads it through NVML) and Ollama does not use it."""
    node = sim_node(vram_gb=24, gpu_found=False, version="0.12.10")
    page = exporter(node, format="dcgm")
    balancer = make_balancer([node.url], gpu_metrics={node.url: page.url})
    events = Recorder(balancer)
    scraped(balancer, node.url)
    assert balancer.node_state(node.url).gpu == "unknown"  # a GPU listed is not a GPU Ollama uses

    [entry] = balancer.force_gpu_all_nodes("llama3.1")

    assert (entry["result"]["skipped"], entry["result"]["reason"]) == (True, "gpu_lost")
    state = balancer.node_state(node.url)
    assert (state.gpu, state.gpu_evidence) == (
        "lost",
        "its GPU exporter lists a GPU, but an all-layers load landed in RAM",
    )
    [lost] = events.wait("gpu_lost")
    assert "its GPU exporter lists a GPU" in lost.message and "restart the Ollama service" in lost.message
    assert node.counts(LLAMA)["loads"] == 0  # only the probe's tiny model was loaded (and unloaded)


def test_a_probe_before_the_first_scrape_is_judged_again_when_the_exporter_answers(
    sim_node, make_balancer, exporter
) -> None:
    node = sim_node(vram_gb=24, gpu_found=False)
    page = exporter(node, format="nvidia_smi")
    page.set_fault("down")
    balancer = make_balancer([node.url], gpu_metrics={node.url: page.url}, gpu_metrics_interval=FAST)
    events = Recorder(balancer)
    wait_until(lambda: balancer.node_state(node.url).online, "the node checked")
    balancer.probe_gpu(node.url)
    assert balancer.node_state(node.url).gpu == "no"  # no exporter figures yet: a CPU box, it seems

    page.clear_fault()

    wait_until(lambda: balancer.node_state(node.url).gpu == "lost", "lost once the exporter lists a GPU")
    assert len(events.wait("gpu_lost")) == 1


def test_an_exporter_listing_no_gpu_makes_the_node_cpu_only_without_a_probe(
    sim_node, make_balancer, exporter
) -> None:
    cpu = sim_node(vram_gb=0)
    page = exporter(cpu, format="nvitop")  # nvitop-exporter on a box whose driver finds no GPU
    balancer = make_balancer([cpu.url], gpu_metrics={cpu.url: page.url})
    wait_until(lambda: balancer.node_state(cpu.url).gpu == "no", "the exporter's zero GPUs")
    assert balancer.node_state(cpu.url).gpu_evidence == "its GPU exporter lists no GPU"

    [entry] = balancer.force_gpu_all_nodes("llama3.1")

    assert (entry["result"]["skipped"], entry["result"]["reason"]) == (True, "no_gpu")
    assert cpu.request_log and not [e for e in cpu.request_log if e[0] == "POST"]  # no probe was loaded
    [report] = balancer.vram_report()
    assert (report["vram_total_mb"], report["gpus"]) == (0, [])


def test_vram_held_by_others_keeping_a_priority_model_off_the_gpu_is_an_event_then_resolved(
    sim_node, make_balancer, exporter
) -> None:
    """The demo's node 2: a training job holds 20 of 24 GB, llama3.1 loaded split next to it."""
    node = sim_node(vram_gb=24, external_vram_gb=20, preload=[("llama3.1", "auto")])
    page = exporter(node, format="dcgm")
    balancer = make_balancer(
        [node.url],
        gpu_metrics={node.url: page.url},
        gpu_metrics_interval=FAST,
        gpu_priority_models=["llama3.1"],
    )
    events = Recorder(balancer)

    [held] = events.wait("vram_held_by_others")

    assert (held.node, held.model) == (node.url, LLAMA)
    assert held.data["other_mb"] > 20 * 1024 and held.data["need_mb"] > held.data["room_mb"]
    assert "VRAM held by other programs keeps llama3.1:latest off the GPU" in held.message
    wait_until(lambda: page.scrapes >= 4, "more scrapes")
    assert len(events.of("vram_held_by_others")) == 1  # once per condition

    node.external_vram_gb = 0  # the training job ends

    [resolved] = events.wait("vram_held_by_others_resolved")
    assert (resolved.node, resolved.model) == (node.url, LLAMA)
    assert len(events.of("vram_held_by_others")) == 1


def test_a_move_gets_its_exporter_read_again_and_the_figures_stay_paired(
    sim_node, make_balancer, exporter
) -> None:
    """Right after an unload, a fresh /api/ps beside figures read before it would count the model as another
    program's VRAM: the report pairs the figures with what Ollama held when they were read, and the change
    has the exporter read again at once (a `vram_measured` event), not at the next interval."""
    node = sim_node(vram_gb=24, preload=[("llama3.1", "gpu")])
    page = exporter(node, format="dcgm")
    balancer = make_balancer([node.url], gpu_metrics={node.url: page.url}, gpu_metrics_interval=3600)
    scraped(balancer, node.url)
    events = Recorder(balancer)

    [done] = balancer.unload_all_nodes("llama3.1")

    assert done["result"]["reason"] == "unloaded"
    events.wait("vram_measured")  # a change is read again at once (the interval is an hour)
    # the unload may be seen in two steps (listed as stopping, then gone): each is read again
    wait_until(lambda: balancer.vram_report()[0]["vram_ollama_mb"] == 0, "the figures read after it went")
    [entry] = balancer.vram_report()
    assert entry["models"] == []
    assert entry["vram_other_mb"] < 1.0  # the unloaded model is nobody's VRAM now, not "other"
    assert entry["vram_free_mb"] == pytest.approx(24 * 1024, abs=1.0)
