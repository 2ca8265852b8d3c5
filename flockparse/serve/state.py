"""The serve's state that must survive its restart: priorities, CPU pins and back-offs, in one JSON file.

A `force_cpu` pin, a priority added through the control API and a back-off after a failed move live in the
serve's balancer and optimizer; a restarted serve that forgot them would move a pinned model back to GPU
at its first pass. `StateKeeper(balancer, path)`:
- `load()` at start, before the optimizer's first pass: pins and back-offs of nodes still in the cluster
  are taken back (`GPUOptimizer.import_state`); the saved priority list replaces the configured one only
  when the configuration has not changed since it was saved (an operator who edited `priority_models`
  and restarted means the new list);
- `start()`: a daemon thread writes the file whenever what it would write changed (looked at every second,
  and at once after an event), atomically (temp file + fsync + rename: a crash leaves the old file or the
  new one); `stop()` writes a last time. A failed write is one `state_not_saved` event, said once until a
  write works again; the serve runs on.
"""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from flockparse.events import Event
from flockparse.rules import ModelNameError, unique_names
from flockparse.serve.registry import atomic_write

logger = logging.getLogger(__name__)

STATE_VERSION = 1
SAVE_EVERY_S = 1.0
MAX_STATE_BYTES = 16 * 1024 * 1024


class StateError(ValueError):
    """A state file that cannot be used; one line naming the file."""


def state_path(config_dir: Path, listen: str) -> Path:
    """`<config dir>/serve-HOST-PORT.state.json`: one file per listening address (two serves of two
    clusters on one machine keep theirs apart)."""
    parts = urlsplit(listen if "://" in listen else f"http://{listen}")
    host = str(parts.hostname or "serve").replace(":", "_")
    return Path(config_dir) / f"serve-{host}-{parts.port or 0}.state.json"


def export_state(balancer: Any, configured_priorities: list[str]) -> dict:
    return {
        "version": STATE_VERSION,
        "priority_models": list(balancer.gpu_priority_models),
        "configured_priority_models": list(configured_priorities),
        **balancer.optimizer.export_state(),
    }


def read_state(path: Path) -> dict | None:
    """The saved state, None when there is no file; StateError when it is unreadable."""
    try:
        if Path(path).stat().st_size > MAX_STATE_BYTES:
            raise StateError(f"{path}: too large to be a state file")
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, RecursionError) as exc:
        raise StateError(f"{path}: not a readable state file ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict) or data.get("version") != STATE_VERSION:
        raise StateError(f"{path}: not a state file of this version ({STATE_VERSION})")
    return data


def apply_state(balancer: Any, state: dict, configured_priorities: list[str]) -> list[str]:
    """Take a saved state into the balancer; returns one line per thing worth telling the operator."""
    notes = []
    saved = state.get("priority_models")
    if state.get("configured_priority_models") == list(configured_priorities) and isinstance(saved, list):
        try:
            priorities = unique_names([str(name) for name in saved], allow_glob=True)
        except ModelNameError as exc:
            notes.append(f"saved priority models not used ({exc})")
        else:
            if priorities != list(balancer.gpu_priority_models):
                balancer.gpu_priority_models = priorities
                notes.append(f"priority models as saved: {', '.join(priorities) or 'none'}")
    elif isinstance(saved, list):
        notes.append("priority models changed in the configuration since the last run: the configured list")
    taken = balancer.optimizer.import_state(state, nodes=balancer.nodes)
    if taken:
        notes.append(f"{taken} CPU pin(s) and back-off(s) as saved")
    return notes


class StateKeeper:
    """Loads the state at start and keeps the file up to date (see the module docstring)."""

    def __init__(self, balancer: Any, path: Path, every: float = SAVE_EVERY_S) -> None:
        self.balancer = balancer
        self.path = Path(path)
        self.every = every
        self.configured = list(balancer.gpu_priority_models)  # before load(): what the config asked for
        self._written: str | None = None
        self._failing = False
        self._lock = threading.Lock()  # one save at a time (the thread's and stop()'s)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._unsubscribe: Any = None

    def load(self) -> list[str]:
        """Apply the saved state (before the optimizer starts); StateError when the file is unusable."""
        state = read_state(self.path)
        if state is None:
            return []
        notes = apply_state(self.balancer, state, self.configured)
        self._written = self._text()  # what the file now means; nothing to write until it changes
        return notes

    def start(self) -> None:
        if self._thread is not None:
            return
        self._unsubscribe = self.balancer.subscribe(lambda event: self._wake.set())
        self._thread = threading.Thread(target=self._run, name="serve-state", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread and write what changed since the last write."""
        self._stop.set()
        self._wake.set()
        if self._unsubscribe is not None:
            self._unsubscribe()
        if self._thread is not None:
            self._thread.join(2.0)
        self.save()

    def save(self) -> bool:
        """Write the file if its content changed; True when it was written."""
        with self._lock:
            text = self._text()
            if text == self._written:
                return False
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                atomic_write(self.path, text)
            except OSError as exc:
                if not self._failing:
                    self._failing = True
                    message = f"could not save the serve's state to {self.path}: {exc.strerror or exc}"
                    logger.warning("%s", message)
                    self.balancer.events.emit(Event("state_not_saved", message=message))
                return False
            self._failing = False
            self._written = text
            return True

    def _text(self) -> str:
        return json.dumps(export_state(self.balancer, self.configured), indent=2, sort_keys=True) + "\n"

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.every)
            self._wake.clear()
            if not self._stop.is_set():
                self.save()
