"""GPU exporters' pages -> per-GPU memory (gpu_metrics/formats.py), and those figures next to Ollama's
models (gpu_metrics/vram.py), as plain data.

The fixtures in tests/fixtures/ are scrapes written in each exporter's own form (each file's header says
from which of the exporter's sources); the simulator's exporter writes the same forms
(ollama_sim/exporter.py).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from flockparse.gpu_metrics import (
    ExporterPageError,
    GpuFigures,
    GpuMemory,
    HeldOff,
    HeldOffTracker,
    kept_off_by_others,
    parse_page,
    vram_fields,
)
from flockparse.gpu_metrics.formats import DCGM_BLANK_INT32
from ollama_sim import SimNode
from ollama_sim.exporter import SimExporter, go_float

FIXTURES = Path(__file__).parent / "fixtures"


def fixture(name: str) -> str:
    return (FIXTURES / name).read_text()


def figures(page) -> list[tuple]:
    return [(g.index, g.instance, g.total_mb, g.used_mb, g.free_mb, g.reserved_mb) for g in page.gpus]


def test_dcgm_exporter_two_gpus_one_series_each_in_mib() -> None:
    page = parse_page(fixture("dcgm-exporter-2gpu.prom"))
    assert page.format == "dcgm"
    assert figures(page) == [
        ("0", None, 46068.0, 20412.0, 25047.0, 609.0),  # total = FB_USED + FB_FREE + FB_RESERVED
        ("1", None, 46068.0, 1.0, 45458.0, 609.0),
    ]
    assert [g.uuid for g in page.gpus] == [
        "GPU-5b1f0e9a-7c2d-4e8b-a3f6-91d04c7e2b15",
        "GPU-c83e27d4-0b9a-4f61-8e2c-5d7a19f3e640",
    ]
    assert {g.name for g in page.gpus} == {"NVIDIA L40S"}


def test_dcgm_mig_instances_count_once_and_pod_copies_collapse() -> None:
    page = parse_page(fixture("dcgm-exporter-mig-pods.prom"))
    assert figures(page) == [
        ("0", "1", 40448.0, 11.0, 40437.0, 0.0),
        ("0", "2", 40448.0, 20480.0, 19968.0, 0.0),
        ("1", None, 81559.0, 30721.0, 50359.0, 479.0),  # two pods share it: written twice, counted once
    ]


def test_dcgm_whole_gpu_listed_with_its_instances_is_not_counted_twice() -> None:
    text = "\n".join(
        [
            'DCGM_FI_DEV_FB_USED{gpu="0",UUID="GPU-a"} 100',
            'DCGM_FI_DEV_FB_FREE{gpu="0",UUID="GPU-a"} 900',
            'DCGM_FI_DEV_FB_USED{gpu="0",UUID="GPU-a",GPU_I_PROFILE="1g.10gb",GPU_I_ID="7"} 50',
            'DCGM_FI_DEV_FB_FREE{gpu="0",UUID="GPU-a",GPU_I_PROFILE="1g.10gb",GPU_I_ID="7"} 450',
        ]
    )
    assert figures(parse_page(text)) == [("0", None, 1000.0, 100.0, 900.0, 0.0)]


def test_dcgm_total_when_configured_and_old_uuid_label() -> None:
    total = 'DCGM_FI_DEV_FB_TOTAL{gpu="3",uuid="GPU-x"} 16384'
    text = f'{total}\nDCGM_FI_DEV_FB_USED{{gpu="3",uuid="GPU-x"}} 4096\n'
    page = parse_page(text)
    assert figures(page) == [("3", None, 16384.0, 4096.0, 12288.0, 0.0)]
    assert page.gpus[0].uuid == "GPU-x"  # --use-old-namespace spells the label `uuid`


def test_dcgm_blank_values_are_no_figure() -> None:
    text = (
        f'DCGM_FI_DEV_FB_USED{{gpu="0",UUID="GPU-a"}} {DCGM_BLANK_INT32 + 3}\n'
        'DCGM_FI_DEV_FB_FREE{gpu="0",UUID="GPU-a"} 100\n'
        'DCGM_FI_DEV_FB_USED{gpu="1",UUID="GPU-b"} 10\n'
        'DCGM_FI_DEV_FB_FREE{gpu="1",UUID="GPU-b"} 90\n'
    )
    assert figures(parse_page(text)) == [("1", None, 100.0, 10.0, 90.0, 0.0)]


def test_nvidia_gpu_exporter_bytes_index_and_name_from_gpu_info() -> None:
    page = parse_page(fixture("nvidia_gpu_exporter.prom"))
    assert page.format == "nvidia_smi"
    assert figures(page) == [("0", None, 24564.0, 9423.0, 14838.0, 303.0)]
    assert page.gpus[0].name == "NVIDIA GeForce RTX 4090"


def test_nvidia_gpu_exporter_that_could_not_read_its_gpus_is_an_error() -> None:
    text = fixture("nvidia_gpu_exporter.prom").replace(
        "nvidia_smi_command_exit_code 0", "nvidia_smi_command_exit_code 9"
    )
    with pytest.raises(ExporterPageError, match="nvidia-smi exit code 9"):
        parse_page(text)


def test_nvitop_exporter_mib_and_the_reserved_rest_of_the_total() -> None:
    page = parse_page(fixture("nvitop-exporter.prom"))
    assert page.format == "nvitop"
    assert [(g.index, g.name, g.total_mb, g.used_mb, g.free_mb) for g in page.gpus] == [
        ("0", "NVIDIA RTX A6000", 49140.0, 27914.4375, 20874.5625),
        ("1", "NVIDIA RTX A6000", 49140.0, 3.5625, 48785.4375),
    ]
    assert page.gpus[0].reserved_mb == pytest.approx(351.0)  # NVML v1: total - used - free


def test_nvitop_mig_devices_under_their_listed_gpu_count_once() -> None:
    lines = []
    for index, total, used in (("0", 81559, 20000), ("0:1", 40448, 20000), ("1", 81559, 1)):
        for figure, value in (("total", total), ("used", used), ("free", total - used)):
            lines.append(f'gpu_memory_{figure}_MiB{{hostname="h",index="{index}",uuid="u{index}"}} {value}.0')
    assert [(g.index, g.total_mb) for g in parse_page("\n".join(lines)).gpus] == [("0", 81559), ("1", 81559)]


def test_a_recognised_exporter_listing_no_gpu_is_zero_gpus() -> None:
    page = parse_page('# HELP nvitop_info x\n# TYPE nvitop_info gauge\nnvitop_info{device_count="0"} 1.0\n')
    assert page.format == "nvitop" and page.gpus == ()


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("<html><body>502 Bad Gateway</body></html>", "no GPU memory metrics"),
        ("\x00\x17 {{{ not a metric \xff", "no GPU memory metrics"),
        ('node_cpu_seconds_total{cpu="0"} 1\n', "no GPU memory metrics"),
        ('DCGM_FI_DEV_GPU_UTIL{gpu="0"} 3\n', "add them to its counters file"),
        ("", "no GPU memory metrics"),
        ('DCGM_FI_DEV_FB_USED{gpu="0"} twelve\n', "not a Prometheus text page"),
        ("DCGM_FI_DEV_FB_USED{gpu=0} 12\n", "not a Prometheus text page"),
    ],
)
def test_a_page_without_figures_is_a_one_line_error(text: str, words: str) -> None:
    with pytest.raises(ExporterPageError, match=words) as caught:
        parse_page(text)
    assert "\n" not in str(caught.value)


def test_nan_figures_are_no_figure() -> None:
    text = 'gpu_memory_used_MiB{index="0"} NaN\ngpu_memory_free_MiB{index="0"} NaN\n'
    assert parse_page(text).gpus == ()


@pytest.mark.parametrize("kind", ["dcgm", "nvidia_smi", "nvitop"])
def test_the_simulated_exporter_writes_each_format_as_parsed_here(kind: str) -> None:
    """The simulator's pages go through the same parser: node figures split over two GPUs."""
    node = SimNode(vram_gb=24, external_vram_gb=6, preload=[("llama3.1", "gpu")])
    with node, SimExporter(node, format=kind, gpus=2) as exporter:
        page = parse_page(exporter.page_text())
        total, used = node.scheduler.driver_memory()
    assert page.format == kind and len(page.gpus) == 2
    assert sum(g.total_mb for g in page.gpus) == pytest.approx(total / 2**20)
    assert sum(g.used_mb for g in page.gpus) == pytest.approx(used / 2**20, abs=2)
    assert sum(g.free_mb for g in page.gpus) == pytest.approx((total - used) / 2**20, abs=2)


def test_go_float_is_strconv_g_shortest() -> None:
    """Go's client writes 7.3354182656e+10 and 27 (ftoa.go: shortest 'g' switches to %e at 1e6)."""
    assert [go_float(v) for v in (0, 27, 165.926, 999999, 1e6, 7.3354182656e10, 0.0001, 1e-05)] == [
        "0",
        "27",
        "165.926",
        "999999",
        "1e+06",
        "7.3354182656e+10",
        "0.0001",
        "1e-05",
    ]


# ------------------------------------------------------------------ the figures next to Ollama's models
def memory(used: float, free: float, stale: bool = False, gpus: int = 1) -> GpuMemory:
    share = GpuFigures("0", "GPU-a", None, (used + free) / gpus, used / gpus, free / gpus)
    return GpuMemory("http://n:11434", "http://n:9400/metrics", "dcgm", (share,) * gpus, 1.0, stale)


def row(name: str, size_mb: float, vram_mb: float) -> dict:
    location = "GPU (VRAM)" if vram_mb >= size_mb else "CPU (RAM)" if vram_mb == 0 else "Split (40% GPU)"
    return {"name": name, "size_mb": size_mb, "vram_mb": vram_mb, "location": location}


def test_vram_other_is_used_minus_what_ollama_lists_never_below_zero() -> None:
    models = [row("llama3.1", 9000, 9000), row("mxbai-embed-large", 700, 0)]
    fields = vram_fields(memory(used=15000, free=9576), models)
    assert (fields["vram_ollama_mb"], fields["vram_other_mb"], fields["vram_total_mb"]) == (9000, 6000, 24576)
    assert fields["gpus"][0]["other_mb"] == 6000
    assert vram_fields(memory(used=8000, free=16576), models)["vram_other_mb"] == 0  # estimates above used
    assert [g["other_mb"] for g in vram_fields(memory(15000, 9576, gpus=2), models)["gpus"]] == [None, None]


def test_unknown_figures_are_none_and_stale() -> None:
    never = GpuMemory("http://n:11434", "http://n:9400/metrics", error="connection refused")
    fields = vram_fields(never, [row("llama3.1", 9000, 9000)])
    assert (fields["vram_total_mb"], fields["vram_other_mb"], fields["vram_stale"], fields["gpus"]) == (
        None,
        None,
        True,
        [],
    )


def test_held_by_others_only_when_other_programs_are_what_keeps_it_off() -> None:
    split = row("llama3.1", 9000, 3000)  # needs 6000 MiB more
    priority = ["llama3.1"]
    # 20 GB held by a training job, 1.5 GB free: the job is what keeps it off
    [held] = kept_off_by_others([split], memory(used=23000, free=1576), priority)
    assert (held.model, held.need_mb, held.room_mb, held.other_mb) == ("llama3.1:latest", 6000, 1576, 20000)
    # enough free VRAM now: nothing keeps it off (the optimizer's next pass moves it)
    assert kept_off_by_others([split], memory(used=3000, free=21576), priority) == []
    # Ollama could make room by evicting its own other model: not other programs' doing
    big = row("codellama", 7000, 7000)
    assert kept_off_by_others([split, big], memory(used=18000, free=6576), priority) == []
    # too big for the GPU whoever holds what (a 70b on 24 GB)
    assert kept_off_by_others([row("llama3.1", 43000, 20000)], memory(23000, 1576), priority) == []
    # not a priority model, pinned to CPU by the user, or figures that are stale: no condition
    assert kept_off_by_others([split], memory(23000, 1576), ["codellama"]) == []
    assert (
        kept_off_by_others([split], memory(23000, 1576), priority, skip=lambda m: m == "llama3.1:latest")
        == []
    )
    assert kept_off_by_others([split], memory(23000, 1576, stale=True), priority) == []


def test_held_by_others_is_one_event_per_condition_and_one_when_it_ends() -> None:
    tracker = HeldOffTracker()
    held = HeldOff("llama3.1:latest", 6000, 1576, 20000)
    [start] = tracker.update("http://n:11434", [held])
    assert (start.kind, start.model, start.data["other_mb"]) == (
        "vram_held_by_others",
        "llama3.1:latest",
        20000,
    )
    assert tracker.update("http://n:11434", [held]) == []
    [end] = tracker.update("http://n:11434", [])
    assert (end.kind, end.node, end.model) == (
        "vram_held_by_others_resolved",
        "http://n:11434",
        "llama3.1:latest",
    )
    assert tracker.update("http://n:11434", []) == []
