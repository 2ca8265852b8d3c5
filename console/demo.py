"""`--demo`: a simulated three-node cluster in this process, so a newcomer sees the whole loop at once.

Node 1 is CPU-only, node 2 is a GPU node with llama3.1 on GPU, node 3 is a GPU node that has "just
restarted": mxbai-embed-large sits on CPU although the GPU is free. Within seconds the optimizer moves it
to GPU and says so above the prompt. Nothing is written to the user's config directory: history and
console.log go to a temporary directory (flockparse-demo-*) that is removed at exit.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

from console.config import Config

DEMO_INTERVAL_S = 20.0
DEMO_HEALTH_INTERVAL_S = 1.0
DEMO_LOAD_SECONDS_PER_GB = 0.3


def demo_node_specs() -> list[dict[str, Any]]:
    """The three SimNode configurations (kwargs for ollama_sim.SimNode)."""
    common = {"load_seconds_per_gb": DEMO_LOAD_SECONDS_PER_GB, "keep_alive_default": "30m"}
    return [
        {"vram_gb": 0, "ram_gb": 32, "preload": [("llama3.1", "auto")], **common},
        {"vram_gb": 24, "ram_gb": 64, "preload": [("llama3.1", "gpu")], **common},
        {"vram_gb": 24, "ram_gb": 64, "preload": [("mxbai-embed-large", "cpu")], **common},
    ]


def start_demo_cluster() -> Any:
    """Start the simulated cluster on 127.0.0.1 ephemeral ports; the caller stops it on exit."""
    from ollama_sim import SimCluster  # imported here: only --demo needs the simulator

    return SimCluster(demo_node_specs()).start()


def demo_config(urls: list[str], flags: Config | None = None) -> Config:
    """A short interval so the loop is visible (unless a flag says otherwise); path=None: nothing saved."""
    config = Config(
        nodes=list(urls),
        interval=DEMO_INTERVAL_S,
        health_interval=DEMO_HEALTH_INTERVAL_S,
        gpu={urls[0]: False, urls[1]: True, urls[2]: True},
        path=None,
        nodes_from="demo",
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
    return (
        f"demo: 3 simulated Ollama nodes on 127.0.0.1 ({', '.join(u.rsplit(':', 1)[-1] for u in urls)}): "
        "a CPU-only node, a GPU node, and a GPU node that just restarted with mxbai-embed-large on CPU.\n"
        "Watch the optimizer move it to GPU; try `vram_report`, `lb_stats`, `force_cpu llama3.1`, `help`."
    )
