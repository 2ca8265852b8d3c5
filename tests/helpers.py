"""Plain helpers shared by the test modules (fixtures live in conftest.py): polling, placement checks,
request-log filters and an event recorder. Import them with `from helpers import ...`."""

from __future__ import annotations

import inspect
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from flockparse.balancer import OllamaLoadBalancer
from flockparse.events import Event
from flockparse.rules import same_model
from ollama_sim import SimNode

LLAMA = "llama3.1:latest"
EMBED = "mxbai-embed-large:latest"


def wait_until(
    predicate: Callable[[], Any], what: str = "", timeout: float = 15.0, interval: float = 0.01
) -> Any:
    """Poll `predicate` until it returns something truthy (returned), never a fixed sleep; at the deadline
    fail the test, saying `what` was awaited."""
    deadline = time.monotonic() + timeout
    pause = threading.Event()
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() >= deadline:
            awaited = what or _describe(predicate)
            pytest.fail(f"timed out after {timeout} s waiting for: {awaited}")
        pause.wait(interval)


def _describe(predicate: Callable[[], Any]) -> str:
    """A lambda's source line (its __name__ is just "<lambda>"), else the function's name."""
    try:
        return inspect.getsource(predicate).strip()
    except (OSError, TypeError):
        return getattr(predicate, "__name__", repr(predicate))


def loaded(node: SimNode, model: str) -> dict | None:
    """The simulator's own record of a loaded model (ground truth for assertions)."""
    matches = [m for m in node.loaded() if same_model(m["name"], model)]
    return matches[0] if matches else None


def on_gpu(node: SimNode, model: str) -> bool:
    return any(
        m["name"] == model and not m["stopping"] and m["size_vram"] == m["size"] > 0 for m in node.loaded()
    )


def on_cpu(node: SimNode, model: str) -> bool:
    return any(m["name"] == model and not m["stopping"] and m["size_vram"] == 0 for m in node.loaded())


def posts(node: SimNode) -> list[tuple[str, str, object]]:
    return [entry for entry in node.request_log if entry[0] == "POST"]


class Recorder:
    """Collects events; `count` and `wait` let a test wait for one without sleeping."""

    def __init__(self, balancer: OllamaLoadBalancer) -> None:
        self.events: list[Event] = []
        self._lock = threading.Lock()
        balancer.subscribe(self._add)

    def _add(self, event: Event) -> None:
        with self._lock:
            self.events.append(event)

    def of(self, kind: str) -> list[Event]:
        with self._lock:
            return [e for e in self.events if e.kind == kind]

    def wait(self, kind: str, count: int = 1, timeout: float = 15.0) -> list[Event]:
        wait_until(lambda: len(self.of(kind)) >= count, f"{count} {kind} event(s)", timeout)
        return self.of(kind)
