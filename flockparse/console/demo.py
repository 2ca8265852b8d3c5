"""`--demo`: a simulated three-node cluster in this process, so a newcomer sees the whole loop at once.

What it shows are the two everyday ways real Ollama nodes lose their GPU placement, as they happen:
- node 2, a GPU node where a training job holds 20 of the 24 GB of VRAM: llama3.1 was loaded next to it
  and split between GPU and RAM. The optimizer's move fails honestly while the job runs (and the model is
  put back). After a while the job ends; Ollama moves nothing by itself, the optimizer's next pass (or
  `optimizer now`) does.
- node 3, a healthy GPU node whose Ollama restarts a little later: it comes back with nothing loaded, and
  the warm-up puts the priority models back onto its GPU before clients arrive.
Node 1 is a CPU-only box. Beside each GPU node runs a simulated dcgm-exporter, so `vram_report` and
`lb_stats` show the real VRAM (Ollama / other programs / free) and the training job's VRAM is reported as
keeping llama3.1 off the GPU (`vram_held_by_others`) until it ends. A `demo` line above the prompt says
what is about to happen, a few seconds ahead, so `vram_report` can show the "before" state. Nothing is
written to the user's config directory: history and console.log go to a temporary directory
(flockparse-demo-*) that is removed at exit.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flockparse.console.config import Config
from flockparse.events import Event

DEMO_INTERVAL_S = 20.0
DEMO_HEALTH_INTERVAL_S = 1.0
DEMO_LOAD_SECONDS_PER_GB = 0.3
TRAINING_JOB_GB = 20.0
RESTART_DOWNTIME_S = 3.0
READY_WAIT_S, READY_POLL_S = 30.0, 0.1
PACE_ENV = "FLOCKPARSE_DEMO_PACE"  # scales the script's waits (the end-to-end test runs it faster)


def demo_node_specs() -> list[dict[str, Any]]:
    """The three SimNode configurations (kwargs for ollama_sim.SimNode)."""
    common = {"load_seconds_per_gb": DEMO_LOAD_SECONDS_PER_GB, "keep_alive_default": "30m"}
    llama = [("llama3.1", "auto")]
    return [
        {"vram_gb": 0, "ram_gb": 32, "preload": llama, **common},
        {"vram_gb": 24, "ram_gb": 64, "external_vram_gb": TRAINING_JOB_GB, "preload": llama, **common},
        {"vram_gb": 24, "ram_gb": 64, "preload": [("mxbai-embed-large", "auto"), *llama], **common},
    ]


@dataclass
class DemoCluster:
    """The simulated nodes and the GPU exporter beside each GPU node (`gpu_metrics`: node -> its URL)."""

    cluster: Any
    exporters: dict[str, Any]

    @property
    def nodes(self) -> list[Any]:
        return self.cluster.nodes

    @property
    def urls(self) -> list[str]:
        return self.cluster.urls

    @property
    def gpu_metrics(self) -> dict[str, str]:
        return {node: exporter.url for node, exporter in self.exporters.items()}

    def stop(self) -> None:
        for exporter in self.exporters.values():
            exporter.stop()
        self.cluster.stop()


def start_demo_cluster() -> DemoCluster:
    """Start the simulated cluster on 127.0.0.1 ephemeral ports; the caller stops it on exit."""
    from ollama_sim import SimCluster  # imported here: only --demo needs the simulator
    from ollama_sim.exporter import SimExporter

    cluster = SimCluster(demo_node_specs()).start()
    gpu_nodes = [node for node in cluster.nodes if node.vram_gb > 0]
    return DemoCluster(cluster, {node.url: SimExporter(node, format="dcgm").start() for node in gpu_nodes})


def demo_config(
    urls: list[str], flags: Config | None = None, gpu_metrics: dict[str, str] | None = None
) -> Config:
    """A short interval so the loop is visible (unless a flag says otherwise); path=None: nothing saved."""
    config = Config(
        nodes=list(urls),
        interval=DEMO_INTERVAL_S,
        health_interval=DEMO_HEALTH_INTERVAL_S,
        gpu={urls[0]: False, urls[1]: True, urls[2]: True},
        path=None,
        nodes_from="demo",
        gpu_metrics=dict(gpu_metrics or {}),
    )
    if flags is not None:
        config.priority_models = flags.priority_models
        config.timeout = flags.timeout
        config.interval = flags.interval if flags.interval != Config().interval else DEMO_INTERVAL_S
        if flags.health_interval != Config().health_interval:
            config.health_interval = flags.health_interval
    return config


def demo_files_dir() -> Path:
    """A temporary directory for the demo's history and console.log; the caller removes it at exit."""
    return Path(tempfile.mkdtemp(prefix="flockparse-demo-"))


def remove_demo_files(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def demo_banner(urls: list[str]) -> str:
    ports = ", ".join(u.rsplit(":", 1)[-1] for u in urls)
    return (
        f"demo: 3 simulated Ollama nodes on 127.0.0.1 ({ports}): a CPU-only node; a GPU node where a "
        f"training job holds {TRAINING_JOB_GB:.0f} of 24 GB of VRAM, so llama3.1 loaded split between GPU "
        "and RAM; and a healthy GPU node whose Ollama will restart in a moment.\n"
        "A dcgm-exporter runs beside each GPU node: `vram_report` and `lb_stats` show their real VRAM.\n"
        "Try `vram_report` now and again later, `lb_stats`, `optimizer now`, `force_cpu llama3.1`, `help`."
    )


@dataclass(frozen=True)
class Step:
    after_s: float  # seconds after the previous step
    say: str
    act: Callable[[], None] | None = None


class DemoScript:
    """The demo's timeline on a daemon thread: narrate, then change the simulated cluster."""

    def __init__(self, cluster: Any, pace: float | None = None) -> None:
        self.cluster = cluster
        self.pace = pace if pace is not None else _pace_from_env()
        self._stop = threading.Event()
        training, restarting = cluster.nodes[1], cluster.nodes[2]
        short = [url.split("://", 1)[-1] for url in cluster.urls]
        job, restart = f"the training job on {short[1]}", f"Ollama on {short[2]}"
        self.steps = [
            Step(12, f"in 5 s {job} ends and frees its {TRAINING_JOB_GB:.0f} GB of VRAM"),
            Step(
                5,
                f"{job} ended. Ollama moves nothing by itself: llama3.1 stays split until the optimizer's "
                "next pass (or type `optimizer now`)",
                lambda: setattr(training, "external_vram_gb", 0.0),
            ),
            Step(20, f"in 5 s {restart} restarts (an upgrade, a reboot): it comes back with nothing loaded"),
            Step(5, f"{restart} is restarting", lambda: restarting.restart(RESTART_DOWNTIME_S)),
        ]

    def start(self, say: Callable[[Event], None], ready: Callable[[], bool] = lambda: True) -> DemoScript:
        """Run the timeline once `ready()` (polled, bounded): the clock starts after the start-up pass."""
        threading.Thread(target=self._run, args=(say, ready), name="demo-script", daemon=True).start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _run(self, say: Callable[[Event], None], ready: Callable[[], bool]) -> None:
        deadline = time.monotonic() + READY_WAIT_S
        while not ready() and time.monotonic() < deadline:
            if self._stop.wait(READY_POLL_S):
                return
        for step in self.steps:
            if self._stop.wait(step.after_s * self.pace):
                return
            say(Event("demo", message=step.say))
            if step.act is not None:
                step.act()


def _pace_from_env() -> float:
    try:
        pace = float(os.environ.get(PACE_ENV, "1"))
    except ValueError:
        return 1.0
    return pace if 0 < pace <= 10 else 1.0
