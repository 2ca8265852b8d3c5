"""The console's one rule for model names, and did-you-mean over the names a cluster knows.

Every place a user names a model (`force_gpu`, `priority add`, `--priority`, `priority_models`, and the
control API) goes through `check_name` (the core's `flockparse.rules.check_model_name`); two spellings are
the same model when their `model_key` is equal (`LLaMA3.1` == `llama3.1:latest`), so a duplicate is a
duplicate whichever way it is written.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

from flockparse.rules import MAX_NAME, ModelNameError, is_glob, model_key, same_name, unique_names
from flockparse.rules import check_model_name as check_name

__all__ = [
    "MAX_NAME",
    "ModelNameError",
    "check_name",
    "is_glob",
    "same_name",
    "suggestions",
    "unique_names",
]


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
