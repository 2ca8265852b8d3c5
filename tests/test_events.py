"""EventBus: delivery, unsubscribe, and isolation of a failing subscriber."""

from __future__ import annotations

import dataclasses
import logging

import pytest

from flockparse.events import Event, EventBus


def test_subscribers_receive_events_in_order_until_they_unsubscribe() -> None:
    bus = EventBus()
    first: list[Event] = []
    second: list[Event] = []
    unsubscribe_first = bus.subscribe(first.append)
    bus.subscribe(second.append)

    bus.emit(Event("node_up", node="http://127.0.0.1:1", message="up"))
    unsubscribe_first()
    unsubscribe_first()  # a second call is harmless
    bus.emit(Event("node_down", node="http://127.0.0.1:1", message="down"))

    assert [e.kind for e in first] == ["node_up"]
    assert [e.kind for e in second] == ["node_up", "node_down"]


def test_a_failing_subscriber_is_logged_and_the_others_still_run(caplog: pytest.LogCaptureFixture) -> None:
    bus = EventBus()
    received: list[str] = []

    def broken(event: Event) -> None:
        raise RuntimeError("renderer crashed")

    bus.subscribe(broken)
    bus.subscribe(lambda event: received.append(event.kind))
    with caplog.at_level(logging.ERROR, logger="events"):
        bus.emit(Event("pass_finished", message="done"))

    assert received == ["pass_finished"]
    assert any("renderer crashed" in (r.exc_text or "") for r in caplog.records)


def test_a_subscriber_may_emit_and_subscribe_from_its_callback() -> None:
    """emit runs callbacks outside the lock, so re-entrant use must not deadlock."""
    bus = EventBus()
    seen: list[str] = []

    def chain(event: Event) -> None:
        seen.append(event.kind)
        if event.kind == "node_added":
            bus.subscribe(lambda e: seen.append(f"late:{e.kind}"))
            bus.emit(Event("node_up"))

    bus.subscribe(chain)
    bus.emit(Event("node_added"))

    assert seen == ["node_added", "node_up", "late:node_up"]


def test_event_is_frozen_and_each_has_its_own_data_and_time() -> None:
    a, b = Event("move_started"), Event("move_started")
    a.data["reason"] = "x"
    assert b.data == {}
    assert a.time > 0
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.kind = "other"  # type: ignore[misc]
