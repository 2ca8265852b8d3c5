"""The terminal in no-echo, no-line mode for the length of a command (one place for the termios dance)."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


@contextmanager
def unbuffered_keys(stream: Any = None) -> Iterator[int | None]:
    """ICANON and ECHO off (ISIG stays on: Ctrl-C still interrupts), restored afterwards.

    Yields the terminal's file descriptor, or None when `stream` (default stdin) is not a terminal. Keys
    then arrive one by one instead of a line at a time, and a Ctrl-D stays a byte in the queue instead of
    being eaten by the line discipline.
    """
    stream = sys.stdin if stream is None else stream
    try:
        import termios

        fd = stream.fileno()
        if not os.isatty(fd):
            raise OSError
        saved = termios.tcgetattr(fd)
    except (ImportError, OSError, ValueError, AttributeError):
        yield None
        return
    changed = list(saved)
    changed[3] &= ~(termios.ICANON | termios.ECHO)
    changed[6] = list(saved[6])
    changed[6][termios.VMIN], changed[6][termios.VTIME] = 1, 0
    termios.tcsetattr(fd, termios.TCSANOW, changed)
    try:
        yield fd
    finally:
        termios.tcsetattr(fd, termios.TCSANOW, saved)
