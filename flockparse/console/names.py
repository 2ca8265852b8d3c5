"""The console's one rule for model names, and did-you-mean over the names a cluster knows.

Every place a user names a model (`force_gpu`, `priority add`, `--priority`, `priority_models`) goes
through `check_name`; two spellings are the same model when their `model_key` is equal
(`LLaMA3.1` == `llama3.1:latest`), so a duplicate is a duplicate whichever way it is written.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable

from flockparse.rules import is_glob, model_key

# Ollama's names: [host[:port]/][namespace/]model[:tag], letters, digits, `_ . -`; globs add `* ? [ ]`
_PART = r"[A-Za-z0-9_][A-Za-z0-9_.\-]*"
_NAME = re.compile(rf"{_PART}(:\d+)?(/{_PART})*(:{_PART})?")
_GLOB = re.compile(r"[A-Za-z0-9_.\-/:*?\[\]!]+")
MAX_NAME = 350


class ModelNameError(ValueError):
    """A model name that breaks the rule; the message is one line."""


def check_name(name: str, allow_glob: bool = False) -> str:
    """The name, stripped, if it is a model name (or, with `allow_glob`, a glob); else ModelNameError."""
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
        name = check_name(raw, allow_glob)
        seen.setdefault(name.casefold() if is_glob(name) else model_key(name), name)
    return list(seen.values())


def same_name(a: str, b: str) -> bool:
    """One rule for equality: globs compare as text (case-folded), names by model key."""
    if is_glob(a) or is_glob(b):
        return a.strip().casefold() == b.strip().casefold()
    return model_key(a) == model_key(b)


def suggestions(name: str, known: Iterable[str], n: int = 3) -> list[str]:
    """The closest known names, best first: `lama3.1` -> `llama3.1:latest` (tags are compared too)."""
    known = sorted(set(known))
    key = model_key(name)
    by_key = {model_key(k): k for k in known}
    bare = {k.removesuffix(":latest"): k for k in by_key}
    typed = name.casefold()
    picked = [k for k in by_key if k.startswith(typed)]  # `llama3.2` -> `llama3.2:3b` before `llama3.1`
    picked += difflib.get_close_matches(key, list(by_key), n=n, cutoff=0.6)
    picked += [bare[k] for k in difflib.get_close_matches(name.casefold(), list(bare), n=n, cutoff=0.6)]
    return list(dict.fromkeys(by_key[k] for k in picked))[:n]
