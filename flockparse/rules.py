"""The rules every part of the project shares, one place each: model names, node addresses, placement.

- Model names: `llama3.1` means `llama3.1:latest`; compare by `model_key` (canonical, case-folded), never by
  substring (`llama3` is not `llama3.1:70b`). Priority patterns: exact names, shell globs, `"*"`.
- Node addresses are read the way `OLLAMA_HOST` is: `gpu1` -> `http://gpu1:11434`.
- Placement is the `ollama ps` PROCESSOR rule (cmd/cmd.go): GPU, CPU, or a split by the rounded CPU share.

Pure functions, no I/O: the controller, the balancer, the optimizer and the console all import them from here.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from datetime import UTC, datetime
from fnmatch import fnmatchcase
from typing import Any
from urllib.parse import urlsplit

LOCATION_GPU = "GPU (VRAM)"
LOCATION_CPU = "CPU (RAM)"
LOCATION_UNKNOWN = "Unknown"
GLOB_CHARS = frozenset("*?[")
# Ollama's names: [host[:port]/][namespace/]model[:tag], letters, digits, `_ . -`; globs add `* ? [ ]`
_NAME_PART = r"[A-Za-z0-9_][A-Za-z0-9_.\-]*"
_NAME = re.compile(rf"{_NAME_PART}(:\d+)?(/{_NAME_PART})*(:{_NAME_PART})?")
_GLOB = re.compile(r"[A-Za-z0-9_.\-/:*?\[\]!]+")
MAX_NAME = 350


class ModelNameError(ValueError):
    """A model name that breaks the rule; the message is one line."""


# --------------------------------------------------------------------------------------------- model names
def canonical_name(name: str) -> str:
    """`llama3.1` -> `llama3.1:latest`: the form /api/ps and /api/tags use.

    Case is kept (it is what gets sent to Ollama); compare names with `same_model` or
    `canonical_name(x).casefold()`. Never compare by substring: `llama3` is not `llama3.1:70b`.
    """
    name = name.strip()
    for default_prefix in ("registry.ollama.ai/", "library/"):  # Ollama's shortest display form
        if name.casefold().startswith(default_prefix):
            name = name[len(default_prefix) :]
    if not name:
        return name
    last_segment = name.rsplit("/", 1)[-1]
    return name if ":" in last_segment else f"{name}:latest"


def model_key(name: str) -> str:
    """The comparable form of a model name: canonical, case-folded (`LLaMA3.1` -> `llama3.1:latest`)."""
    return canonical_name(name).casefold()


def same_model(a: str, b: str) -> bool:
    """True when two spellings name the same model (`LLaMA3.1` == `llama3.1:latest`)."""
    return model_key(a) == model_key(b)


def check_model_name(name: str, allow_glob: bool = False) -> str:
    """The name, stripped, if it is a model name (or, with `allow_glob`, a glob); else ModelNameError.

    One rule for every place a name comes in: the console's commands and flags, the control API.
    """
    text = name.strip()
    if not text:
        raise ModelNameError("empty model name")
    shown = text.encode("unicode_escape").decode("ascii")
    if len(text) > MAX_NAME:
        raise ModelNameError(f"model name too long ({len(text)} characters)")
    if allow_glob and is_glob(text):
        if not _GLOB.fullmatch(text):
            raise ModelNameError(f"`{shown}` is not a model name or glob (letters, digits, `_.-:/*?[]`)")
        return text
    if not _NAME.fullmatch(text):
        raise ModelNameError(f"`{shown}` is not a model name (e.g. `llama3.1`, `llama3.1:8b`, `org/m:tag`)")
    return text


def unique_names(names: Iterable[str], allow_glob: bool = False) -> list[str]:
    """Checked names, blanks skipped, the first spelling of each model kept (`a` and `a:latest` are one)."""
    seen: dict[str, str] = {}
    for raw in names:
        if not raw.strip():
            continue
        name = check_model_name(raw, allow_glob)
        seen.setdefault(name.casefold() if is_glob(name) else model_key(name), name)
    return list(seen.values())


def same_name(a: str, b: str) -> bool:
    """One rule for equality: globs compare as text (case-folded), names by model key."""
    if is_glob(a) or is_glob(b):
        return a.strip().casefold() == b.strip().casefold()
    return model_key(a) == model_key(b)


# --------------------------------------------------------------------------------------------- placement
def placement(size: int, size_vram: int) -> tuple[str, int, str]:
    """(location, gpu_percent, PROCESSOR text) exactly as `ollama ps` decides it (cmd/cmd.go).

    A split is judged by the rounded CPU share, so `Split (52% GPU)` matches `48%/52% CPU/GPU`.
    """
    if size_vram == 0:
        return LOCATION_CPU, 0, "100% CPU"
    if size_vram == size:
        return LOCATION_GPU, 100, "100% GPU"
    if size_vram > size or size == 0:
        return LOCATION_UNKNOWN, 0, "Unknown"
    cpu = math.floor((size - size_vram) / size * 100 + 0.5)  # Go math.Round: half away from zero
    gpu = 100 - cpu
    return f"Split ({gpu}% GPU)", gpu, f"{cpu}%/{gpu}% CPU/GPU"


def normalize_url(node_url: str) -> str:
    """One spelling per node, read the way OLLAMA_HOST is: `gpu1` -> `http://gpu1:11434`.

    Without a scheme the port defaults to 11434; with one, to the scheme's own (as Ollama's envconfig).
    Raises ValueError with a one-line reason for anything that is not an http(s) node address.
    """
    text = str(node_url).strip()
    if any(ch.isspace() or not ch.isprintable() for ch in text):
        raise ValueError(f"invalid node URL {node_url!r}: no spaces or control characters allowed")
    has_scheme = "://" in text
    parts = urlsplit(text if has_scheme else f"http://{text}")
    try:
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"invalid node URL {node_url!r}: {exc}") from None
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise ValueError(f"invalid node URL {node_url!r}: expected http://host:port")
    if parts.query or parts.fragment:
        raise ValueError(f"invalid node URL {node_url!r}: no query or fragment allowed")
    if port == 0:
        raise ValueError(f"invalid node URL {node_url!r}: port 0 is not a port a node listens on")
    if port is None and not has_scheme:
        port = 11434
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname.lower()
    netloc = host if port is None else f"{host}:{port}"
    return f"{parts.scheme.lower()}://{netloc}{parts.path.rstrip('/')}"


def parse_expires_at(text: Any) -> datetime | None:
    """RFC3339Nano in the node's zone -> aware datetime; None when absent or unreadable."""
    if not isinstance(text, str) or not text:
        return None
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


# --------------------------------------------------------------------------------------------- priorities
def split_tag(name: str) -> tuple[str, str | None]:
    """`llama3.1:70b` -> ("llama3.1", "70b"); a colon before the last slash is a host port, not a tag."""
    colon, slash = name.rfind(":"), name.rfind("/")
    if colon > slash:
        return name[:colon], name[colon + 1 :]
    return name, None


def is_glob(pattern: str) -> bool:
    return bool(GLOB_CHARS & set(pattern))


def matches_priority(model_name: str, patterns: list[str]) -> bool:
    """True if `model_name` is a priority model.

    `llama3.1` means `llama3.1:latest` only (not `llama3.1:70b`); matching ignores case; shell globs
    (`llama3*`, `*:70b`) are matched against the whole canonical name, and a glob without a tag also
    against the name without its tag; `"*"` matches every model.
    """
    return priority_rank(model_name, patterns) is not None


def priority_rank(model_name: str, patterns: list[str]) -> int | None:
    """The index of the first pattern `model_name` matches (0 = the highest priority), None when it is not
    a priority model. The list's order is the ranking: a higher one may displace a lower one on a GPU."""
    canonical = model_key(model_name)
    base, _ = split_tag(canonical)
    for rank, raw in enumerate(patterns):
        pattern = raw.strip().lower()
        if not pattern:
            continue
        if not is_glob(pattern):
            if model_key(pattern) == canonical:
                return rank
        elif fnmatchcase(canonical, pattern) or (
            split_tag(pattern)[1] is None and fnmatchcase(base, pattern)
        ):
            return rank
    return None


def outranks(rank: int | None, other: int | None) -> bool:
    """True when a model of `rank` may displace one of `other` (lower, or not a priority at all)."""
    return rank is not None and (other is None or rank < other)


def priority_patterns(value: str | list[str] | tuple[str, ...]) -> list[str]:
    """A copy of the configured list (it may change under us); a lone string means one pattern."""
    return [value] if isinstance(value, str) else [str(p) for p in value]


def explicit_priority_names(patterns: list[str]) -> list[str]:
    """Canonical names of the patterns that name one model (no glob): those may be loaded when absent."""
    names = [model_key(p) for p in patterns if p.strip() and not is_glob(p)]
    return list(dict.fromkeys(names))


def is_off_gpu(model: dict) -> bool:
    """Loaded on CPU or split, and not being unloaded (a model on its way out is left alone)."""
    location = str(model.get("location") or "")
    return not model.get("stopping") and (location == LOCATION_CPU or location.startswith("Split"))
