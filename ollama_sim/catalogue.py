"""The model catalogue and what a model costs in memory; no state, no threads, no I/O.

Owns: ModelSpec (one installed model: what /api/tags and /api/show report, and its memory arithmetic:
f16 KV cache, loaded size, the scheduler's predicted VRAM), CATALOG / DEFAULT_MODELS / VARIANTS, Ollama's
short-name rule (canonical_name) and the VRAM-based default context (default_num_ctx).

"GB" in this package means GiB (2**30 bytes), as nvidia-smi and Ollama's logs count.

Reading order: ModelSpec -> the catalogue rows -> VARIANTS -> canonical_name, default_num_ctx.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from typing import Any

GiB = 1024**3
MiB = 1024**2
# CUDA context + cuBLAS/library workspaces of one llama-server process on the GPU: real, but in no "buffer
# size" log line, so never in /api/ps size_vram (only the driver's free figure shows it)
RUNNER_VRAM_OVERHEAD = int(0.4 * GiB)


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
