"""The cluster seen as one Ollama: what `/api/tags`, `/api/ps` and `/api/version` answer (pure functions).

- `/api/tags` is the union of the nodes' installed models, one entry per name (Ollama's `name`, compared
  case-insensitively): when nodes hold different builds of a name (other digests), the most recently
  modified one is listed. Sorted by `modified_at`, newest first, as Ollama sorts it.
- `/api/ps` lists each loaded model once: the copy holding the most VRAM (then the latest expiry), as a
  whole entry from that node (no figures mixed between nodes). Sorted by `expires_at`, latest first, as
  Ollama sorts it. Which node holds what is `vram_report`'s job, not the Ollama API's.
- `/api/version` is the lowest version among the nodes (a client checking for a feature then only uses
  what every node has), `0.0.0` (what Ollama built from source says) when no node's version is known.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Any

from flockparse.gpu_state import version_tuple
from flockparse.rules import parse_expires_at

UNKNOWN_VERSION = "0.0.0"


def union_tags(replies: Iterable[Any]) -> dict[str, list[dict]]:
    """`{"models": [...]}` from the nodes' /api/tags replies (one not in Ollama's shape is skipped)."""
    chosen: dict[str, dict] = {}
    for model in _models(replies):
        key = str(model.get("name") or model.get("model") or "").casefold()
        if not key:
            continue
        kept = chosen.get(key)
        if kept is None or _when(model.get("modified_at")) > _when(kept.get("modified_at")):
            chosen[key] = model
    return {"models": sorted(chosen.values(), key=lambda m: _when(m.get("modified_at")), reverse=True)}


def union_ps(replies: Iterable[Any]) -> dict[str, list[dict]]:
    """`{"models": [...]}` from the nodes' /api/ps replies: each model once (see the module docstring)."""
    chosen: dict[str, dict] = {}
    for model in _models(replies):
        key = str(model.get("name") or model.get("model") or "").casefold()
        if not key:
            continue
        kept = chosen.get(key)
        if kept is None or _ps_rank(model) > _ps_rank(kept):
            chosen[key] = model
    return {"models": sorted(chosen.values(), key=lambda m: _when(m.get("expires_at")), reverse=True)}


def cluster_version(versions: Iterable[str | None]) -> str:
    """The lowest readable version among the nodes, else UNKNOWN_VERSION."""
    known = [(parsed, v) for v in versions if v and (parsed := version_tuple(v)) is not None]
    return min(known)[1] if known else UNKNOWN_VERSION


def _models(replies: Iterable[Any]) -> Iterable[dict]:
    for reply in replies:
        models = reply.get("models") if isinstance(reply, dict) else None
        if isinstance(models, list):
            yield from (m for m in models if isinstance(m, dict))


def _number(value: Any) -> float:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else 0.0


def _when(value: Any) -> float:
    parsed = parse_expires_at(value) if isinstance(value, str) else None
    return parsed.timestamp() if isinstance(parsed, datetime) else float("-inf")


def _ps_rank(model: dict) -> tuple[float, float]:
    return _number(model.get("size_vram")), _when(model.get("expires_at"))
