"""Simulated Ollama node(s) on 127.0.0.1, faithful to shared/spec/ollama-api.md (era C, Ollama >= 0.30).

No real Ollama can run in tests, the demo or the benchmarks, so this package stands in for it: the same wire
format (field sets, status codes, error texts, NDJSON streaming, keep-alive HTTP/1.1 with TCP_NODELAY) and
the same scheduler rules (num_gpu semantics, needsReload, split only when alone, eviction order, keep_alive,
asynchronous unload). Memory figures are computed from a small catalogue of realistic models. Standard
library only; it shares no code with the client it tests (gpu_controller.py and the rest of the core).

Reading order (each module depends only on the ones before it):
  catalogue.py  models and their memory (ModelSpec, CATALOG, canonical_name, default_num_ctx)
  wire.py       Go's texts: durations, keep_alive, JSON errors, timestamps, request and option decoding
  scheduler.py  Scheduler: runners, needsReload, placement, eviction, OOM retry, expiry, restart (no sockets)
  replies.py    the JSON bodies of /api/ps, /api/tags, /api/show, and fake inference
  engine.py     the process's HTTP serving: one event loop for every node's sockets, workers for waits
  server.py     SimNode (a Scheduler on a socket, faults, scenarios), the HTTP handler, SimCluster
  cli.py        `python3 -m ollama_sim --port 11434 ...`

Everything tests, bench/ and the demo import is re-exported here: `from ollama_sim import SimNode, ...`.
"""

from ollama_sim.catalogue import (
    CATALOG,
    DEFAULT_MODELS,
    RUNNER_VRAM_OVERHEAD,
    VARIANTS,
    GiB,
    MiB,
    ModelSpec,
    canonical_name,
    default_num_ctx,
)
from ollama_sim.cli import main
from ollama_sim.replies import fake_embedding, fake_tokens, show_body
from ollama_sim.scheduler import (
    ERA_A_MINIMUM_MEMORY,
    FIT_FRACTION,
    FIT_TARGET,
    REAPER_MAX_WAIT,
    Placement,
    Runner,
    Scheduler,
)
from ollama_sim.server import REQUEST_LOG_MAX, SimCluster, SimNode
from ollama_sim.wire import (
    BUSY_TEXT,
    FOREVER_NS,
    VERSION,
    ApiError,
    decode_request,
    parse_env_keep_alive,
    parse_go_duration,
    parse_keep_alive,
    parse_options,
)

__all__ = [
    "BUSY_TEXT",
    "CATALOG",
    "DEFAULT_MODELS",
    "ERA_A_MINIMUM_MEMORY",
    "FIT_FRACTION",
    "FIT_TARGET",
    "FOREVER_NS",
    "REAPER_MAX_WAIT",
    "REQUEST_LOG_MAX",
    "RUNNER_VRAM_OVERHEAD",
    "VARIANTS",
    "VERSION",
    "ApiError",
    "GiB",
    "MiB",
    "ModelSpec",
    "Placement",
    "Runner",
    "Scheduler",
    "SimCluster",
    "SimNode",
    "canonical_name",
    "decode_request",
    "default_num_ctx",
    "fake_embedding",
    "fake_tokens",
    "main",
    "parse_env_keep_alive",
    "parse_go_duration",
    "parse_keep_alive",
    "parse_options",
    "show_body",
]
