"""History and log files that can fail without taking the console down.

An unwritable config directory or a full disk must not crash the console or put a prompt_toolkit
traceback and "Press ENTER" under every line: the console runs on without them and says so once.
History is private (0600) and a line carrying credentials (`user:pass@`, `token=`) is never stored.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Iterable
from pathlib import Path

from prompt_toolkit.history import FileHistory, History, InMemoryHistory

SECRET = re.compile(r"://[^/\s@]+@|(password|passwd|token|secret|api[_-]?key)\s*[=:]", re.IGNORECASE)


def has_secret(line: str) -> bool:
    return bool(SECRET.search(line))


def _reason(exc: OSError) -> str:
    return exc.strerror or type(exc).__name__


class SafeFileHistory(FileHistory):
    """FileHistory that stores no secrets and, when a write fails, stops writing and reports it once."""

    def __init__(self, filename: Path, on_failure: Callable[[str], None]) -> None:
        super().__init__(str(filename))
        self._on_failure = on_failure
        self.failed = False

    def load_history_strings(self) -> Iterable[str]:
        if not Path(self.filename).is_file():  # e.g. a link to a device: reading it might never end
            return []
        try:
            return list(super().load_history_strings())
        except OSError as exc:
            self._fail(exc)
            return []

    def store_string(self, string: str) -> None:
        if self.failed or has_secret(string):
            return
        try:
            super().store_string(string)
        except OSError as exc:
            self._fail(exc)

    def _fail(self, exc: OSError) -> None:
        if not self.failed:
            self.failed = True
            self._on_failure(f"history is off from now on: cannot write {self.filename} ({_reason(exc)})")


class QuietFileHandler(logging.FileHandler):
    """A log file that, once a write fails (disk full), stops logging instead of printing to stderr."""

    def __init__(self, filename: Path, on_failure: Callable[[str], None]) -> None:
        super().__init__(filename, encoding="utf-8")
        self._on_failure = on_failure
        self.broken = False

    def emit(self, record: logging.LogRecord) -> None:
        if not self.broken:
            super().emit(record)

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 - logging's name
        if not self.broken:
            self.broken = True
            self._on_failure(f"console.log is off from now on: cannot write {self.baseFilename}")


def open_history(directory: Path | None, on_failure: Callable[[str], None]) -> History:
    """The history file in `directory` (created 0600), or an in-memory one when it cannot be written."""
    if directory is None:
        return InMemoryHistory()
    path = directory / "history"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600))
        if path.is_file():
            os.chmod(path, 0o600)
    except OSError as exc:
        on_failure(f"history is off: cannot write {path} ({_reason(exc)})")
        return InMemoryHistory()
    return SafeFileHistory(path, on_failure)


def open_log(directory: Path | None, format: str, on_failure: Callable[[str], None]) -> Path | None:
    """Send warnings and tracebacks to `directory`/console.log (never to the terminal); its path or None."""
    root = logging.getLogger()
    root.setLevel(logging.WARNING)
    for handler in list(root.handlers):
        if isinstance(handler, QuietFileHandler):
            root.removeHandler(handler)
            handler.close()
    if not any(isinstance(handler, logging.NullHandler) for handler in root.handlers):
        root.addHandler(logging.NullHandler())  # else logging's last resort prints into the prompt
    if directory is None:
        return None
    path = directory / "console.log"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        handler = QuietFileHandler(path, on_failure)
    except OSError as exc:
        on_failure(f"console.log is off: cannot write {path} ({_reason(exc)})")
        return None
    handler.setFormatter(logging.Formatter(format))
    root.addHandler(handler)
    return path
