"""Alerts: tell someone when a priority model falls to CPU or a split, a node's GPU is lost, a node goes
down (and when it comes back), a move fails, or other programs' VRAM keeps a priority model off a GPU (seen
with a GPU exporter, flockparse/gpu_metrics); and say "resolved" when the condition ends.

`AlertRules` is pure (events and a monotonic time in, `Notice`s out): one condition per (node, model, kind),
de-duplicated with a cool-down: a condition that starts is sent at once unless one was sent for the same key
within the cool-down (then it waits for the cool-down's end, and is sent only if it still holds, with how
many changes were held back); a condition that ends is sent at once when its start was. So a node flapping
every few seconds sends one "down" and one "back" per cool-down, not a hundred messages. A user's own
force_cpu is not a fall (flockparse/timeline.MoveAttribution).

`Alerter` runs it: the event subscriber only queues (the optimizer never waits); a dispatcher thread applies
the rules and hands notices to one sender thread per channel (flockparse/notify.py), which retries a
failing receiver with exponential back-off, logs every failed attempt and, when it gives up, emits one
`alert_failed` event. One slow receiver never delays the other channel.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import socket
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from flockparse.events import Event
from flockparse.notify import (
    Channel,
    EmailChannel,
    EmailSettings,
    Notice,
    SendResult,
    WebhookChannel,
)
from flockparse.rules import matches_priority, model_key
from flockparse.timeline import CAUSE_MOVE, CPU, GPU, NOT_LOADED, SPLIT, MoveAttribution, placement_of

logger = logging.getLogger(__name__)

KIND_OFF_GPU, KIND_GPU_LOST, KIND_NODE_DOWN, KIND_MOVE_FAILED = (
    "model_off_gpu",
    "gpu_lost",
    "node_down",
    "move_failed",
)
KIND_VRAM_HELD = (
    "vram_held_by_others"  # flockparse/gpu_metrics: other programs' VRAM keeps a model off the GPU
)
FIRING, RESOLVED, TEST = "firing", "resolved", "test"
DEFAULT_COOLDOWN_S = 600.0
QUEUE_MAX = 10_000  # events waiting for the dispatcher
CHANNEL_QUEUE_MAX = 1_000  # notices waiting for one channel
CLOSE_WAIT_S = 2.0
WATCHED_KINDS = frozenset((
    "placements_changed", "node_up", "node_down", "node_removed", "gpu_lost", "gpu_back",
    "move_started", "move_finished", "move_failed", "model_unloaded",
    "vram_held_by_others", "vram_held_by_others_resolved",
))  # fmt: skip

Key = tuple[str | None, str | None, str]  # (node, model, kind)


@dataclass(frozen=True)
class RetryPolicy:
    """A failing send is tried `attempts` times in all, waiting first_s, 2 x first_s ... at most cap_s."""

    attempts: int = 5
    first_s: float = 2.0
    cap_s: float = 60.0


@dataclass(frozen=True)
class AlertSettings:
    """The `[alerts]` and `[alerts.email]` config tables."""

    webhook_url: str | None = None
    webhook_format: str = "json"
    cooldown_s: float = DEFAULT_COOLDOWN_S
    email: EmailSettings | None = None

    @property
    def configured(self) -> bool:
        return bool(self.webhook_url or self.email)

    def channels(self) -> list[Channel]:
        channels: list[Channel] = []
        if self.webhook_url:
            channels.append(WebhookChannel(self.webhook_url, self.webhook_format))
        if self.email is not None:
            channels.append(EmailChannel(self.email))
        return channels


@dataclass
class _Condition:
    active: bool = False  # what holds now
    reported: bool = False  # what the last message sent said
    last_fire: float = float("-inf")  # when (monotonic) the last "firing" message went out
    held: int = 0  # changes not sent since the last message
    fire_message: str = ""
    resolve_message: str = ""
    fired_at: float = 0.0  # wall time the condition last started


class AlertRules:
    """Events -> notices, with the cool-down per (node, model, kind). Not thread-safe: one owner."""

    def __init__(self, cooldown_s: float, patterns: Callable[[], Iterable[str]] = lambda: ()) -> None:
        self.cooldown_s = float(cooldown_s)
        self._patterns = patterns
        self._conditions: dict[Key, _Condition] = {}
        self._moves = MoveAttribution()
        self._last_loaded: dict[tuple[str, str], str] = {}  # (node, model) -> gpu | split | cpu
        self.suppressed = 0

    def active(self) -> list[dict[str, Any]]:
        return [
            {"node": node, "model": model, "kind": kind, "since": c.fired_at, "message": c.fire_message}
            for (node, model, kind), c in self._conditions.items()
            if c.active
        ]

    def observe(self, event: Event, now: float) -> list[Notice]:
        """The notices `event` causes now (most cause none)."""
        kind, node = event.kind, event.node
        model = model_key(event.model) if event.model else None
        if kind == "node_down":
            return self._set(
                (node, None, KIND_NODE_DOWN), True, event.message or f"{node} is down", now, event
            )
        if kind == "node_up":
            return self._set((node, None, KIND_NODE_DOWN), False, f"{node} is back online", now, event)
        if kind == "node_removed":
            for key in [k for k in self._conditions if k[0] == node]:
                del self._conditions[key]
            for pair in [p for p in self._last_loaded if p[0] == node]:
                del self._last_loaded[pair]
            return []
        if kind in ("gpu_lost", "gpu_back"):
            text = event.message or f"{node}: {kind}"
            return self._set((node, None, KIND_GPU_LOST), kind == "gpu_lost", text, now, event)
        if kind in ("vram_held_by_others", "vram_held_by_others_resolved"):
            text = event.message or f"{model} on {node}: {kind}"
            return self._set((node, model, KIND_VRAM_HELD), kind == "vram_held_by_others", text, now, event)
        if model is None:
            return self._placements(event, now) if kind == "placements_changed" else []
        return self._moved(event, str(node), model, now)

    def _moved(self, event: Event, node: str, model: str, now: float) -> list[Notice]:
        data, target = event.data or {}, str((event.data or {}).get("target", ""))
        if event.kind == "move_started":
            self._moves.started(node, model, target, event.time)
            return []
        if event.kind not in ("move_finished", "move_failed", "model_unloaded"):
            return []
        ok = event.kind != "move_failed"
        self._moves.finished(node, model, ok)
        key = (node, model, KIND_MOVE_FAILED)
        if ok:
            if event.kind == "model_unloaded":
                return []
            return self._set(key, False, f"{model} moved to {target} on {node}", now, event)
        if data.get("reason") == "cancelled":
            return []
        reason = data.get("reason") or "error"
        text = f"moving {model} to {target} on {node} failed ({reason}): {event.message}"
        return self._set(key, True, text, now, event, repeat=True)

    def _placements(self, event: Event, now: float) -> list[Notice]:
        node, data = str(event.node), event.data or {}
        models = data.get("models") or {}
        patterns = list(self._patterns())
        notices: list[Notice] = []
        for key in data.get("changed") or []:
            row = models.get(key)
            placement = placement_of(row.get("location")) if row else NOT_LOADED
            caused_by_move = self._moves.cause(node, key, placement) == CAUSE_MOVE
            was = self._last_loaded.get((node, key))
            if placement in (GPU, SPLIT, CPU):
                self._last_loaded[(node, key)] = placement
            if not matches_priority(key, patterns):
                continue
            condition = (node, key, KIND_OFF_GPU)
            if placement in (SPLIT, CPU) and not caused_by_move:
                where = "on CPU" if placement == CPU else f"split between CPU and GPU ({row.get('location')})"
                text = (
                    f"priority model {key} fell off the GPU on {node}: now {where}"
                    if was == GPU
                    else f"priority model {key} is {where} on {node}, not on GPU"
                )
                notices += self._set(condition, True, text, now, event)
            elif placement == GPU:
                notices += self._set(
                    condition, False, f"priority model {key} is back on GPU on {node}", now, event
                )
            elif placement == NOT_LOADED:
                notices += self._set(
                    condition, False, f"priority model {key} is no longer loaded on {node}", now, event
                )
        return notices

    def _set(
        self, key: Key, active: bool, text: str, now: float, event: Event, repeat: bool = False
    ) -> list[Notice]:
        condition = self._conditions.get(key)
        if condition is None:
            if not active:
                return []  # ending something never seen start (a node's first check): nothing to say
            condition = self._conditions[key] = _Condition()
        if condition.active == active and not (active and repeat):
            return []
        if active and not condition.active:
            condition.fired_at = event.time
        condition.active = active
        if active:
            condition.fire_message = text
        else:
            condition.resolve_message = text
        return self._decide(key, condition, now, repeat)

    def _decide(self, key: Key, c: _Condition, now: float, repeat: bool = False) -> list[Notice]:
        if c.active and (not c.reported or repeat):
            if now - c.last_fire >= self.cooldown_s:
                notice = self._notice(key, c, FIRING)
                c.reported, c.last_fire = True, now
                return [notice]
        elif not c.active and c.reported:
            notice = self._notice(key, c, RESOLVED)
            c.reported = False
            return [notice]
        c.held += 1  # within the cool-down, or back to what was last said: held back
        self.suppressed += 1
        return []

    def _notice(self, key: Key, c: _Condition, state: str) -> Notice:
        node, model, kind = key
        text = c.fire_message if state == FIRING else c.resolve_message
        notice = Notice(kind, state, text, node=node, model=model, changes=c.held)
        c.held = 0
        return notice

    def next_due(self) -> float | None:
        """When (monotonic) a held-back start can be sent: the earliest cool-down end of one."""
        times = [
            c.last_fire + self.cooldown_s for c in self._conditions.values() if c.active and not c.reported
        ]
        return min(times) if times else None

    def due(self, now: float) -> list[Notice]:
        """Starts held back by a cool-down that has ended and still hold."""
        notices = []
        for key, c in self._conditions.items():
            if c.active and not c.reported and now - c.last_fire >= self.cooldown_s:
                c.held = max(0, c.held - 1)  # the change sent now is not "held back" any more
                notices.append(self._notice(key, c, FIRING))
                c.reported, c.last_fire = True, now
        return notices


_STOP = object()


class ChannelSender:
    """One channel's notices, in order, on a daemon thread: retried with back-off, given up loudly."""

    def __init__(
        self, channel: Channel, retry: RetryPolicy, emit: Callable[[Event], None], stop: threading.Event
    ) -> None:
        self.channel, self.retry, self._emit, self._stop = channel, retry, emit, stop
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=CHANNEL_QUEUE_MAX)
        self._lock = threading.Lock()  # guards the counters
        self.sent = self.failed = 0
        self.last_error: str | None = None
        self._thread = threading.Thread(target=self._run, name=f"alerts-{channel.name}", daemon=True)
        self._thread.start()

    def submit(self, item: Any) -> None:
        try:
            self._queue.put_nowait(item)
        except queue.Full:
            with self._lock:
                self.failed += 1
            logger.warning(
                "alert to %s dropped: %d messages already wait", self.channel.describe(), CHANNEL_QUEUE_MAX
            )

    def close(self) -> None:
        """No more notices: what is queued is still sent (see Alerter.close for the bound)."""
        with contextlib.suppress(queue.Full):  # full: Alerter.close's stop ends it at its deadline
            self._queue.put_nowait(_STOP)

    def join(self, wait: float) -> None:
        self._thread.join(wait)

    def status(self) -> dict[str, Any]:
        with self._lock:
            return {
                "name": self.channel.name,
                "channel": self.channel.describe(),
                "sent": self.sent,
                "failed": self.failed,
                "queued": self._queue.qsize(),
                "last_error": self.last_error,
            }

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if isinstance(item, threading.Event):  # a flush marker: everything before it is done
                item.set()
                continue
            if item is _STOP:
                return
            self._deliver(item)

    def _deliver(self, notice: Notice) -> None:
        delay, result = self.retry.first_s, SendResult(False, "not sent")
        for attempt in range(1, self.retry.attempts + 1):
            result = _send(self.channel, notice)
            if result.ok:
                with self._lock:
                    self.sent += 1
                return
            logger.warning(
                "alert to %s failed (attempt %d of %d): %s",
                self.channel.describe(), attempt, self.retry.attempts, result.error,
            )  # fmt: skip
            if not result.retry or attempt == self.retry.attempts:
                break
            wait = result.retry_after if result.retry_after is not None else delay
            if self._stop.wait(min(self.retry.cap_s, wait)):
                return  # closing: the console is leaving, nobody is there to tell
            delay = min(self.retry.cap_s, delay * 2)
        with self._lock:
            self.failed += 1
            self.last_error = result.error
        message = f"alert not delivered to {self.channel.describe()}: {result.error}"
        data = {"channel": self.channel.name, "error": result.error, "kind": notice.kind}
        self._emit(Event("alert_failed", node=notice.node, model=notice.model, message=message, data=data))


def _send(channel: Channel, notice: Notice) -> SendResult:
    """A channel promises not to raise; a bug in one must not end its sender thread."""
    try:
        return channel.send(notice)
    except Exception as exc:
        logger.exception("alert channel %s failed", channel.describe())
        return SendResult(False, f"{type(exc).__name__}: {exc}", retry=False)


class Alerter:
    """Subscribes to a balancer's events and sends what AlertRules decide to every channel."""

    def __init__(
        self,
        channels: list[Channel],
        cooldown_s: float = DEFAULT_COOLDOWN_S,
        patterns: Callable[[], Iterable[str]] = lambda: (),
        emit: Callable[[Event], None] | None = None,
        retry: RetryPolicy = RetryPolicy(),  # noqa: B008 - frozen
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.rules = AlertRules(cooldown_s, patterns)
        self._emit = emit or (lambda event: None)
        self._clock = clock
        self._stop = threading.Event()
        self._lock = threading.Lock()  # guards self.rules (dispatcher vs status readers); never held for I/O
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=QUEUE_MAX)
        self._senders = [ChannelSender(ch, retry, self._emit_safely, self._stop) for ch in channels]
        self._unsubscribe: Callable[[], None] | None = None
        self._thread = threading.Thread(target=self._run, name="alerts", daemon=True)
        self._thread.start()

    @classmethod
    def from_settings(cls, settings: AlertSettings, **options: Any) -> Alerter:
        return cls(settings.channels(), settings.cooldown_s, **options)

    def attach(self, balancer: Any) -> Alerter:
        """Watch `balancer` (its priority list, read at each change); failures are told on its bus."""
        self.rules._patterns = lambda: list(balancer.gpu_priority_models)
        self._emit = balancer.events.emit
        self._unsubscribe = balancer.subscribe(self.on_event)
        return self

    def _emit_safely(self, event: Event) -> None:
        self._emit(event)

    def on_event(self, event: Event) -> None:
        if event.kind not in WATCHED_KINDS or self._stop.is_set():
            return
        try:
            self._queue.put_nowait(event)
        except queue.Full:
            logger.warning("alerts are behind: an event was dropped")

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait (bounded) until what was observed before this call is decided and delivered or given up."""
        deadline = time.monotonic() + timeout
        decided = threading.Event()
        try:
            self._queue.put(decided, timeout=timeout)
        except queue.Full:
            return False
        if not decided.wait(max(0.0, deadline - time.monotonic())):
            return False
        markers = []
        for sender in self._senders:
            marker = threading.Event()
            sender.submit(marker)
            markers.append(marker)
        return all(marker.wait(max(0.0, deadline - time.monotonic())) for marker in markers)

    def close(self) -> None:
        """Stop watching; what was decided is still sent for up to CLOSE_WAIT_S in all, then back-offs and
        queued messages are abandoned (a receiver that is down does not hold the exit)."""
        if self._unsubscribe is not None:
            self._unsubscribe()
        deadline = time.monotonic() + CLOSE_WAIT_S
        try:
            self._queue.put(_STOP, timeout=CLOSE_WAIT_S)
        except queue.Full:
            self._stop.set()
        self._thread.join(max(0.0, deadline - time.monotonic()))
        for sender in self._senders:
            sender.close()
        for sender in self._senders:
            sender.join(max(0.0, deadline - time.monotonic()))
        self._stop.set()  # a sender still in a back-off wait gives up now
        for sender in self._senders:
            close = getattr(sender.channel, "close", None)
            if close is not None:
                close()

    def status(self) -> dict[str, Any]:
        with self._lock:
            active, suppressed = self.rules.active(), self.rules.suppressed
        return {
            "cooldown_s": self.rules.cooldown_s,
            "channels": [sender.status() for sender in self._senders],
            "suppressed": suppressed,
            "active": active,
        }

    def _run(self) -> None:
        while True:
            with self._lock:
                due = self.rules.next_due()
            wait = None if due is None else max(0.0, due - self._clock())
            try:
                item = self._queue.get(timeout=wait)
            except queue.Empty:
                item = None
            if item is _STOP or self._stop.is_set():
                return
            with self._lock:
                notices = self.rules.observe(item, self._clock()) if isinstance(item, Event) else []
                notices += self.rules.due(self._clock())
            for notice in notices:
                for sender in self._senders:
                    sender.submit(notice)
            if isinstance(item, threading.Event):
                item.set()


def send_test(channels: list[Channel]) -> list[dict[str, Any]]:
    """One test message to each channel at once (one attempt, each within its own deadline):
    [{'channel', 'ok', 'error'}] in the channels' order."""
    host = socket.gethostname()
    results: list[SendResult | None] = [None] * len(channels)

    def run(index: int, channel: Channel) -> None:
        text = f"test message from flockparse on {host}: alerts reach this {channel.name}"
        results[index] = _send(channel, Notice("test", TEST, text))

    threads = [
        threading.Thread(target=run, args=(i, ch), name="alerts-test", daemon=True)
        for i, ch in enumerate(channels)
    ]
    for thread in threads:
        thread.start()
    for thread, channel in zip(threads, channels, strict=True):
        thread.join(float(getattr(channel, "timeout", 30.0)) + 1.0)
    out = []
    for channel, result in zip(channels, results, strict=True):
        if result is None:
            result = SendResult(False, "no answer within its deadline")
        out.append({"channel": channel.describe(), "ok": result.ok, "error": result.error or None})
    return out
