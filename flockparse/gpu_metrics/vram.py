"""An exporter's figures next to Ollama's models: the report's VRAM keys, and VRAM held by other programs.

Pure functions (and one small tracker of which conditions are in force): Ollama's models come as the
status rows the core already keeps (`vram_mb` is `size_vram`, `size_mb` is `size`, both MiB).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from flockparse.events import Event
from flockparse.gpu_metrics.scraper import GpuMemory
from flockparse.rules import canonical_name, is_off_gpu, matches_priority, model_key


def ollama_vram_mb(models: Iterable[dict]) -> float:
    """What Ollama says its models hold in VRAM: the sum of `size_vram`."""
    return sum(float(m.get("vram_mb") or 0) for m in models)


def other_vram_mb(memory: GpuMemory, models: Iterable[dict]) -> float | None:
    """VRAM held by programs other than Ollama's listed models: used minus their `size_vram`, never below 0.

    It includes each runner's CUDA context, which Ollama does not count in `size_vram`.
    """
    used = memory.used_mb
    return None if used is None else max(0.0, used - ollama_vram_mb(models))


def vram_fields(memory: GpuMemory, models: list[dict]) -> dict[str, Any]:
    """The report's keys for one node with an exporter (None where the exporter never answered)."""
    other = other_vram_mb(memory, models)
    gpus = [gpu.as_dict() for gpu in memory.gpus]
    for gpu in gpus:  # Ollama does not say which GPU holds which model: known for a single GPU only
        gpu["other_mb"] = _rounded(other) if len(gpus) == 1 else None
    return {
        "vram_total_mb": _rounded(memory.total_mb),
        "vram_used_mb": _rounded(memory.used_mb),
        "vram_free_mb": _rounded(memory.free_mb),
        "vram_other_mb": _rounded(other),
        "vram_reserved_mb": _rounded(memory.reserved_mb),
        "vram_ollama_mb": _rounded(ollama_vram_mb(models)),
        "vram_stale": memory.stale,
        "vram_error": memory.error,
        "vram_scraped_at": memory.scraped_at,
        "vram_exporter": memory.exporter,
        "vram_format": memory.format_name,
        "gpus": gpus,
    }


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


@dataclass(frozen=True)
class HeldOff:
    """A priority model kept off the GPU by VRAM other programs hold (MiB figures at the time seen)."""

    model: str  # the model's canonical name
    need_mb: float  # VRAM it still needs to be all on the GPU
    room_mb: float  # free VRAM plus what Ollama's other models hold (what evicting them all would give)
    other_mb: float  # VRAM held by other programs


def kept_off_by_others(
    models: list[dict],
    memory: GpuMemory,
    patterns: list[str],
    skip: Callable[[str], bool] = lambda key: False,
) -> list[HeldOff]:
    """Priority models on CPU or split that would fit on the GPU if other programs let go of their VRAM,
    and would not even if Ollama evicted every other model. `skip(name)`: models left where they are on
    purpose (pinned to CPU), by canonical name. Fresh figures only: stale ones say nothing about now."""
    if not memory.known or memory.stale or memory.free_mb is None:
        return []
    other = other_vram_mb(memory, models) or 0.0
    ollama = ollama_vram_mb(models)
    held = []
    for model in models:
        name = canonical_name(str(model.get("name", "")))
        if not is_off_gpu(model) or not matches_priority(name, patterns) or skip(name):
            continue
        vram = float(model.get("vram_mb") or 0)
        need = float(model.get("size_mb") or 0) - vram
        room = memory.free_mb + (ollama - vram)
        if room < need <= room + other:
            held.append(HeldOff(name, round(need, 1), round(room, 1), round(other, 1)))
    return held


class HeldOffTracker:
    """Once per condition: `vram_held_by_others` when other programs' VRAM starts keeping a priority model
    off a node's GPU, `vram_held_by_others_resolved` when it no longer does (the alerts of issue 11)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # guards _active only
        self._active: dict[str, dict[str, HeldOff]] = {}

    def update(self, node: str, held: list[HeldOff]) -> list[Event]:
        now = {model_key(item.model): item for item in held}
        with self._lock:
            before = self._active.get(node, {})
            self._active[node] = now
        events = [_held_event(node, item) for key, item in now.items() if key not in before]
        events += [_resolved_event(node, item) for key, item in before.items() if key not in now]
        return events

    def active(self, node: str) -> list[HeldOff]:
        with self._lock:
            return list(self._active.get(node, {}).values())

    def forget(self, node: str) -> None:
        with self._lock:
            self._active.pop(node, None)


def _gb(mb: float) -> str:
    return f"{mb / 1024:.1f} GB"


def _held_event(node: str, item: HeldOff) -> Event:
    message = (
        f"VRAM held by other programs keeps {item.model} off the GPU on {node}: it needs {_gb(item.need_mb)} "
        f"more, Ollama could make {_gb(item.room_mb)} room, other programs hold {_gb(item.other_mb)}"
    )
    data = {"need_mb": item.need_mb, "room_mb": item.room_mb, "other_mb": item.other_mb}
    return Event("vram_held_by_others", node=node, model=item.model, message=message, data=data)


def _resolved_event(node: str, item: HeldOff) -> Event:
    message = f"{item.model} on {node} is no longer kept off the GPU by other programs' VRAM"
    return Event("vram_held_by_others_resolved", node=node, model=item.model, message=message, data={})
