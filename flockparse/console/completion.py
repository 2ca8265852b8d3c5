"""Completion: command names and subcommands from the registry, model names from the cluster.

The completer never does I/O (litecli's completion_refresher pattern): ModelNameRefresher asks
balancer.known_models() in a background thread every few seconds and swaps the list in.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable

from prompt_toolkit.completion import Completer, Completion
from prompt_toolkit.document import Document

from flockparse.console.commands import REGISTRY, UsageError, resolve

log = logging.getLogger(__name__)


class ModelNameRefresher:
    """Keeps a fresh copy of the cluster's model names; `names` is a cheap in-memory read."""

    def __init__(self, fetch: Callable[[], Iterable[str]], every: float = 3.0) -> None:
        self._fetch, self._every = fetch, every
        self._names: list[str] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def names(self) -> list[str]:
        with self._lock:
            return list(self._names)

    def refresh(self) -> None:
        try:
            names = sorted(set(self._fetch()))
        except Exception:  # a dead cluster must not kill completion; keep the last good list
            log.debug("model name refresh failed", exc_info=True)
            return
        with self._lock:
            self._names = names

    def start(self) -> ModelNameRefresher:
        def loop() -> None:
            while not self._stop.is_set():
                self.refresh()
                self._stop.wait(self._every)

        self._thread = threading.Thread(target=loop, name="model-name-refresher", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()


def argument_kind(words: list[str]) -> str | None:
    """What the word being typed is: 'command', 'sub:<cmd>', or an argument name such as MODEL."""
    if len(words) <= 1:
        return "command"
    try:
        cmd = resolve(words[0])
    except UsageError:
        return None
    position = len(words) - 2
    if cmd.subcommands:
        if position == 0:
            return f"sub:{cmd.name}"
        if position == 1 and cmd.complete_as and words[1] in cmd.complete_as:
            return cmd.complete_as[words[1]]  # e.g. `priority remove` completes from the priority list
        spec = cmd.subcommands.get(words[1], ())
        position -= 1
    else:
        spec = cmd.args + cmd.optional
    return spec[position] if position < len(spec) else None


class ConsoleCompleter(Completer):
    """Completes whole words where ':' '.' '/' '-' do not split (`llama3.1:` -> `llama3.1:8b`)."""

    def __init__(self, sources: dict[str, Callable[[], Iterable[str]]]) -> None:
        self.sources = sources  # argument name (MODEL, NODE, PRIORITY) -> in-memory list; never I/O

    def candidates(self, kind: str | None) -> list[str]:
        if kind in ("command", "COMMAND"):  # `help <Tab>` offers the commands too
            return [name for cmd in REGISTRY.values() for name in (cmd.name, *cmd.aliases) if name != "?"]
        if kind and kind.startswith("sub:"):
            return list(REGISTRY[kind[4:]].subcommands or {})
        source = self.sources.get(kind or "")
        if source is None and kind and "|" in kind and kind.islower():  # literal choices: gpu|cpu
            return kind.split("|")
        return list(source()) if source else []

    def get_completions(self, document: Document, complete_event: object) -> Iterable[Completion]:
        text = document.text_before_cursor
        words = text.split()
        if not words or text[-1].isspace():
            words.append("")
        current = words[-1]
        needle = current.lower()
        kind = argument_kind(words)
        for candidate in self.candidates(kind):
            if not candidate.isprintable():  # a name with escape codes from a node is never offered
                continue
            name = candidate.lower()
            if name.startswith(needle) or name.split("/")[-1].startswith(needle):
                meta = resolve(candidate).description if kind in ("command", "COMMAND") else None
                yield Completion(candidate, start_position=-len(current), display_meta=meta)
