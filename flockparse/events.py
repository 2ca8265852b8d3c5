"""How the core tells the console what happened.

The core (controller, balancer, optimizer) never prints: it emits `Event`s to whoever subscribed. A console
renders them, a test waits for them, a log handler records them. A subscriber that raises must never break
the core, so `emit` logs the exception and carries on with the other subscribers.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)

EVENT_KINDS = (
    "node_up",
    "node_down",
    "node_added",
    "node_removed",
    "node_restarted",
    "models_restored",
    "model_unloaded",
    "model_evicted",  # the optimizer made room for a higher priority model (flockparse/room.py)
    "no_room",  # a priority model is kept off the GPU by models of equal or higher priority (once)
    "vram_measured",  # a node's exporter read again after its models changed (quiet: for live views)
    "gpu_lost",
    "gpu_back",
    "remedy_started",
    "remedy_finished",
    "move_started",
    "move_finished",
    "move_failed",
    "pass_started",
    "pass_finished",
    "optimizer_started",
    "optimizer_stopped",
    "gpu_metrics_failed",
    "gpu_metrics_back",
    "vram_held_by_others",
    "vram_held_by_others_resolved",
    "state_not_saved",  # a serve could not write its state file (flockparse/serve/state.py)
    # an attached console's own, from its RemoteCluster (flockparse/remote.py), never on a serve's bus:
    "serve_lost",
    "serve_back",
    "history_warning",  # flockparse/history.py: the history file cannot be written; history is off
    "alert_failed",  # flockparse/alerts.py: a channel gave up on a message after its retries
)


@dataclass(frozen=True)
class Event:
    """One thing that happened; `message` is a plain human sentence, the console adds colour."""

    kind: str
    node: str | None = None
    model: str | None = None
    message: str = ""
    data: dict = field(default_factory=dict)
    time: float = field(default_factory=time.time)


Subscriber = Callable[[Event], None]


class EventBus:
    """Thread-safe fan-out of events; callbacks run outside the lock so they may subscribe or emit."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._subscribers: list[Subscriber] = []
        self._closed = False

    def close(self) -> None:
        """Deliver nothing from now on: a closed core says nothing (its late threads included)."""
        with self._lock:
            self._closed = True

    def subscribe(self, callback: Subscriber) -> Callable[[], None]:
        """Register `callback`; the returned function unsubscribes it (calling it twice is harmless)."""
        with self._lock:
            self._subscribers.append(callback)

        def unsubscribe() -> None:
            with self._lock:
                if callback in self._subscribers:
                    self._subscribers.remove(callback)

        return unsubscribe

    def emit(self, event: Event) -> None:
        """Deliver `event` to every subscriber; one failing subscriber does not stop the others."""
        with self._lock:
            subscribers = [] if self._closed else list(self._subscribers)
        for callback in subscribers:
            try:
                callback(event)
            except Exception:
                logger.exception("event subscriber %r failed on %s", callback, event.kind)
