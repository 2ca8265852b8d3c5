"""Typed results inside the core; the product spec's dicts only at the public edges (`as_dict`).

`Reason` names every outcome of a move, probe or skip (a `StrEnum`: it compares and serialises as the plain
string the spec and `--json` show). `MoveResult` is what a move returns inside the core; `force_gpu_load`,
`force_cpu_load` and `force_*_all_nodes` hand out `as_dict()`, the shape GPU_AUTO_OPTIMIZATION.md shows.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Reason(StrEnum):
    MOVED = "moved"
    ALREADY = "already"
    UNLOADED = "unloaded"
    NO_GPU = "no_gpu"
    OUT_OF_MEMORY = "out_of_memory"
    NOT_FOUND = "not_found"
    NOT_LOADED = "not_loaded"
    PINNED_BY_MODELFILE = "pinned_by_modelfile"
    NOT_CONTROLLABLE = "not_controllable"
    UNREACHABLE = "unreachable"
    TIMEOUT = "timeout"
    CANCELLED = "cancelled"
    ERROR = "error"
    # skips decided by the balancer before any request
    OFFLINE = "offline"
    GPU_LOST = "gpu_lost"
    GPU_UNKNOWN = "gpu_unknown"
    REMOVED = "removed"
    # --dry-run: what would be done, nothing sent
    WOULD_MOVE = "would_move"
    WOULD_PROBE = "would_probe"
    WOULD_UNLOAD = "would_unload"
    WOULD_EVICT = "would_evict"
    # room on the GPU (flockparse/room.py)
    DOES_NOT_FIT = "does_not_fit"  # a force to GPU refused before any load: the model cannot fit there
    NO_ROOM = "no_room"  # only models of equal or higher priority hold the VRAM it needs
    BUSY = "busy"  # making room would unload a model serving requests: wait for the next pass
    EVICTED = "evicted"  # unloaded (or moved to CPU) to make room for a higher priority model


@dataclass
class MoveResult:
    """One move's outcome. Mutable while the controller builds it (restore notes are appended)."""

    success: bool
    message: str
    reason: Reason
    location: str | None = None
    vram_mb: float = 0.0
    restored: bool = False  # a failed move put the model back where it was
    restored_others: list[str] | None = None  # models Ollama evicted for the attempt, loaded back
    not_restored: list[str] | None = None  # ... and those that could not be loaded back yet
    evicted: list[str] | None = None  # a move that worked: the models Ollama unloaded to make room
    # ... and what the other models held before it, and each evicted one's VRAM (MB): room.py learns from it
    held_before_mb: float = 0.0
    evicted_vram_mb: list[float] | None = None
    in_vram_before: list[str] | None = None  # the other models that held VRAM before the move
    modelfile_num_gpu: int | None = None  # with PINNED_BY_MODELFILE: the Modelfile's value
    skipped: bool = False  # decided without contacting the node (offline, no GPU, ...)
    dry_run: bool = False  # only said what would be done

    def as_dict(self) -> dict:
        """The spec's shape: the six keys always, the others only when they say something."""
        result: dict = {
            "success": self.success,
            "message": self.message,
            "location": self.location,
            "vram_mb": self.vram_mb,
            "reason": str(self.reason),
            "restored": self.restored,
        }
        if self.skipped:
            result["skipped"] = True
        if self.dry_run:
            result["dry_run"] = True
        if self.restored_others is not None:
            result["restored_others"] = list(self.restored_others)
        if self.not_restored:
            result["not_restored"] = list(self.not_restored)
        if self.evicted:
            result["evicted"] = list(self.evicted)
        if self.modelfile_num_gpu is not None:
            result["modelfile_num_gpu"] = self.modelfile_num_gpu
        return result


def skipped(reason: Reason, message: str) -> MoveResult:
    return MoveResult(False, message, reason, skipped=True)
