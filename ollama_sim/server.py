"""Simulated Ollama node(s) on 127.0.0.1, faithful to shared/spec/ollama-api.md (era C, Ollama >= 0.30).

No real Ollama can run in tests, the demo or the benchmarks, so this module stands in for it: the same wire
format (field sets, status codes, error texts, NDJSON streaming, keep-alive HTTP/1.1 with TCP_NODELAY) and
the same scheduler rules (num_gpu semantics, needsReload, split only when alone, eviction order, keep_alive,
asynchronous unload). Memory figures are computed from a small catalogue of realistic models.

"GB" in this module means GiB (2**30 bytes), as nvidia-smi and Ollama's logs count.

Reading order: CATALOG (models and their memory) -> wire helpers (Go's texts for durations, JSON errors,
timestamps) -> SimNode: schedule() -> _process_pending() -> _plan() -> _load(), and the reaper thread that
expires and removes runners -> _Handler (one method per endpoint) -> SimCluster -> main() (the CLI).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import http.server
import json
import math
import random
import re
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

GiB = 1024**3
MiB = 1024**2
FOREVER_NS = 2**63 - 1  # Go's time.Duration(math.MaxInt64): keep_alive < 0
VERSION = "0.33.0-rc2"
BUSY_TEXT = "server busy, please try again.  maximum pending requests exceeded"
FIT_FRACTION = 0.8  # era C eviction test: next to other models the prediction must be <= 80% of free VRAM
FIT_TARGET = 1 * GiB  # llama.cpp --fit leaves this much free per GPU when it places layers automatically
# CUDA context + cuBLAS/library workspaces of one llama-server process on the GPU: real, but in no "buffer
# size" log line, so never in /api/ps size_vram (only the driver's free figure shows it)
RUNNER_VRAM_OVERHEAD = int(0.4 * GiB)
ERA_A_MINIMUM_MEMORY = 457 * MiB  # v0.12.10 ml/device.go:324 MinimumMemory() for CUDA/ROCm
REQUEST_LOG_MAX = 10_000  # request_log keeps the newest entries only
REAPER_MAX_WAIT = 30.0  # the expiry thread is woken on every state change; this is only a safety net


# --------------------------------------------------------------------------------------------- catalogue


@dataclass(frozen=True)
class ModelSpec:
    """One installed model: what /api/tags and /api/show report, and what loading it costs."""

    name: str  # canonical "model:tag"
    family: str
    parameter_size: str
    quantization_level: str
    file_size: int  # bytes on disk (/api/tags size)
    block_count: int
    context_length: int  # trained context
    embedding_length: int
    head_count: int
    head_count_kv: int
    head_dim: int
    capabilities: tuple[str, ...]
    parameter_count: int
    modified_at: str = "2026-01-15T10:00:00.123456789Z"
    format: str = "gguf"  # "safetensors" = an MLX-engine model (images.go:88-90 IsMLX)
    options: tuple[tuple[str, Any], ...] = ()  # Modelfile PARAMETERs, applied to every request
    base: str = ""  # a copy made with `ollama create` (FROM base + PARAMETER) shares the base's blob

    @property
    def digest(self) -> str:
        """A stable fake manifest digest (64 hex, no sha256: prefix) like /api/tags and /api/ps show."""
        return hashlib.sha256(self.name.encode()).hexdigest()

    @property
    def blob(self) -> str:
        """The model blob's sha256: Ollama breaks eviction ties by this path."""
        return hashlib.sha256(b"blob:" + (self.base or self.name).encode()).hexdigest()

    @property
    def mlx(self) -> bool:
        """images.go:88-90: a safetensors model runs in the MLX runner, not llama-server."""
        return self.format == "safetensors"

    @property
    def layers(self) -> int:
        """Offloadable layers: the blocks plus the output layer (`offloaded 33/33 layers to GPU`)."""
        return self.block_count + 1

    @property
    def embedding_only(self) -> bool:
        return "completion" not in self.capabilities

    def kv_bytes(self, num_ctx: int) -> int:
        """f16 KV cache: 2 (K and V) x layers x kv_heads x head_dim x ctx x 2 bytes."""
        return 2 * self.block_count * self.head_count_kv * self.head_dim * num_ctx * 2

    def loaded_size(self, num_ctx: int, num_batch: int = 512) -> int:
        """Memory a runner uses: weights + f16 KV (PredictServerVRAM) + compute buffers.

        Completion models pay the generation batch surcharge for large batches (768 MiB at >= 1024,
        2 GiB at >= 2048); embedding models never do.
        """
        graph = min(256 * MiB, self.file_size // 2)
        if not self.embedding_only and num_batch >= 2048:
            graph += 2 * GiB
        elif not self.embedding_only and num_batch >= 1024:
            graph += 768 * MiB
        return self.file_size + self.kv_bytes(num_ctx) + graph

    def predicted_vram(self, num_ctx: int, num_batch: int = 512) -> int:
        """The scheduler's pre-flight figure: file + f16 KV (llama_server.go:2681-2701 PredictServerVRAM)
        + the generation batch surcharge for completion models (sched.go:541 predictedForLoad)."""
        surcharge = 0
        if not self.embedding_only and num_batch >= 2048:
            surcharge = 2 * GiB
        elif not self.embedding_only and num_batch >= 1024:
            surcharge = 768 * MiB
        return self.file_size + self.kv_bytes(num_ctx) + surcharge


_CHAT = ("completion", "tools")
_EMBED = ("embedding",)
# fmt: off
_CATALOG_ROWS = [  # name family params quant file-bytes blocks ctx emb heads kv caps count
    ("llama3.1:latest", "llama", "8.0B", "Q4_K_M", 4920753328, 32, 131072, 4096, 32, 8, _CHAT, 8030261312),
    ("llama3.1:70b", "llama", "70.6B", "Q4_K_M", 42520413916, 80, 131072, 8192, 64, 8, _CHAT, 70553706560),
    ("llama3.2:3b", "llama", "3.2B", "Q4_K_M", 2019393189, 28, 131072, 3072, 24, 8, _CHAT, 3212749888),
    ("codellama:latest", "llama", "7B", "Q4_0", 3825910662, 32, 16384, 4096, 32, 32, ("completion",),
     6738546688),
    ("mxbai-embed-large:latest", "bert", "334M", "F16", 669615493, 24, 512, 1024, 16, 16, _EMBED, 334090240),
    ("nomic-embed-text:latest", "nomic-bert", "137M", "F16", 274302450, 12, 2048, 768, 12, 12, _EMBED,
     136727040),
    ("all-minilm:latest", "bert", "23M", "F16", 45960996, 6, 512, 384, 12, 12, _EMBED, 22565376),
]
# fmt: on


def _spec_from_row(index: int, row: tuple) -> ModelSpec:
    name, family, params, quant, file_size, blocks, ctx, emb, heads, kv_heads, caps, count = row
    return ModelSpec(
        name=name,
        family=family,
        parameter_size=params,
        quantization_level=quant,
        file_size=file_size,
        block_count=blocks,
        context_length=ctx,
        embedding_length=emb,
        head_count=heads,
        head_count_kv=kv_heads,
        head_dim=emb // heads,
        capabilities=caps,
        parameter_count=count,
        modified_at=f"2026-01-{20 - index:02d}T10:00:00.123456789Z",
    )


CATALOG: dict[str, ModelSpec] = {row[0]: _spec_from_row(i, row) for i, row in enumerate(_CATALOG_ROWS)}
DEFAULT_MODELS: tuple[str, ...] = tuple(CATALOG)  # what SimNode(models=None) installs: the 7 above


def _variant(base: str, name: str, options: tuple[tuple[str, Any], ...], day: int) -> ModelSpec:
    """A copy made with `ollama create NAME -f Modelfile` (FROM base + PARAMETER lines)."""
    spec = CATALOG[base]
    stamp = f"2026-02-{day:02d}T10:00:00.123456789Z"
    return dataclasses.replace(spec, name=name, options=options, base=base, modified_at=stamp)


# Catalogue variants, installed only when a test or the CLI names them (models=[...]):
# - llama3.1-cpu: `PARAMETER num_gpu 0`, the documented way to get a CPU copy (Ollama issue #9836);
# - codellama-16k: `PARAMETER num_ctx 16384`;
# - qwen3.5:2b-nvfp4: an MLX (safetensors) model of the Ollama library (integration/reg_release_test.go:18).
VARIANTS: dict[str, ModelSpec] = {
    "llama3.1-cpu:latest": _variant("llama3.1:latest", "llama3.1-cpu:latest", (("num_gpu", 0),), 2),
    "codellama-16k:latest": _variant("codellama:latest", "codellama-16k:latest", (("num_ctx", 16384),), 1),
    "qwen3.5:2b-nvfp4": ModelSpec(
        name="qwen3.5:2b-nvfp4",
        family="qwen35",
        parameter_size="2.3B",
        quantization_level="nvfp4",
        file_size=1_712_381_952,
        block_count=24,
        context_length=262144,
        embedding_length=2048,
        head_count=8,
        head_count_kv=2,
        head_dim=256,
        capabilities=("completion", "tools", "thinking"),
        parameter_count=2_274_000_000,
        modified_at="2026-02-03T10:00:00.123456789Z",
        format="safetensors",
    ),
}
CATALOG.update(VARIANTS)


def canonical_name(name: str) -> str:
    """Ollama's short-name rule: `llama3.1` -> `llama3.1:latest`; a `library/` prefix is dropped."""
    name = name.strip()
    for prefix in ("registry.ollama.ai/library/", "library/"):
        if name.lower().startswith(prefix):
            name = name[len(prefix) :]
    last = name.rsplit("/", 1)[-1]
    return name if ":" in last else f"{name}:latest"


def default_num_ctx(total_vram_bytes: int) -> int:
    """Era C (>= 0.15.5): the default context from total VRAM, set once at server start."""
    if total_vram_bytes >= 47 * GiB:
        return 262144
    if total_vram_bytes >= 23 * GiB:
        return 32768
    return 4096


def _parse_era(version: str) -> bool:
    """True for era A (<= 0.12.10, /api/ps shows llm/memory.go estimates); False for era C (>= 0.30).

    Era B (0.12.11-0.29.x) places layers its own way (createLayout) and is not simulated: ValueError.
    """
    parts = re.match(r"(\d+)\.(\d+)\.(\d+)", version)
    if parts is None:
        raise ValueError(f"version {version!r} is not MAJOR.MINOR.PATCH")
    number = tuple(int(p) for p in parts.groups())
    if number <= (0, 12, 10):
        return True
    if number < (0, 30, 0):
        raise ValueError(f"version {version}: era B (0.12.11-0.29.x) not simulated; use <=0.12.10 or >=0.30")
    return False


# --------------------------------------------------------------------------------------------- wire helpers


def _go_quote(text: str) -> str:
    """strconv.Quote / %q for the texts we meet (JSON escaping is the same for ASCII)."""
    return json.dumps(text, ensure_ascii=False)


_DURATION_UNITS = {"ns": 1, "us": 1e3, "µs": 1e3, "μs": 1e3, "ms": 1e6, "s": 1e9, "m": 60e9, "h": 3600e9}


def parse_go_duration(text: str) -> int:
    """Go's time.ParseDuration, in ns, with Go's error texts ('time: missing unit in duration "-1"')."""
    quoted = _go_quote(text)
    rest, negative = text, False
    if rest[:1] in ("+", "-"):
        negative, rest = rest[0] == "-", rest[1:]
    if rest == "0":
        return 0
    if not rest:
        raise ValueError(f"time: invalid duration {quoted}")
    total = 0.0
    while rest:
        number = re.match(r"(\d*)(\.\d*)?", rest)
        whole, frac = number.group(1), number.group(2) or ""
        if not whole and frac in ("", "."):
            raise ValueError(f"time: invalid duration {quoted}")
        rest = rest[number.end() :]
        unit = re.match(r"[^\d.]*", rest).group(0)
        if not unit:
            raise ValueError(f"time: missing unit in duration {quoted}")
        if unit not in _DURATION_UNITS:
            raise ValueError(f"time: unknown unit {_go_quote(unit)} in duration {quoted}")
        total += float((whole or "0") + frac) * _DURATION_UNITS[unit]
        rest = rest[len(unit) :]
    return -int(total) if negative else int(total)


def parse_keep_alive(value: Any) -> int | None:
    """api.Duration.UnmarshalJSON: number = seconds, string = Go duration, < 0 = forever, None = unset."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError("Unsupported type: 'bool'")
    if isinstance(value, int | float):
        return FOREVER_NS if value < 0 else int(value * 1e9)
    if isinstance(value, str):
        ns = parse_go_duration(value)
        return FOREVER_NS if ns < 0 else ns
    go_type = "[]interface {}" if isinstance(value, list) else "map[string]interface {}"
    raise ValueError(f"Unsupported type: '{go_type}'")


def parse_env_keep_alive(value: str | int | float) -> int:
    """OLLAMA_KEEP_ALIVE: like the API, but a bare integer string means seconds ("-1" works there)."""
    if isinstance(value, int | float):
        return parse_keep_alive(value)  # type: ignore[return-value]
    with contextlib.suppress(ValueError):
        return parse_keep_alive(float(value))  # type: ignore[return-value]
    return parse_keep_alive(value)  # type: ignore[return-value]


def _rfc3339(ns: int, utc: bool) -> str:
    """Go's RFC3339Nano: nanoseconds with trailing zeros trimmed; 'Z' for a zero offset."""
    seconds, nanos = divmod(ns, 10**9)
    moment = datetime.fromtimestamp(seconds, UTC)
    if not utc:
        moment = moment.astimezone()
    text = moment.strftime("%Y-%m-%dT%H:%M:%S")
    if nanos:
        text += "." + f"{nanos:09d}".rstrip("0")
    offset = moment.utcoffset()
    if not offset:
        return text + "Z"
    minutes = int(offset.total_seconds() // 60)
    sign = "+" if minutes >= 0 else "-"
    return f"{text}{sign}{abs(minutes) // 60:02d}:{abs(minutes) % 60:02d}"


def _created_at() -> str:
    return _rfc3339(time.time_ns(), utc=True)


def _expiry_ns(now_ns: int, keep_alive_ns: int) -> int:
    return now_ns + keep_alive_ns  # forever: now + MaxInt64 ns (~2318), as Go computes it


def _go_json_error(body: bytes, err: json.JSONDecodeError) -> str:
    """The Go decoder's wording for the common malformed bodies (truncated, or a stray character)."""
    if err.pos >= len(body.rstrip()):
        return "unexpected EOF"
    wanted = "object key string" if err.msg.startswith("Expecting property name") else "value"
    return f"invalid character '{err.doc[err.pos]}' looking for beginning of {wanted}"


_JSON_KIND = {str: "string", bool: "bool", int: "number", float: "number", list: "array", dict: "object"}
# Go types of the request fields we check, per request struct (only the fields clients really send).
_FIELD_TYPES: dict[str, dict[str, tuple[type, str]]] = {
    "GenerateRequest": {
        "model": (str, "string"),
        "prompt": (str, "string"),
        "suffix": (str, "string"),
        "system": (str, "string"),
        "template": (str, "string"),
        "stream": (bool, "bool"),
        "raw": (bool, "bool"),
        "options": (dict, "map[string]interface {}"),
        "context": (list, "[]int"),
    },
    "ChatRequest": {
        "model": (str, "string"),
        "messages": (list, "[]api.Message"),
        "stream": (bool, "bool"),
        "options": (dict, "map[string]interface {}"),
    },
    "EmbedRequest": {"model": (str, "string"), "options": (dict, "map[string]interface {}")},
    "EmbeddingRequest": {
        "model": (str, "string"),
        "prompt": (str, "string"),
        "options": (dict, "map[string]interface {}"),
    },
    "ShowRequest": {"model": (str, "string"), "name": (str, "string"), "verbose": (bool, "bool")},
}


class ApiError(Exception):
    """An error reply: status + the exact `{"error": text}` Ollama sends."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def decode_request(body: bytes, go_struct: str) -> dict:
    """Decode a JSON body like gin's ShouldBindJSON would, raising ApiError(400) with Go's texts."""
    if not body.strip():
        raise ApiError(400, "missing request body")
    try:
        data = json.loads(body)
    except json.JSONDecodeError as err:
        raise ApiError(400, _go_json_error(body, err)) from None
    if not isinstance(data, dict):
        kind = _JSON_KIND.get(type(data), "null")
        raise ApiError(400, f"json: cannot unmarshal {kind} into Go value of type api.{go_struct}")
    for key, (py_type, go_type) in _FIELD_TYPES.get(go_struct, {}).items():
        value = data.get(key)
        if value is None:
            continue
        ok = isinstance(value, py_type) and not (py_type is not bool and isinstance(value, bool))
        if not ok:
            kind = _JSON_KIND.get(type(value), "null")
            raise ApiError(
                400, f"json: cannot unmarshal {kind} into Go struct field {go_struct}.{key} of type {go_type}"
            )
    try:
        data["_keep_alive_ns"] = parse_keep_alive(data.get("keep_alive"))
    except ValueError as err:
        raise ApiError(400, str(err)) from None
    return data


_INT_OPTIONS = ("num_ctx", "num_batch", "num_gpu", "main_gpu", "num_thread", "num_predict", "num_keep")
_INT_OPTIONS += ("seed", "top_k", "repeat_last_n")
_BOOL_OPTIONS = ("use_mmap", "use_mlock", "numa")


def parse_options(options: dict | None) -> dict:
    """Options.FromMap: wrong types are a 500 with Go's text; unknown keys are ignored."""
    parsed: dict = {}
    for key, value in (options or {}).items():
        if value is None:
            continue
        if key in _INT_OPTIONS:
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ApiError(500, f"option {_go_quote(key)} must be of type integer")
            parsed[key] = int(value)
        elif key in _BOOL_OPTIONS:
            if not isinstance(value, bool):
                raise ApiError(500, f"option {_go_quote(key)} must be of type boolean")
            parsed[key] = value
        else:
            parsed[key] = value
    return parsed


_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-/]*(:[A-Za-z0-9_][A-Za-z0-9_.\-]*)?$")


# --------------------------------------------------------------------------------------------- runners


@dataclass
class Runner:
    """One loaded model instance (Ollama's runnerRef)."""

    spec: ModelSpec
    size: int
    size_vram: int
    num_gpu: int  # stored value: -1 when automatic
    num_ctx: int  # resolved per-slot context (/api/ps context_length)
    num_ctx_explicit: int | None
    num_batch_explicit: int | None
    num_batch: int  # resolved batch (embedding models: compared literally by needsReload)
    main_gpu: int | None
    use_mmap: bool | None
    num_thread: int
    keep_alive_ns: int
    expires_at_ns: int
    held_vram: int = 0  # what the process really holds on the GPU: size_vram + RUNNER_VRAM_OVERHEAD, or 0
    ref_count: int = 0  # requests in flight: a runner is only removed once idle
    stop_at: float | None = None  # set when unloading: removal happens at/after this moment (monotonic)
    # OLLAMA_NUM_PARALLEL (default 1): how many requests compute at once; the others wait their turn
    slots: threading.Semaphore = field(default_factory=lambda: threading.Semaphore(1))
    computing: int = 0  # requests holding a slot now
    waiting: int = 0  # requests waiting for a slot


@dataclass
class _Placement:
    size: int
    size_vram: int
    held_vram: int = 0  # size_vram plus the runner's unreported overhead when it uses the GPU


class _Killed(Exception):
    """A CPU load larger than RAM: the kernel OOM-kills llama-server (no Ollama memory check stops it)."""


class _NeedsEviction(Exception):
    """The model does not fit next to the others (the 80% pre-flight): evict one victim and try again."""


class _OutOfMemory(Exception):
    """llama-server would run out of memory while loading: Ollama's one retry decides what happens."""


# --------------------------------------------------------------------------------------------- the node


class SimNode:
    """A simulated Ollama server on 127.0.0.1 with a VRAM/RAM budget and Ollama's scheduler.

    Scenarios a real node meets: `restart()` (nothing loaded afterwards), a GPU not discovered at start
    (`gpu_found=False`), VRAM held by other programs (`external_vram_gb`), a GPU lost at run time
    (`vram_gb = 0`), `/api/ps` stalling during unloads (`ps_stall_seconds`), an older Ollama (`version`).
    """

    def __init__(
        self,
        vram_gb: float = 24.0,
        ram_gb: float = 64.0,
        models: Iterable[str] | None = None,
        preload: Iterable[tuple[str, str]] | None = None,
        load_seconds_per_gb: float = 0.0,
        unload_seconds: float = 0.05,
        latency_ms: float = 0.0,
        max_loaded: int = 0,
        max_queue: int = 512,
        keep_alive_default: str | int | float = "5m",
        port: int = 0,
        inference_time_scale: float = 0.0,
        gpu_found: bool = True,
        external_vram_gb: float = 0.0,
        ps_stall_seconds: float = 0.0,
        version: str = VERSION,
    ) -> None:
        self.ram_gb = ram_gb
        self._vram_gb = float(vram_gb)
        self._gpu_found = bool(gpu_found)  # discovered once per process (discover/runner.go:45,265)
        self._external_vram_gb = float(external_vram_gb)
        # /api/ps waits while a runner unloads and its VRAM recovers (sched.go:416-463, :1757); 0 = never
        self.ps_stall_seconds = float(ps_stall_seconds)
        self.version = version
        self._era_a = _parse_era(version)
        self.installed: dict[str, ModelSpec] = self._resolve_installed(models)
        self.preload = list(preload or [])
        self._load_seconds_per_gb = load_seconds_per_gb
        self.unload_seconds = unload_seconds
        self.latency_ms = latency_ms
        self.max_loaded = max_loaded
        self.max_queue = max_queue  # OLLAMA_MAX_QUEUE
        self.loading: str | None = None  # the model being scheduled/loaded now (one at a time)
        self.keep_alive_default_ns = parse_env_keep_alive(keep_alive_default)
        # 0 = generations are instant; 1 = they take their simulated time (eval_duration) for real
        self.inference_time_scale = inference_time_scale
        self.port = port
        self.host = "127.0.0.1"
        self.default_num_ctx = default_num_ctx(self.discovered_vram_bytes)

        self._lock = threading.Lock()  # guards the memory state below; never held while sleeping
        self._changed = threading.Condition(self._lock)
        self._load_mutex = threading.Lock()  # one model loads at a time, like Ollama's single pending loop
        self._runners: dict[str, Runner] = {}
        self._counts: dict[str, dict[str, int]] = {}
        self._queued = 0
        self._epoch = 0  # bumped by restart(): loads in progress from before are lost
        self.request_log: list[tuple[str, str, Any]] = []  # the newest REQUEST_LOG_MAX requests
        self.request_log_max = REQUEST_LOG_MAX
        self.bytes_in = 0
        self.bytes_out = 0

        self._fault: str | None = None
        self._fault_seconds = 0.0
        self._fault_paths: tuple[str, ...] | None = None
        self._fault_released = threading.Event()
        self._stopping = threading.Event()
        self._reaper_wake = threading.Event()
        self._server: _Server | None = None
        self._serve_thread: threading.Thread | None = None
        self._reaper: threading.Thread | None = None
        self._connections: set[socket.socket] = set()
        self._conn_lock = threading.Lock()
        self._started = False

    # ----------------------------------------------------------------------------- lifecycle

    def start(self) -> SimNode:
        """Bind 127.0.0.1:port (0 = ephemeral), preload, and serve in daemon threads."""
        if self._started:
            return self
        self._stopping.clear()
        self._apply_preload()
        self._bind()
        self._reaper = threading.Thread(target=self._reap_loop, name=f"sim-reaper-{self.port}", daemon=True)
        self._reaper.start()
        self._started = True
        return self

    def stop(self) -> None:
        """Stop serving; hung or slow handlers are released, never waited on forever."""
        if not self._started:
            return
        self._started = False
        self._stopping.set()
        self._fault_released.set()
        self._reaper_wake.set()
        with self._changed:
            self._changed.notify_all()  # wakes loads and evictions in progress
        self._unbind()
        if self._reaper is not None:
            self._reaper.join(timeout=2)

    def __enter__(self) -> SimNode:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def vram_gb(self) -> float:
        return self._vram_gb

    @vram_gb.setter
    def vram_gb(self, value: float) -> None:
        """Change the GPU (0 = lost, e.g. after suspend/resume); loaded runners keep what they hold."""
        with self._lock:
            self._vram_gb = float(value)

    @property
    def vram_bytes(self) -> int:
        return int(self._vram_gb * GiB)

    @property
    def gpu_found(self) -> bool:
        """Whether this Ollama process discovered the GPU when it started (only restart() changes it)."""
        return self._gpu_found

    @property
    def discovered_vram_bytes(self) -> int:
        """Total VRAM this process found at start: what the default context tier is computed from."""
        return self.vram_bytes if self._gpu_found else 0

    @property
    def external_vram_gb(self) -> float:
        """VRAM held by other programs (a training job, a desktop): never in /api/ps."""
        return self._external_vram_gb

    @external_vram_gb.setter
    def external_vram_gb(self, value: float) -> None:
        """Takes effect for the next placement; loaded models stay where they are."""
        with self._changed:
            self._external_vram_gb = max(0.0, float(value))
            self._changed.notify_all()

    def _gpu_usable(self) -> bool:
        """A GPU list for the next load: discovered at start and not lost since. Lock held."""
        return self._gpu_found and self.vram_bytes > 0

    def _real_free_vram(self, exclude: str = "") -> int:
        """What the driver reports free: VRAM - other programs - every runner's size_vram + overhead."""
        held = sum(r.held_vram for r in self._runners.values() if r.spec.name != exclude)
        return max(0, self.vram_bytes - int(self._external_vram_gb * GiB) - held)

    def _scheduler_free_vram(self, exclude: str = "") -> int:
        """sched.go:1295-1336 updateFreeSpace + llama_server.go:2600-2634: the smaller of Ollama's own
        bookkeeping (total - Σ size_vram) and the driver's figure ("Take the minimum - never optimistic")."""
        booked = sum(r.size_vram for r in self._runners.values() if r.spec.name != exclude)
        return min(max(0, self.vram_bytes - booked), self._real_free_vram(exclude))

    @property
    def ram_bytes(self) -> int:
        return int(self.ram_gb * GiB)

    def _bind(self) -> None:
        server = _Server((self.host, self.port), _Handler)
        server.node = self
        self.port = server.server_address[1]
        self._server = server
        self._serve_thread = threading.Thread(target=server.accept_loop, name=f"sim-{self.port}", daemon=True)
        self._serve_thread.start()

    def _unbind(self) -> None:
        """Close the listener (connections are refused) and drop every open connection."""
        server, self._server = self._server, None
        if server is not None:
            server.close_listener()
            if self._serve_thread is not None:
                self._serve_thread.join(timeout=2)
        with self._conn_lock:
            connections = list(self._connections)
        for conn in connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)

    # ----------------------------------------------------------------------------- faults and scenarios

    def set_fault(self, kind: str, seconds: float = 0.0, paths: Iterable[str] | None = None) -> None:
        """down | drop | hang | slow | error500 | garbage | busy | size_fallback, optionally only for some
        paths. size_fallback: /api/ps reports size == size_vram == the GGUF file size, Ollama's fallback
        when no llama-server buffer line was parsed (llama_server.go:2669-2675)."""
        if kind not in ("down", "drop", "hang", "slow", "error500", "garbage", "busy", "size_fallback"):
            raise ValueError(f"unknown fault {kind!r}")
        self.clear_fault()
        self._fault_released.clear()
        self._fault, self._fault_seconds = kind, float(seconds)
        self._fault_paths = tuple(paths) if paths else None
        if kind == "down" and self._started:
            self._unbind()

    def clear_fault(self) -> None:
        was_down = self._fault == "down"
        self._fault, self._fault_paths, self._fault_seconds = None, None, 0.0
        self._fault_released.set()
        if was_down and self._started and self._server is None:
            self._bind()

    @property
    def fault(self) -> str | None:
        return self._fault

    def restart(self, downtime: float = 0.0, gpu_found: bool = True) -> None:
        """Ollama restarts: connections refused for `downtime` s, then it serves with NOTHING loaded.

        SIGTERM kills every runner (routes.go:2023-2028 unloadAllRunners) and the new process starts with
        an empty map (sched.go:97); nothing reloads by itself. Loads in progress are lost. The GPU is
        discovered again (discover/runner.go:45,265): `gpu_found=False` = not found by this process, so
        every load lands on CPU until a later restart finds it. The default context follows the VRAM
        discovered now (routes.go:2043-2057). Load/unload counts are kept.
        """
        if self._started and self._fault != "down":
            self._unbind()
        with self._lock:
            self._runners.clear()
            self._epoch += 1
            self._changed.notify_all()
        if downtime > 0:
            self._stopping.wait(downtime)
        with self._lock:
            self._gpu_found = bool(gpu_found)
            self.default_num_ctx = default_num_ctx(self.discovered_vram_bytes)
        if self._started and self._fault != "down":
            self._bind()
        self._reaper_wake.set()

    # ----------------------------------------------------------------------------- introspection

    def counts(self, model: str) -> dict[str, int]:
        """{"loads": n, "unloads": n} for one model (canonical or short name); a reload is one of each."""
        name = self._lookup(model)
        name = name.name if name else canonical_name(model)
        with self._lock:
            return dict(self._counts.get(name, {"loads": 0, "unloads": 0}))

    def loaded(self) -> list[dict]:
        """The runners as the scheduler sees them (including ones that are still stopping)."""
        with self._lock:
            return [
                {
                    "name": r.spec.name,
                    "size": r.size,
                    "size_vram": r.size_vram,
                    "held_vram": r.held_vram,  # what the GPU really holds for it: + RUNNER_VRAM_OVERHEAD
                    "num_gpu": r.num_gpu,
                    "keep_alive": math.inf if r.keep_alive_ns == FOREVER_NS else r.keep_alive_ns / 1e9,
                    "expires_at": r.expires_at_ns / 1e9,
                    "context_length": r.num_ctx,
                    "stopping": r.stop_at is not None,
                    "in_flight": r.ref_count,
                    "computing": r.computing,
                    "waiting": r.waiting,
                }
                for r in self._runners.values()
            ]

    def _record(self, method: str, path: str, body: Any) -> None:
        with self._lock:
            self.request_log.append((method, path, body))
            excess = len(self.request_log) - self.request_log_max
            if excess > 0:
                del self.request_log[:excess]

    def _count(self, name: str, kind: str) -> None:
        self._counts.setdefault(name, {"loads": 0, "unloads": 0})[kind] += 1

    def _add_bytes(self, inbound: int = 0, outbound: int = 0) -> None:
        with self._conn_lock:
            self.bytes_in += inbound
            self.bytes_out += outbound

    # ----------------------------------------------------------------------------- catalogue

    @staticmethod
    def _resolve_installed(models: Iterable[str] | None) -> dict[str, ModelSpec]:
        if models is None:
            return {name: CATALOG[name] for name in DEFAULT_MODELS}
        installed = {}
        for model in models:
            name = canonical_name(model)
            if name not in CATALOG:
                raise ValueError(f"unknown model {model!r}; known: {', '.join(CATALOG)}")
            installed[name] = CATALOG[name]
        return installed

    def _lookup(self, model: str) -> ModelSpec | None:
        """Installed model by canonical or short name, case-insensitively (like Ollama's manifest lookup)."""
        wanted = canonical_name(model).lower()
        for name, spec in self.installed.items():
            if name.lower() == wanted:
                return spec
        return None

    # ----------------------------------------------------------------------------- preload

    def _apply_preload(self) -> None:
        """Preloads, each made by a real sequence of events (counted as neither loads nor unloads):

        auto       an automatic load (no options);
        gpu        an automatic load that must land fully on the GPU, else ValueError;
        forced-cpu a client loaded it with num_gpu 0;
        cpu        it fell back to RAM by automatic placement: loaded while another program held all the
                   VRAM, which then went back to `external_vram_gb`. On a GPU node Ollama's pre-flight
                   would evict one such model to load the next (sched.go:547), so only one is possible;
                   they load first, before the others.
        """
        placements = []
        for model, where in self.preload:
            spec = self._lookup(model)
            if spec is None:
                raise ValueError(f"preload: {model!r} is not installed")
            if where not in ("auto", "gpu", "cpu", "forced-cpu"):
                raise ValueError(f"preload placement must be auto|gpu|cpu|forced-cpu, not {where!r}")
            placements.append((spec, where))
        fell_back = [spec for spec, where in placements if where == "cpu"]
        if len(fell_back) > 1 and self._gpu_usable():
            names = ", ".join(spec.name for spec in fell_back)
            raise ValueError(
                f"preload: {names}: only one model can have fallen back to RAM automatically on a GPU node "
                "(loading the next one would evict it); use forced-cpu for the others"
            )
        for spec in fell_back:
            configured = self._external_vram_gb
            self._external_vram_gb = self._vram_gb if self._gpu_usable() else configured
            try:
                self._preload_one(spec, {})
            finally:
                self._external_vram_gb = configured
        for spec, where in placements:
            if where == "cpu":
                continue
            runner = self._preload_one(spec, {"num_gpu": 0} if where == "forced-cpu" else {})
            if where == "gpu" and not (runner.size_vram == runner.size > 0):
                with self._lock:
                    self._runners.pop(spec.name, None)
                size = runner.size / GiB
                raise ValueError(f"preload: {spec.name} ({size:.1f} GiB) does not fit on the GPU")

    def _preload_one(self, spec: ModelSpec, opts: dict) -> Runner:
        try:
            runner = self.schedule(spec, opts, None, count=False, load_delay=False)
        except ApiError as err:
            raise ValueError(f"preload: {spec.name}: {err.message}") from None
        self.release(runner)
        return runner

    # ----------------------------------------------------------------------------- scheduler

    def _resolve_ctx(self, spec: ModelSpec, opts: dict) -> int:
        """num_ctx: explicit, else the automatic one (VRAM-based default, or lowered by an OOM retry),
        clamped to the trained context."""
        return max(1, min(self._requested_ctx(opts), spec.context_length))

    def _requested_ctx(self, opts: dict) -> int:
        """opts.NumCtx before the clamp to the trained context (routes.go:132 defaultNumCtx)."""
        return opts.get("num_ctx") or opts.get("_auto_ctx") or self.default_num_ctx

    def _resolve_batch(self, spec: ModelSpec, opts: dict) -> int:
        """num_batch: explicit, else 512 for completion models; for embedding models min(2048, the
        REQUESTED num_ctx), unclamped (routes.go:151 WithDefaultEmbeddingNumBatch; llama_server.go:92-103)."""
        if opts.get("num_batch"):
            return opts["num_batch"]
        return min(2048, self._requested_ctx(opts)) if spec.embedding_only else 512

    def _needs_reload(self, runner: Runner, opts: dict) -> bool:
        """sched.go:1381-1432 needsReload over the api.Runner fields; sampling options never reload.

        A new num_gpu < 0 (or absent) equals anything; num_ctx counts as equal when both the loaded and the
        new value are automatic, num_batch too except for embedding models, whose batch is never automatic
        (routes.go:217) and is compared literally. MLX models skip the comparison entirely (:1425).
        """
        if runner.spec.mlx:
            return False
        new_gpu = opts.get("num_gpu", -1)
        gpu_differs = new_gpu >= 0 and new_gpu != runner.num_gpu
        ctx_auto = opts.get("num_ctx") is None and runner.num_ctx_explicit is None
        ctx_differs = not ctx_auto and self._resolve_ctx(runner.spec, opts) != runner.num_ctx
        if runner.spec.embedding_only:
            batch_differs = self._resolve_batch(runner.spec, opts) != runner.num_batch
        else:
            batch_auto = opts.get("num_batch") is None and runner.num_batch_explicit is None
            new_batch, old_batch = opts.get("num_batch") or 512, runner.num_batch_explicit or 512
            batch_differs = not batch_auto and new_batch != old_batch
        return (
            gpu_differs
            or ctx_differs
            or batch_differs
            or opts.get("main_gpu") != runner.main_gpu
            or opts.get("use_mmap") != runner.use_mmap
            or opts.get("num_thread", 0) != runner.num_thread
        )

    def _new_runner(
        self, spec: ModelSpec, opts: dict, keep_alive_ns: int | None, place: _Placement
    ) -> Runner:
        keep = self.keep_alive_default_ns if keep_alive_ns is None else keep_alive_ns
        return Runner(
            spec=spec,
            size=place.size,
            size_vram=place.size_vram,
            num_gpu=opts.get("num_gpu", -1) if opts.get("num_gpu", -1) >= 0 else -1,
            num_ctx=self._resolve_ctx(spec, opts),
            num_ctx_explicit=opts.get("num_ctx"),
            num_batch_explicit=opts.get("num_batch"),
            num_batch=self._resolve_batch(spec, opts),
            main_gpu=opts.get("main_gpu"),
            use_mmap=opts.get("use_mmap"),
            num_thread=opts.get("num_thread", 0),
            keep_alive_ns=keep,
            expires_at_ns=_expiry_ns(time.time_ns(), keep),
            held_vram=place.held_vram,
        )

    def _try_use(self, spec: ModelSpec, opts: dict, keep_alive_ns: int | None) -> Runner | None:
        """Fast path (getRunner, >= 0.11.5): a loaded runner needing no reload is used at once. Lock held."""
        runner = self._runners.get(spec.name)
        if runner is None or runner.stop_at is not None or self._needs_reload(runner, opts):
            return None
        if keep_alive_ns is not None:
            runner.keep_alive_ns = keep_alive_ns
        runner.ref_count += 1
        return runner

    def schedule(
        self,
        spec: ModelSpec,
        opts: dict,
        keep_alive_ns: int | None,
        count: bool = True,
        load_delay: bool = True,
    ) -> Runner:
        """Get a runner for this request (ref_count taken), loading/evicting like processPending.

        A loaded runner that needs no reload is used at once (getRunner fast path); anything else waits
        in the pending queue (503 when `max_queue` requests already wait) for the single load slot.
        The model's Modelfile options come first, then the request's (routes.go:141-146).
        """
        opts = {**dict(spec.options), **opts}
        with self._lock:
            runner = self._try_use(spec, opts, keep_alive_ns)
            if runner is not None:
                return runner
            if self._queued >= self.max_queue:
                raise ApiError(503, BUSY_TEXT)
            self._queued += 1
        try:
            self._load_mutex.acquire()
        finally:
            with self._lock:
                self._queued -= 1
        try:
            self.loading = spec.name
            return self._process_pending(spec, opts, keep_alive_ns, count, load_delay)
        finally:
            self.loading = None
            self._load_mutex.release()

    def _process_pending(
        self, spec: ModelSpec, opts: dict, keep_alive_ns: int | None, count: bool, load_delay: bool
    ) -> Runner:
        """The scheduler loop for one request, with the load slot held: reload, evict, place, load."""
        retried_after_oom = False
        while True:
            if self._stopping.is_set():
                raise ApiError(500, "server shutting down")
            with self._lock:
                runner = self._try_use(spec, opts, keep_alive_ns)
                if runner is not None:
                    return runner
                current = self._runners.get(spec.name)
                epoch = self._epoch
            if current is not None:  # needs a reload (or is stopping): the old instance goes first
                self._unload_and_wait([current])
                continue
            try:
                with self._lock:
                    place = self._plan(spec, opts)
            except _NeedsEviction:
                self._unload_and_wait(self._victims(spec.name, evict_all=False))
                continue
            except _Killed:
                raise ApiError(500, "llama-server process has terminated: signal: killed") from None
            except _OutOfMemory:
                retry_opts = None if retried_after_oom else self._opts_for_oom_retry(spec, opts)
                if retry_opts is None:
                    raise ApiError(500, self._oom_text(spec, opts)) from None
                retried_after_oom, opts = True, retry_opts
                self._unload_and_wait(self._victims(spec.name, evict_all=True))
                continue
            return self._load(spec, opts, keep_alive_ns, place, epoch, count, load_delay)

    def _opts_for_oom_retry(self, spec: ModelSpec, opts: dict) -> dict | None:
        """Ollama retries a load that ran out of memory once: with every other model evicted and, if the
        context was automatic, a smaller one (> 32768 -> 32768, > 4096 -> 4096). None = nothing to try."""
        with self._lock:
            others = any(r.spec.name != spec.name for r in self._runners.values())
        num_ctx = self._resolve_ctx(spec, opts)
        smaller = 32768 if num_ctx > 32768 else 4096 if num_ctx > 4096 else None
        if opts.get("num_ctx") is None and smaller is not None:
            return {**opts, "_auto_ctx": smaller}
        return dict(opts) if others else None

    @property
    def queued(self) -> int:
        """Requests waiting for the load slot (the pending queue Ollama caps at OLLAMA_MAX_QUEUE)."""
        with self._lock:
            return self._queued

    def _plan(self, spec: ModelSpec, opts: dict) -> _Placement:
        """Era C placement for a model not loaded yet (era A differences noted). Lock held.

        Raises _NeedsEviction (pre-flight: evict one victim), _OutOfMemory (the load itself would fail)
        or _Killed (a CPU load larger than RAM).
        """
        others = [r for r in self._runners.values() if r.spec.name != spec.name]
        max_loaded = self.max_loaded or 3  # 3 x max(#GPUs, 1); a GPU node has one GPU here
        if len([r for r in others if r.stop_at is None]) >= max_loaded:
            raise _NeedsEviction()
        num_ctx = self._resolve_ctx(spec, opts)
        batch = self._resolve_batch(spec, opts)
        size = spec.loaded_size(num_ctx, batch)
        num_gpu = opts.get("num_gpu", -1)
        gpu = self._gpu_usable() and num_gpu != 0  # sched.go:272-273: num_gpu 0 -> empty GPU list
        if spec.mlx:  # no pre-flight (sched.go:528); x/mlxrunner/client.go:485-488 reports size == size_vram
            return _Placement(size, size, size + RUNNER_VRAM_OVERHEAD if gpu else 0)
        if not gpu:
            # No GPU backend: no memory check (sched.go:547 needs GPUs), mmap off (sched.go:1162), so the
            # whole model is read into RAM; the kernel kills a llama-server larger than RAM
            if size > self.ram_bytes:
                raise _Killed()
            return _Placement(size, 0)
        per_layer = size / spec.layers
        real_free = self._real_free_vram(spec.name)
        sched_free = self._scheduler_free_vram(spec.name)
        predicted = spec.predicted_vram(num_ctx, batch)
        partial = 0 < num_gpu < spec.layers  # explicitPartialGPUOffload skips the pre-flight (sched.go:790)
        if others and not partial and predicted > FIT_FRACTION * sched_free:
            raise _NeedsEviction()  # sched.go:547-562: the 80% pre-flight, for forced and automatic loads
        if num_gpu > 0:
            if self._era_a and self._era_a_layers_fit(spec, size, real_free) == 0:
                return _Placement(size, 0)  # v0.12.10 llm/server.go:501-503: no layer fits -> CPU, silently
            size_vram = int(num_gpu * per_layer) if partial else size  # -ngl N: --fit leaves it alone
            if size_vram + RUNNER_VRAM_OVERHEAD > real_free:
                raise _OutOfMemory()
            return _Placement(size, size_vram, size_vram + RUNNER_VRAM_OVERHEAD)
        # automatic: llama.cpp --fit places what fits against real free memory, keeping FIT_TARGET free
        layers = min(spec.layers, int(max(0, real_free - RUNNER_VRAM_OVERHEAD - FIT_TARGET) // per_layer))
        size_vram = size if layers == spec.layers else int(layers * per_layer)
        return _Placement(size, size_vram, size_vram + RUNNER_VRAM_OVERHEAD if size_vram else 0)

    @staticmethod
    def _era_a_layers_fit(spec: ModelSpec, size: int, free: int) -> int:
        """v0.12.10 llm/memory.go EstimateGPULayers: a GPU takes layers only if it can hold the graph, the
        minimum memory and two layers (:285); then the estimate counts what fits (:323-340)."""
        per_layer = size / spec.layers
        graph = min(256 * MiB, spec.file_size // 2)
        room = free - graph - ERA_A_MINIMUM_MEMORY
        if room < 2 * per_layer:
            return 0
        return min(spec.layers, int(room // per_layer))

    def _oom_text(self, spec: ModelSpec, opts: dict) -> str:
        num_ctx = self._resolve_ctx(spec, opts)
        size = spec.loaded_size(num_ctx, self._resolve_batch(spec, opts))
        return (
            "llama-server process has terminated: error: ggml_backend_cuda_buffer_type_alloc_buffer: "
            f"allocating {size / MiB:.2f} MiB on device 0: cudaMalloc failed: out of memory"
        )

    def _victims(self, exclude: str, evict_all: bool) -> list[Runner]:
        """findRunnerToUnload: ByDurationAndName (keep_alive ascending, then blob), the first idle one."""
        with self._lock:
            candidates = sorted(
                (r for r in self._runners.values() if r.spec.name != exclude),
                key=lambda r: (r.keep_alive_ns, r.spec.blob),
            )
        if evict_all or not candidates:
            return candidates
        idle = [r for r in candidates if r.ref_count == 0]
        return [(idle or candidates)[0]]

    def _unload_and_wait(self, runners: list[Runner]) -> None:
        """Expire runners and wait until they are gone (in-flight requests finish first)."""
        with self._lock:
            for runner in runners:
                self._expire_locked(runner)
        self._reaper_wake.set()
        with self._changed:
            while any(self._runners.get(r.spec.name) is r for r in runners):
                if self._stopping.is_set():
                    raise ApiError(500, "server shutting down")
                self._changed.wait(timeout=0.1)

    def _expire_locked(self, runner: Runner) -> None:
        """expireRunner: expires_at = now; the process is closed unload_seconds later (async)."""
        if runner.stop_at is None:
            runner.stop_at = time.monotonic() + self.unload_seconds
            runner.expires_at_ns = time.time_ns()

    def _load(
        self,
        spec: ModelSpec,
        opts: dict,
        keep_alive_ns: int | None,
        place: _Placement,
        epoch: int,
        count: bool,
        load_delay: bool,
    ) -> Runner:
        """Start the runner: wait the load time (lock released), then list it (era C: only once healthy)."""
        if load_delay:
            self._wait_load_time(place.size)
        runner = self._new_runner(spec, opts, keep_alive_ns, place)
        runner.ref_count = 1
        with self._lock:
            if epoch != self._epoch:
                raise ApiError(500, "llama-server process has terminated: signal: killed")
            self._runners[spec.name] = runner
            if count:
                self._count(spec.name, "loads")
            self._changed.notify_all()
        return runner

    def _wait_load_time(self, size: int) -> None:
        """Sleep load_seconds_per_gb x size without the lock; re-read when the setting changes, so a test
        or the demo can hold a load in progress and then let it finish."""
        started = time.monotonic()
        with self._changed:
            while (remaining := started + self.load_seconds_per_gb * size / GiB - time.monotonic()) > 0:
                if self._stopping.is_set():
                    raise ApiError(500, "server shutting down")
                self._changed.wait(timeout=remaining)

    @property
    def load_seconds_per_gb(self) -> float:
        return self._load_seconds_per_gb

    @load_seconds_per_gb.setter
    def load_seconds_per_gb(self, value: float) -> None:
        """Takes effect at once, also for a load in progress."""
        with self._changed:
            self._load_seconds_per_gb = value
            self._changed.notify_all()

    def release(self, runner: Runner) -> None:
        """A request finished: the keep_alive timer starts now (keep_alive 0 -> unload when idle)."""
        with self._lock:
            runner.ref_count = max(0, runner.ref_count - 1)
            if runner.ref_count == 0 and runner.stop_at is None:
                runner.expires_at_ns = _expiry_ns(time.time_ns(), runner.keep_alive_ns)
        self._reaper_wake.set()

    def unload(self, spec: ModelSpec) -> None:
        """The keep_alive 0 request: expire the runner if loaded; removal is asynchronous."""
        with self._lock:
            runner = self._runners.get(spec.name)
            if runner is not None:
                self._expire_locked(runner)
        self._reaper_wake.set()

    def _reap_loop(self) -> None:
        """Background timer: expire idle runners past expires_at, remove stopping runners when due."""
        while not self._stopping.is_set():
            self._reaper_wake.clear()
            next_wake = self._reap_once()
            self._reaper_wake.wait(timeout=max(0.001, min(next_wake, REAPER_MAX_WAIT)))

    def _reap_once(self) -> float:
        now_ns, now_mono = time.time_ns(), time.monotonic()
        next_wake = REAPER_MAX_WAIT
        with self._lock:
            for name, runner in list(self._runners.items()):
                if runner.stop_at is None and runner.ref_count == 0 and runner.expires_at_ns <= now_ns:
                    self._expire_locked(runner)
                if runner.stop_at is None:
                    if runner.ref_count == 0:
                        next_wake = min(next_wake, (runner.expires_at_ns - now_ns) / 1e9)
                elif runner.ref_count == 0 and now_mono >= runner.stop_at + self.ps_stall_seconds:
                    del self._runners[name]  # with ps_stall_seconds: after the VRAM-recovery wait
                    self._count(name, "unloads")
                    self._changed.notify_all()
                else:
                    due = runner.stop_at + self.ps_stall_seconds - now_mono
                    next_wake = min(next_wake, max(0.001, due))
        return next_wake

    # ----------------------------------------------------------------------------- replies (JSON bodies)

    def ps_body(self) -> dict:
        """/api/ps: canonical names, sorted by expires_at descending at 1-second resolution (stable).

        With ps_stall_seconds > 0 it waits while a runner unloads: processCompleted holds the runner's
        refMu through the unload and the VRAM-recovery wait (sched.go:416-463) and loadedModels takes
        every refMu (sched.go:1757); the reply then no longer lists that runner.
        """
        with self._changed:
            while self.ps_stall_seconds > 0 and not self._stopping.is_set() and self._unloading_locked():
                self._changed.wait(timeout=0.05)
            runners = sorted(self._runners.values(), key=lambda r: r.expires_at_ns // 10**9, reverse=True)
            fallback = self._fault == "size_fallback"
            return {"models": [self._ps_entry(r, fallback) for r in runners]}

    def _unloading_locked(self) -> bool:
        return any(r.stop_at is not None and r.ref_count == 0 for r in self._runners.values())

    @staticmethod
    def _ps_entry(runner: Runner, fallback: bool = False) -> dict:
        """fallback: no buffer line was parsed, both figures are the file size (llama_server.go:2669-2675)."""
        spec = runner.spec
        size, size_vram = (spec.file_size, spec.file_size) if fallback else (runner.size, runner.size_vram)
        return {
            "name": spec.name,
            "model": spec.name,
            "size": size,
            "digest": spec.digest,
            "details": _details(spec),
            "expires_at": _rfc3339(runner.expires_at_ns, utc=False),
            "size_vram": size_vram,
            "context_length": runner.num_ctx,
        }

    def tags_body(self) -> dict:
        specs = sorted(self.installed.values(), key=lambda s: s.modified_at, reverse=True)
        models = []
        for spec in specs:
            details = _details(spec)
            details["context_length"] = spec.context_length
            details["embedding_length"] = spec.embedding_length
            models.append(
                {
                    "name": spec.name,
                    "model": spec.name,
                    "modified_at": spec.modified_at,
                    "size": spec.file_size,
                    "digest": spec.digest,
                    "details": details,
                    "capabilities": list(spec.capabilities),
                }
            )
        return {"models": models}


def _details(spec: ModelSpec) -> dict:
    return {
        "parent_model": "",
        "format": spec.format,
        "family": spec.family,
        "families": [spec.family],
        "parameter_size": spec.parameter_size,
        "quantization_level": spec.quantization_level,
    }


def show_body(spec: ModelSpec, verbose: bool) -> dict:
    """/api/show: modelfile, details, GGUF model_info with <arch>.* sizing keys, tensors, capabilities."""
    arch = spec.family.replace("-", "_") if spec.family != "nomic-bert" else "nomic-bert"
    tokens: list = [f"<tok{i}>" for i in range(8)] if verbose else []
    info = {
        "general.architecture": arch,
        "general.file_type": {"F16": 1, "Q4_0": 2, "Q4_K_M": 15}.get(spec.quantization_level, 0),
        "general.parameter_count": spec.parameter_count,
        "general.quantization_version": 2,
        f"{arch}.block_count": spec.block_count,
        f"{arch}.context_length": spec.context_length,
        f"{arch}.embedding_length": spec.embedding_length,
        f"{arch}.attention.head_count": spec.head_count,
        f"{arch}.attention.head_count_kv": spec.head_count_kv,
        f"{arch}.feed_forward_length": spec.embedding_length * 4,
        "tokenizer.ggml.model": "gpt2" if not spec.embedding_only else "bert",
        "tokenizer.ggml.tokens": tokens,
    }
    params = list(spec.options)
    if not spec.embedding_only and not spec.mlx:
        params.append(("stop", "<|eot_id|>"))
    # routes.go:1497-1509: fmt.Sprintf("%-*s %#v", 30, k, v), joined by "\n" (Go's map order varies)
    parameters = "\n".join(f"{key:<30} {_go_value(value)}" for key, value in params)
    lines = "".join(f"PARAMETER {key} {value}\n" for key, value in params)  # images.go:586 String()
    if spec.mlx:  # routes.go:1522-1526: an MLX model's Modelfile names the model itself
        modelfile = f'# Modelfile generated by "ollama show"\nFROM {spec.name}\n{lines}'
    else:
        modelfile = (
            '# Modelfile generated by "ollama show"\n'
            "# To build a new Modelfile based on this, replace FROM with:\n"
            f"# FROM {spec.name}\n\nFROM /root/.ollama/models/blobs/sha256-{spec.blob}\n{lines}"
        )
    return {
        "license": "",
        "modelfile": modelfile,
        "parameters": parameters,
        "template": "{{ .Prompt }}" if not spec.embedding_only else "",
        "details": _details(spec),
        "model_info": info,
        "tensors": [
            {
                "name": "token_embd.weight",
                "type": spec.quantization_level,
                "shape": [spec.embedding_length, 32000],
            }
        ],
        "capabilities": list(spec.capabilities),
        "modified_at": spec.modified_at,
    }


def _go_value(value: Any) -> str:
    """Go's %#v for the option values a Modelfile stores: numbers bare, strings quoted."""
    if isinstance(value, str):
        return _go_quote(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


# --------------------------------------------------------------------------------------------- fake inference

_TEXT = (
    "the sky is blue because air molecules scatter short wavelengths of sunlight more than long ones "
    "so blue light reaches your eyes from every direction while red and yellow pass straight through"
)
_WORDS = _TEXT.split(" ")


def fake_tokens(model: str, prompt: str, limit: int | None) -> tuple[list[str], str]:
    """Deterministic text for (model, prompt): (pieces, done_reason)."""
    rng = random.Random(hashlib.sha256(f"{model}\0{prompt}".encode()).digest())
    words = [rng.choice(_WORDS) + " " for _ in range(rng.randint(8, 24))]
    if limit is not None and 0 <= limit < len(words):
        return words[:limit], "length"
    return words, "stop"


def fake_embedding(model: str, text: str, dims: int, normalise: bool) -> list[float]:
    rng = random.Random(hashlib.sha256(f"{model}\0{text}".encode()).digest())
    vector = [rng.gauss(0.0, 1.0) for _ in range(dims)]
    if normalise:
        norm = math.sqrt(sum(v * v for v in vector)) or 1.0
        vector = [v / norm for v in vector]
    return vector


def _tokens_per_second(runner: Runner) -> float:
    """Plausible eval rates: GPU ~ 100 tok/s for 8B, CPU ~ 8x slower, a split in between."""
    gpu_rate = 100.0 * 4.9e9 / max(runner.spec.file_size, 1)
    share = runner.size_vram / runner.size if runner.size else 0.0
    cpu_rate = gpu_rate / 8
    return 1.0 / (share / gpu_rate + (1 - share) / cpu_rate)


# --------------------------------------------------------------------------------------------- HTTP


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False  # stop() must never wait on a hung handler
    allow_reuse_address = True
    node: SimNode

    def accept_loop(self) -> None:
        """Block in accept() instead of serve_forever's polling: no idle CPU, and close_listener() wakes it
        at once (shutdown() on a listening socket makes a blocked accept() fail on Linux)."""
        while True:
            try:
                request, client_address = self.socket.accept()
            except OSError:
                return
            self.process_request(request, client_address)  # ThreadingMixIn: one daemon thread each

    def close_listener(self) -> None:
        with contextlib.suppress(OSError):
            self.socket.shutdown(socket.SHUT_RDWR)
        self.server_close()

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Quiet for sockets closed under a handler (stop, down, client gone); loud for real bugs."""
        if not isinstance(sys.exc_info()[1], OSError):
            super().handle_error(request, client_address)


class _CountingReader:
    """Counts request bytes (request line, headers, body) as the handler reads them."""

    def __init__(self, raw: Any, node: SimNode) -> None:
        self._raw, self._node = raw, node

    def readline(self, *args: Any) -> bytes:
        data = self._raw.readline(*args)
        self._node._add_bytes(inbound=len(data))
        return data

    def read(self, *args: Any) -> bytes:
        data = self._raw.read(*args)
        self._node._add_bytes(inbound=len(data))
        return data

    def __getattr__(self, name: str) -> Any:
        return getattr(self._raw, name)


class _CountingWriter:
    def __init__(self, raw: Any, node: SimNode) -> None:
        self._raw, self._node = raw, node

    def write(self, data: bytes) -> int:
        self._node._add_bytes(outbound=len(data))
        return self._raw.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._raw, name)


_ROUTES: dict[str, tuple[str, ...]] = {
    "/": ("GET", "HEAD"),
    "/api/version": ("GET", "HEAD"),
    "/api/tags": ("GET", "HEAD"),
    "/api/ps": ("GET",),
    "/api/status": ("GET",),
    "/api/show": ("POST",),
    "/api/generate": ("POST",),
    "/api/chat": ("POST",),
    "/api/embed": ("POST",),
    "/api/embeddings": ("POST",),
}


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # Go sets TCP_NODELAY; without it kept-alive replies stall ~40 ms
    server: _Server

    # ------------------------------------------------------------------ plumbing

    @property
    def node(self) -> SimNode:
        return self.server.node

    def setup(self) -> None:
        super().setup()
        self.rfile = _CountingReader(self.rfile, self.node)
        self.wfile = _CountingWriter(self.wfile, self.node)
        with self.node._conn_lock:
            self.node._connections.add(self.connection)

    def finish(self) -> None:
        with self.node._conn_lock:
            self.node._connections.discard(self.connection)
        with contextlib.suppress(OSError):
            super().finish()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet, like a daemon
        pass

    def send_response(self, code: int, message: str | None = None) -> None:
        """Like Go: a Date header, no Server header."""
        self.send_response_only(code, message)
        self.send_header("Date", self.date_time_string())

    def do_GET(self) -> None:
        self._dispatch()

    do_HEAD = do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_GET

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().strip().split(b";")[0] or b"0", 16)
                if size == 0:
                    self.rfile.readline()
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _send_json(self, status: int, obj: Any) -> None:
        self._send(status, json.dumps(obj, separators=(",", ":")).encode(), "application/json; charset=utf-8")

    def _send_error(self, err: ApiError) -> None:
        self._send_json(err.status, {"error": err.message})

    def _stream(self, objects: Iterator[dict]) -> None:
        """NDJSON with chunked transfer encoding, like Go's streamed replies."""
        self.send_response(200)
        self.send_header("Content-Type", "application/x-ndjson")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for obj in objects:
            line = json.dumps(obj, separators=(",", ":")).encode() + b"\n"
            self.wfile.write(f"{len(line):x}\r\n".encode() + line + b"\r\n")
        self.wfile.write(b"0\r\n\r\n")

    def _compute(self, runner: Runner, duration_ns: int) -> None:
        """The runner works on this request: one request at a time per runner (OLLAMA_NUM_PARALLEL=1),
        for its simulated duration times inference_time_scale (0 = instant)."""
        seconds = self.node.inference_time_scale * duration_ns / 1e9
        if seconds > 0:
            self._count_compute(runner, waiting=+1)
            with runner.slots:
                self._count_compute(runner, waiting=-1, computing=+1)
                try:
                    self._pause(seconds)
                finally:
                    self._count_compute(runner, computing=-1)
            if self.node._stopping.is_set():
                raise ApiError(500, "server shutting down")

    def _count_compute(self, runner: Runner, waiting: int = 0, computing: int = 0) -> None:
        with self.node._lock:
            runner.waiting += waiting
            runner.computing += computing

    def _pause(self, seconds: float) -> None:
        if seconds > 0:
            self.node._stopping.wait(seconds)

    # ------------------------------------------------------------------ dispatch

    def _dispatch(self) -> None:
        node = self.node
        path = self.path.split("?", 1)[0]
        body = self._read_body()
        try:
            logged = json.loads(body) if body else None
        except ValueError:
            logged = None
        node._record(self.command, path, logged)
        if node._server is None or node._stopping.is_set():  # down: drop what is still connected
            self.close_connection = True
            return
        if self._apply_fault(path):
            return
        self._pause(node.latency_ms / 1000)
        allowed = _ROUTES.get(path)
        if allowed is None:
            self._send(404, b"404 page not found", "text/plain")
            return
        if self.command not in allowed:
            self._send(405, b"405 method not allowed", "text/plain")
            return
        try:
            try:
                self._route(path, body)
            except ApiError as err:
                self._send_error(err)
        except OSError:  # the client went away, or stop()/down closed the socket under us
            self.close_connection = True

    def _apply_fault(self, path: str) -> bool:
        """Apply the current fault; True when the request was answered (or dropped) by it."""
        node = self.node
        kind, paths = node._fault, node._fault_paths
        if kind is None or kind == "size_fallback" or (paths is not None and path not in paths):
            return False
        if kind in ("down", "drop"):
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            return True
        if kind == "hang":  # released by clear_fault() (then answered normally) or stop()
            node._fault_released.wait()
            if node._stopping.is_set():
                self.close_connection = True
                return True
            return False
        if kind == "slow":
            self._pause(node._fault_seconds)
            return False
        if kind == "error500":
            self._send_json(500, {"error": "llama-server process has terminated: exit status 2 (simulated)"})
        elif kind == "garbage":
            self._send(200, b'{"models":[{"name":"llama3.1:lat<html>', "application/json; charset=utf-8")
        elif kind == "busy":
            self._send_json(503, {"error": BUSY_TEXT})
        return True

    def _route(self, path: str, body: bytes) -> None:
        node = self.node
        if path == "/":
            self._send(200, b"Ollama is running", "text/plain; charset=utf-8")
        elif path == "/api/version":
            self._send_json(200, {"version": node.version})
        elif path == "/api/status":
            self._send_json(200, {"cloud": {"disabled": False, "source": "default"}})
        elif path == "/api/tags":
            self._send_json(200, node.tags_body())
        elif path == "/api/ps":
            self._send_json(200, node.ps_body())
        elif path == "/api/show":
            self._show(decode_request(body, "ShowRequest"))
        elif path == "/api/generate":
            self._generate(decode_request(body, "GenerateRequest"))
        elif path == "/api/chat":
            self._chat(decode_request(body, "ChatRequest"))
        elif path == "/api/embed":
            self._embed(decode_request(body, "EmbedRequest"))
        elif path == "/api/embeddings":
            self._embeddings(decode_request(body, "EmbeddingRequest"))

    # ------------------------------------------------------------------ endpoints

    def _show(self, req: dict) -> None:
        model = req.get("model") or req.get("name") or ""
        if not model:
            raise ApiError(400, "model is required")
        not_found = ApiError(404, f"model '{canonical_name(model)}' not found")
        spec = self._resolve(model, ApiError(400, "invalid model name"), not_found)
        self._send_json(200, show_body(spec, bool(req.get("verbose"))))

    def _resolve(self, model: str, invalid: ApiError, not_found: ApiError) -> ModelSpec:
        """Name checks differ per handler (routes.go): each passes its own status and text."""
        if not model or not _NAME_RE.match(model):
            raise invalid
        spec = self.node._lookup(model)
        if spec is None:
            raise not_found
        return spec

    @contextlib.contextmanager
    def _runner(self, spec: ModelSpec, opts: dict, keep_alive_ns: int | None) -> Iterator[Runner]:
        """scheduleRunner for the length of a request; keep_alive 0 unloads once the runner is idle."""
        runner = self.node.schedule(spec, opts, keep_alive_ns)
        try:
            yield runner
        finally:
            self.node.release(runner)
            if keep_alive_ns == 0:
                self.node.unload(spec)

    def _generate(self, req: dict) -> None:
        model = req.get("model") or ""
        not_found = ApiError(404, f"model '{model}' not found")  # also for an invalid name, as Ollama does
        spec = self._resolve(model, not_found, not_found)
        keep_alive_ns = req["_keep_alive_ns"]
        prompt = req.get("prompt") or ""
        if prompt == "" and keep_alive_ns == 0:
            self.node.unload(spec)
            self._send_json(200, self._final(model, "unload", response=""))
            return
        self._check_capability(spec, model, "generate", req)
        opts = parse_options(req.get("options"))
        with self._runner(spec, opts, keep_alive_ns) as runner:
            if prompt == "":
                self._send_json(200, self._final(model, "load", response=""))
                return
            pieces, reason = fake_tokens(spec.name, prompt, opts.get("num_predict"))
            context = [int(b) for b in hashlib.sha256(prompt.encode()).digest()[:16]]
            metrics = {"context": context, **self._metrics(runner, prompt, len(pieces))}
            self._reply(req, model, runner, pieces, _as_response, reason, metrics)

    def _chat(self, req: dict) -> None:
        model = req.get("model") or ""
        keep_alive_ns = req["_keep_alive_ns"]
        messages = req.get("messages") or []
        empty_message = {"role": "assistant", "content": ""}
        if not messages and keep_alive_ns == 0:  # the unload branch runs before the name checks
            not_found = ApiError(404, f"model '{model}' not found")
            self.node.unload(self._resolve(model, not_found, not_found))
            self._send_json(200, self._final(model, "unload", message=empty_message))
            return
        spec = self._resolve(
            model, ApiError(400, "model is required"), ApiError(404, f"model '{model}' not found")
        )
        self._check_capability(spec, model, "chat", req)
        opts = parse_options(req.get("options"))
        with self._runner(spec, opts, keep_alive_ns) as runner:
            if not messages:
                self._send_json(200, self._final(model, "load", message=empty_message))
                return
            last = messages[-1].get("content", "") if isinstance(messages[-1], dict) else ""
            pieces, reason = fake_tokens(spec.name, str(last), opts.get("num_predict"))
            metrics = self._metrics(runner, str(last), len(pieces))
            self._reply(req, model, runner, pieces, _as_message, reason, metrics)

    @staticmethod
    def _check_capability(spec: ModelSpec, model: str, what: str, req: dict) -> None:
        if spec.embedding_only:
            raise ApiError(400, f"{_go_quote(model)} does not support {what}")
        if req.get("think") and "thinking" not in spec.capabilities:
            raise ApiError(400, f"{_go_quote(model)} does not support thinking")

    @staticmethod
    def _final(model: str, reason: str, **payload: Any) -> dict:
        return {"model": model, "created_at": _created_at(), **payload, "done": True, "done_reason": reason}

    @staticmethod
    def _metrics(runner: Runner, prompt: str, eval_count: int) -> dict:
        rate = _tokens_per_second(runner)
        prompt_count = max(1, len(prompt.split()))
        prompt_ns = int(prompt_count / (rate * 10) * 1e9)
        eval_ns = int(eval_count / rate * 1e9)
        return {
            "total_duration": prompt_ns + eval_ns + 250_000,
            "load_duration": 250_000,
            "prompt_eval_count": prompt_count,
            "prompt_eval_duration": prompt_ns,
            "eval_count": eval_count,
            "eval_duration": eval_ns,
        }

    def _reply(
        self,
        req: dict,
        model: str,
        runner: Runner,
        pieces: list[str],
        content: Callable[[str], dict],
        reason: str,
        metrics: dict,
    ) -> None:
        """Streamed NDJSON (default) or one object (stream:false), fields in Go's order; with
        inference_time_scale > 0 the reply first takes its simulated eval time."""
        self._compute(runner, metrics["total_duration"])

        def chunk(text: str, done: bool) -> dict:
            body = {"model": model, "created_at": _created_at(), **content(text), "done": done}
            return {**body, "done_reason": reason, **metrics} if done else body

        def stream() -> Iterator[dict]:
            yield from (chunk(piece, False) for piece in pieces)
            yield chunk("", True)

        if req.get("stream", True):
            self._stream(stream())
        else:
            self._send_json(200, chunk("".join(pieces), True))

    @staticmethod
    def _embed_inputs(req: dict) -> list[str]:
        """EmbedHandler checks the input before the model: a string or a list of strings."""
        raw = req.get("input")
        if raw is None or raw == "":
            return []
        if isinstance(raw, str):
            return [raw]
        if isinstance(raw, list) and all(isinstance(x, str) for x in raw):
            return list(raw)
        raise ApiError(400, "invalid input type")

    def _embed(self, req: dict) -> None:
        inputs = self._embed_inputs(req)
        model = req.get("model") or ""
        if not model:
            raise ApiError(404, "model '' not found")
        not_found = ApiError(404, f"model {_go_quote(model)} not found, try pulling it first")
        spec = self._resolve(model, not_found, not_found)
        opts = parse_options(req.get("options"))
        with self._runner(spec, opts, req["_keep_alive_ns"]) as runner:
            if not inputs:
                self._send_json(200, {"model": model, "embeddings": []})
                return
            if req.get("truncate") is False and any(len(text.split()) > runner.num_ctx for text in inputs):
                raise ApiError(400, "the input length exceeds the context length")  # one word = one token
            dims = req.get("dimensions") or 0
            dims = (
                dims if isinstance(dims, int) and 0 < dims < spec.embedding_length else spec.embedding_length
            )
            vectors = [fake_embedding(spec.name, text, dims, True) for text in inputs]
            count = sum(max(1, len(text.split())) for text in inputs)
            reply = {"model": model, "embeddings": vectors, "total_duration": 1_000_000 + count * 50_000}
            self._compute(runner, reply["total_duration"])
            self._send_json(200, {**reply, "load_duration": 250_000, "prompt_eval_count": count})

    def _embeddings(self, req: dict) -> None:
        model = req.get("model") or ""
        spec = self._resolve(
            model,
            ApiError(400, "model is required"),
            ApiError(404, f"model {_go_quote(model)} not found, try pulling it first"),
        )
        opts = parse_options(req.get("options"))
        with self._runner(spec, opts, req["_keep_alive_ns"]):
            prompt = req.get("prompt") or ""
            vector = fake_embedding(spec.name, prompt, spec.embedding_length, False) if prompt else []
            self._send_json(200, {"embedding": vector})


def _as_response(text: str) -> dict:
    return {"response": text}


def _as_message(text: str) -> dict:
    return {"message": {"role": "assistant", "content": text}}


# --------------------------------------------------------------------------------------------- cluster


class SimCluster:
    """Several SimNodes on ephemeral ports, for tests, benchmarks and the demo."""

    def __init__(self, configs: Iterable[dict]) -> None:
        self.nodes = [SimNode(**config) for config in configs]

    def start(self) -> SimCluster:
        for node in self.nodes:
            node.start()
        return self

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    @property
    def urls(self) -> list[str]:
        return [node.url for node in self.nodes]

    def __enter__(self) -> SimCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --------------------------------------------------------------------------------------------- CLI


def _parse_preload(text: str) -> tuple[str, str]:
    name, _, where = text.partition("@")
    return name, where or "auto"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="A simulated Ollama node on 127.0.0.1.")
    parser.add_argument("--port", type=int, default=11434, help="0 = ephemeral")
    parser.add_argument("--vram-gb", type=float, default=24.0, help="GPU memory in GiB, 0 = CPU-only node")
    parser.add_argument("--ram-gb", type=float, default=64.0)
    parser.add_argument(
        "--models", nargs="*", default=None, help="installed models (default: the 7 base models)"
    )
    parser.add_argument("--preload", action="append", default=[], type=_parse_preload,
                        metavar="NAME@auto|gpu|cpu|forced-cpu")  # fmt: skip
    parser.add_argument("--load-seconds-per-gb", type=float, default=0.0)
    parser.add_argument("--unload-seconds", type=float, default=0.05)
    parser.add_argument("--latency-ms", type=float, default=0.0)
    parser.add_argument("--max-loaded", type=int, default=0, help="OLLAMA_MAX_LOADED_MODELS (0 = automatic)")
    parser.add_argument("--max-queue", type=int, default=512, help="OLLAMA_MAX_QUEUE (503 beyond)")
    parser.add_argument("--keep-alive", default="5m", help="OLLAMA_KEEP_ALIVE")
    parser.add_argument("--inference-time-scale", type=float, default=0.0, help="1 = simulated token rates")
    parser.add_argument("--gpu-missing", action="store_true", help="GPU not discovered by this process")
    parser.add_argument("--external-vram-gb", type=float, default=0.0, help="VRAM held by other programs")
    parser.add_argument("--ps-stall-seconds", type=float, default=0.0, help="/api/ps waits during unloads")
    parser.add_argument("--version", default=VERSION, help="Ollama version to report (<= 0.12.10: era A)")
    args = parser.parse_args(argv)
    node = SimNode(
        vram_gb=args.vram_gb,
        ram_gb=args.ram_gb,
        models=args.models,
        preload=args.preload,
        load_seconds_per_gb=args.load_seconds_per_gb,
        unload_seconds=args.unload_seconds,
        latency_ms=args.latency_ms,
        max_loaded=args.max_loaded,
        max_queue=args.max_queue,
        keep_alive_default=args.keep_alive,
        port=args.port,
        inference_time_scale=args.inference_time_scale,
        gpu_found=not args.gpu_missing,
        external_vram_gb=args.external_vram_gb,
        ps_stall_seconds=args.ps_stall_seconds,
        version=args.version,
    )
    try:
        node.start()
    except (OSError, ValueError) as err:
        print(f"ollama_sim: {err}", file=sys.stderr)
        return 1
    print(node.url, flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        node.stop()
    return 0
