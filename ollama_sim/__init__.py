"""Simulated Ollama node(s) on 127.0.0.1 (placeholder, filled in by the split)."""

from ollama_sim.server import *  # noqa: F403
from ollama_sim.server import (  # noqa: F401
    BUSY_TEXT,
    CATALOG,
    DEFAULT_MODELS,
    RUNNER_VRAM_OVERHEAD,
    VARIANTS,
    GiB,
    ModelSpec,
    SimCluster,
    SimNode,
)
