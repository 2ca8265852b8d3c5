"""Client CPU per GPU-exporter scrape: what reading a big dcgm-exporter page costs (issue 13).

    python3 bench/gpu_metrics_cpu.py [scrapes]

A Kubernetes node with 8 GPUs and dcgm-exporter's default counters, each series written once per pod
sharing the GPU (3 pods), is about 0.3 MB of text, nearly all of it metrics other than the framebuffer's.
"whole page" hands every line to prometheus_client's parser, "memory lines" (what flockparse does) only the
lines of the families it reads; both then give the same GPU figures. Then the whole scrape (HTTP over
loopback through the node transport, and the parse) is timed against a SimExporter serving that page.
`time.thread_time()` of the calling thread only: the simulated exporter's threads are not counted.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from flockparse.gpu_metrics import GpuMetricsScraper, parse_page  # noqa: E402
from ollama_sim.exporter import SimExporter  # noqa: E402

COUNTERS = [f"DCGM_FI_DEV_COUNTER_{i}" for i in range(34)] + [
    "DCGM_FI_DEV_FB_FREE",
    "DCGM_FI_DEV_FB_USED",
    "DCGM_FI_DEV_FB_RESERVED",
]


def big_page(gpus: int = 8, pods: int = 3) -> str:
    lines = []
    for name in COUNTERS:
        lines += [f"# HELP {name} Some DCGM field.", f"# TYPE {name} gauge"]
        for gpu in range(gpus):
            for pod in range(pods):
                labels = (
                    f'gpu="{gpu}",UUID="GPU-{gpu:08x}-aaaa-bbbb-cccc-{gpu:012x}",pci_bus_id="00000000:{gpu:02X}'
                    f':00.0",device="nvidia{gpu}",modelName="NVIDIA H100 80GB HBM3",hostname="node-17",'
                    f'container="c{pod}",namespace="team-{pod}",pod="worker-{gpu}-{pod}-7d9f8c6b5-x2k4q"'
                )
                value = {"DCGM_FI_DEV_FB_FREE": 50359, "DCGM_FI_DEV_FB_USED": 30721}.get(name, 479)
                lines.append(f"{name}{{{labels}}} {value}")
    return "\n".join(lines) + "\n"


def cpu_per_call(call: Callable[[], object], calls: int) -> float:
    """Microseconds of this thread's CPU per call, after a warm-up."""
    for _ in range(5):
        call()
    started = time.thread_time()
    for _ in range(calls):
        call()
    return (time.thread_time() - started) / calls * 1e6


def main() -> int:
    calls = int(sys.argv[1]) if len(sys.argv) > 1 else 200
    page = big_page()
    whole = lambda: list(text_string_to_metric_families(page))  # noqa: E731
    ours = lambda: parse_page(page)  # noqa: E731
    assert len(parse_page(page).gpus) == 8
    rounds = [(cpu_per_call(whole, calls), cpu_per_call(ours, calls)) for _ in range(5)]
    before, after = statistics.median(r[0] for r in rounds), statistics.median(r[1] for r in rounds)
    print(f"page: {len(page) / 1e6:.2f} MB, {page.count(chr(10))} lines, 8 GPUs x 3 pods")
    print(f"parse, whole page : {before:8.0f} us CPU per scrape (median of 5 rounds of {calls})")
    print(f"parse, memory lines: {after:8.0f} us  ratio {after / before:.2f}")
    with SimExporter(page=page) as exporter:
        scraper = GpuMetricsScraper({"http://node:11434": exporter.url}, timeout=5.0)
        changed = lambda: scraper._read(exporter.url)  # noqa: E731  (no last page: parsed every time)
        target = scraper._targets["http://node:11434"]
        target.lines, target.page = scraper._read(exporter.url)
        same = lambda: scraper._read(exporter.url, target)  # noqa: E731  (the same figures as last time)
        for what, call in (("figures changed", changed), ("figures unchanged", same)):
            cpu = statistics.median(cpu_per_call(call, calls) for _ in range(5))
            share = cpu * 1000 / 15 / 1e6 * 100
            print(f"one scrape, {what:17}: {cpu:8.0f} us CPU (HTTP + parse); 1,000 nodes every 15 s: "
                  f"{share:.1f}% of a core")  # fmt: skip
        scraper.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
