"""Placement history in SQLite: what a cluster held where, over time, changes only.

`HistoryRecorder` subscribes to a balancer's events and writes, on a thread of its own fed by a bounded
queue (the optimizer never waits on disk): every observed placement change (`placements_changed`: node,
model, placement, VRAM held, context), every move and its outcome, node up/down/restart/added/removed and
GPU lost/back. Nothing is written per health check, only per change, so an idle cluster's file does not
grow; a session row (when recording started, a heartbeat every minute, when it ended) says which time was
watched at all. Each batch of observations is one committed transaction (WAL, synchronous FULL): a crash
loses at most what was still queued, and SQLite's journal keeps the file readable. Rows older than the
retention are pruned at start and every hour, except the last one per (node, model) and per (node, kind),
which say the state at the start of the window.

A file that cannot be opened or written (read-only, full disk, not a database) turns history off with ONE
`history_warning` event; the balancer and the optimizer carry on as if there were no history.

`History(path).summary(...)` reads it back (its own connection; the writer may be running in another
process) and computes shares, fallbacks, moves and a timeline with flockparse/timeline.py.
"""

from __future__ import annotations

import logging
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flockparse.events import Event
from flockparse.rules import matches_priority, model_key
from flockparse.timeline import (
    CAUSE_MOVE,
    CPU,
    GPU,
    NODE_KINDS,
    NOT_LOADED,
    UNKNOWN,
    MoveAttribution,
    MoveRow,
    NodeRow,
    PlacementRow,
    Rows,
    Span,
    Summary,
    placement_of,
    summarize,
)

logger = logging.getLogger(__name__)

FILE_NAME = "history.sqlite"
DEFAULT_RETENTION_DAYS = 30.0
QUEUE_MAX = 10_000  # observations waiting for the writer; beyond it they are dropped (and counted)
BATCH_MAX = 1_000  # observations committed in one transaction
HEARTBEAT_S = 60.0  # a session's `alive` is updated this often (what a crash leaves as its end)
PRUNE_EVERY_S = 3600.0
CLOSE_WAIT_S = 5.0  # at exit, what is queued gets this long to be committed (milliseconds, normally)
BUSY_TIMEOUT_MS = 5_000  # another process writing the same file (two consoles) waits, does not fail
DETAIL_MAX = 300  # characters of an event's message kept with a node row
MOVE_KINDS = ("move_finished", "move_failed", "model_unloaded")
RECORDED_KINDS = frozenset(("placements_changed", "move_started", *MOVE_KINDS, *NODE_KINDS))

SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    id INTEGER PRIMARY KEY, started REAL NOT NULL, alive REAL NOT NULL, ended REAL, pid INTEGER);
CREATE TABLE IF NOT EXISTS placements (
    t REAL NOT NULL, node TEXT NOT NULL, model TEXT NOT NULL, placement TEXT NOT NULL, location TEXT,
    gpu_percent INTEGER, vram_mb REAL, size_mb REAL, context_length INTEGER, cause TEXT NOT NULL DEFAULT '');
CREATE INDEX IF NOT EXISTS placements_t ON placements (t);
CREATE TABLE IF NOT EXISTS node_events (
    t REAL NOT NULL, node TEXT NOT NULL, kind TEXT NOT NULL, detail TEXT NOT NULL DEFAULT '');
CREATE INDEX IF NOT EXISTS node_events_t ON node_events (t);
CREATE TABLE IF NOT EXISTS moves (
    t REAL NOT NULL, started REAL, node TEXT NOT NULL, model TEXT NOT NULL, target TEXT, source TEXT,
    ok INTEGER NOT NULL, reason TEXT, location TEXT, vram_mb REAL);
CREATE INDEX IF NOT EXISTS moves_t ON moves (t);
PRAGMA user_version = 1;
"""

_FLUSH = object()
_STOP = object()


class HistoryError(Exception):
    """The history file cannot be read; one line for the user."""


def _reason(exc: BaseException) -> str:
    return (exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)) or type(exc).__name__


def connect(path: Path) -> sqlite3.Connection:
    """The file, created 0600 with its schema, in WAL mode with durable commits."""
    path.parent.mkdir(parents=True, exist_ok=True)
    os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))  # private: it names hosts and models
    conn = sqlite3.connect(
        path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None, check_same_thread=False
    )
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.executescript(SCHEMA)
    except BaseException:
        conn.close()
        raise
    return conn


class HistoryRecorder:
    """Events -> SQLite rows on a writer thread; `on_event` only filters and queues (it never blocks)."""

    def __init__(
        self,
        path: Path | str,
        retention_days: float = DEFAULT_RETENTION_DAYS,
        emit: Callable[[Event], None] | None = None,
        clock: Callable[[], float] = time.time,
        queue_max: int = QUEUE_MAX,
    ) -> None:
        self.path = Path(path)
        self.retention_s = float(retention_days) * 86400
        self._emit = emit
        self._clock = clock
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=queue_max)
        self._off = threading.Event()
        self._lock = threading.Lock()  # guards the counters below
        self.written = 0
        self.dropped = 0
        self.error: str | None = None
        self._moves = MoveAttribution()  # writer thread only
        self._last: dict[tuple[str, str], str] = {}  # (node, model) -> the placement last written (writer)
        self._thread: threading.Thread | None = None
        self._started_at = clock()
        self._unsubscribe: Callable[[], None] | None = None

    # ------------------------------------------------------------------ lifecycle
    def attach(self, balancer: Any) -> HistoryRecorder:
        """Record `balancer`'s events from now on (its warnings go to its event bus); starts the writer."""
        if self._emit is None:
            self._emit = balancer.events.emit
        self._unsubscribe = balancer.subscribe(self.on_event)
        return self.start()

    def start(self) -> HistoryRecorder:
        if self._thread is None:
            self._started_at = self._clock()  # recording starts now, though the file opens in a moment
            self._thread = threading.Thread(target=self._run, name="history-writer", daemon=True)
            self._thread.start()
        return self

    def close(self, timeout: float = CLOSE_WAIT_S) -> None:
        """Stop recording: what is queued is written, the session is marked ended (bounded wait)."""
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        if self._thread is None:
            return
        try:
            self._queue.put(_STOP, timeout=timeout)
        except queue.Full:
            return
        self._thread.join(timeout)

    @property
    def enabled(self) -> bool:
        return not self._off.is_set()

    def status(self) -> dict[str, Any]:
        with self._lock:
            return {
                "path": str(self.path),
                "enabled": self.enabled,
                "written": self.written,
                "dropped": self.dropped,
                "queued": self._queue.qsize(),
                "error": self.error,
            }

    # ------------------------------------------------------------------ the subscriber (emitting thread)
    def on_event(self, event: Event) -> None:
        """Queue an observation; a full queue drops it (counted), a dead file ignores it."""
        if event.kind not in RECORDED_KINDS or self._off.is_set():
            return
        try:
            self._queue.put_nowait(event)
        except queue.Full:
            with self._lock:
                self.dropped += 1
                first = self.dropped == 1
            if first:
                logger.warning(
                    "history is behind: observations dropped (queue of %d full)", self._queue.maxsize
                )

    def flush(self, timeout: float = CLOSE_WAIT_S) -> bool:
        """Wait (bounded) until what was queued before this call is committed; False on timeout or off."""
        if self._off.is_set() or self._thread is None:
            return False
        done = threading.Event()
        try:
            self._queue.put((_FLUSH, done), timeout=timeout)
        except queue.Full:
            return False
        return done.wait(timeout) and not self._off.is_set()

    # ------------------------------------------------------------------ the writer thread
    def _run(self) -> None:
        try:
            conn = self._connect()
        except (sqlite3.Error, OSError) as exc:
            self._turn_off(f"cannot open {self.path} ({_reason(exc)})")
            return
        try:
            self._write_loop(conn)
        except (sqlite3.Error, OSError) as exc:
            self._turn_off(f"cannot write {self.path} ({_reason(exc)})")
        finally:
            conn.close()

    def _connect(self) -> sqlite3.Connection:
        return connect(self.path)

    def _write_loop(self, conn: sqlite3.Connection) -> None:
        now = self._clock()
        session = conn.execute(
            "INSERT INTO sessions (started, alive, pid) VALUES (?, ?, ?)",
            (self._started_at, now, os.getpid()),
        ).lastrowid
        self._prune(conn, now)
        next_beat, next_prune = time.monotonic() + HEARTBEAT_S, time.monotonic() + PRUNE_EVERY_S
        while True:
            wait = max(0.0, min(next_beat, next_prune) - time.monotonic())
            batch = self._take_batch(wait)
            events = [item for item in batch if isinstance(item, Event)]
            if events:
                written = self._write(conn, events)
                with self._lock:
                    self.written += written
            now = self._clock()
            if time.monotonic() >= next_beat:
                conn.execute("UPDATE sessions SET alive = ? WHERE id = ?", (now, session))
                next_beat = time.monotonic() + HEARTBEAT_S
            if time.monotonic() >= next_prune:
                self._prune(conn, now)
                next_prune = time.monotonic() + PRUNE_EVERY_S
            for item in batch:
                if isinstance(item, tuple) and item[0] is _FLUSH:
                    item[1].set()
            if any(item is _STOP for item in batch):
                conn.execute("UPDATE sessions SET alive = ?, ended = ? WHERE id = ?", (now, now, session))
                return

    def _take_batch(self, wait: float) -> list[Any]:
        try:
            batch = [self._queue.get(timeout=wait)]
        except queue.Empty:
            return []
        while len(batch) < BATCH_MAX and batch[-1] is not _STOP:
            try:
                batch.append(self._queue.get_nowait())
            except queue.Empty:
                break
        return batch

    def _write(self, conn: sqlite3.Connection, events: list[Event]) -> int:
        placements: list[tuple] = []
        nodes: list[tuple] = []
        moves: list[tuple] = []
        for event in events:
            self._rows(event, placements, nodes, moves)
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.executemany(
                "INSERT INTO placements (t, node, model, placement, location, gpu_percent, vram_mb, size_mb, "
                "context_length, cause) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                placements,
            )
            conn.executemany("INSERT INTO node_events (t, node, kind, detail) VALUES (?, ?, ?, ?)", nodes)
            conn.executemany(
                "INSERT INTO moves (t, started, node, model, target, source, ok, reason, location, vram_mb) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                moves,
            )
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return len(placements) + len(nodes) + len(moves)

    def _rows(self, event: Event, placements: list[tuple], nodes: list[tuple], moves: list[tuple]) -> None:
        node, data = event.node or "", event.data or {}
        if event.kind == "placements_changed":
            models = data.get("models") or {}
            for key in data.get("changed") or []:
                model = models.get(key)
                placement = placement_of(model.get("location")) if model else NOT_LOADED
                cause = self._moves.cause(node, key, placement)
                self._last[(node, key)] = placement
                fields = model or {}
                placements.append((
                    event.time, node, key, placement, fields.get("location"), fields.get("gpu_percent"),
                    fields.get("vram_mb"), fields.get("size_mb"), fields.get("context_length"), cause,
                ))  # fmt: skip
        elif event.kind in NODE_KINDS:
            nodes.append((event.time, node, event.kind, (event.message or "")[:DETAIL_MAX]))
        elif event.kind == "move_started" and event.model:
            self._moves.started(node, model_key(event.model), str(data.get("target", "")), event.time)
        elif event.kind in MOVE_KINDS and event.model:
            key = model_key(event.model)
            ok = event.kind != "move_failed"
            started = self._moves.finished(node, key, ok)
            moves.append((
                event.time, started, node, key, data.get("target"), data.get("source"), int(ok),
                data.get("reason"), data.get("location"), data.get("vram_mb"),
            ))  # fmt: skip
            if ok and data.get("reason") != "already":  # a verified move is an observation too: the
                # history shows it at once, not at the next health check
                where = NOT_LOADED if event.kind == "model_unloaded" else placement_of(data.get("location"))
                if where != UNKNOWN and self._last.get((node, key)) != where:  # a check saw it already
                    self._last[(node, key)] = where
                    percent = {GPU: 100, CPU: 0}.get(where)
                    placements.append((
                        event.time, node, key, where, data.get("location"), percent, data.get("vram_mb"),
                        None, None, CAUSE_MOVE,
                    ))  # fmt: skip

    def _prune(self, conn: sqlite3.Connection, now: float) -> None:
        """Drop rows older than the retention, keeping the last per (node, model) and per (node, kind)."""
        cutoff = now - self.retention_s
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.execute(
                "DELETE FROM placements WHERE t < ?1 AND rowid NOT IN "
                "(SELECT max(rowid) FROM placements WHERE t < ?1 GROUP BY node, model)",
                (cutoff,),
            )
            conn.execute(
                "DELETE FROM node_events WHERE t < ?1 AND rowid NOT IN "
                "(SELECT max(rowid) FROM node_events WHERE t < ?1 GROUP BY node, kind)",
                (cutoff,),
            )
            conn.execute("DELETE FROM moves WHERE t < ?", (cutoff,))
            conn.execute("DELETE FROM sessions WHERE coalesce(ended, alive) < ?", (cutoff,))
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    def _turn_off(self, reason: str) -> None:
        """Once: no more history this run, one warning event; queued flushes are released."""
        if self._off.is_set():
            return
        self._off.set()
        message = f"no placement history from now on: {reason}"
        with self._lock:
            self.error = message
        logger.warning("%s", message)
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, tuple) and item[0] is _FLUSH:
                item[1].set()
        if self._emit is not None:
            self._emit(Event("history_warning", message=message, data={"path": str(self.path)}))


class History:
    """Reads a history file (written by this process or another) and summarises a window of it."""

    def __init__(self, path: Path | str, before_read: Callable[[], Any] | None = None) -> None:
        self.path = Path(path)
        self._before_read = before_read  # e.g. the local recorder's flush: include what was just seen

    def summary(
        self,
        since_s: float = 86400.0,
        node: str | None = None,
        model: str | None = None,
        until: float | None = None,
        buckets: int = 48,
    ) -> Summary:
        """Shares, fallbacks, moves and a `buckets`-long timeline per (node, model) and per node over the
        last `since_s` seconds before `until` (now); only `node` and/or models matching `model` (a name or
        glob, `llama3.1` = `llama3.1:latest`). Raises HistoryError when the file cannot be read."""
        if self._before_read is not None:
            self._before_read()
        until = time.time() if until is None else until
        since = until - since_s
        rows = self.rows(since, until)
        summary = summarize(rows, since, until, buckets)
        if node is None and model is None:
            return summary
        pairs = [
            p for p in summary.pairs
            if (node is None or p.node == node) and (model is None or matches_priority(p.model, [model]))
        ]  # fmt: skip
        kept_nodes = {p.node for p in pairs} if model is not None else {node}
        nodes = [n for n in summary.nodes if n.node in kept_nodes]
        return Summary(summary.since, summary.until, pairs, nodes, summary.recorded_s)

    def rows(self, since: float, until: float) -> Rows:
        """Every row of [since, until], the last ones before `since` and all sessions."""
        if not self.path.is_file():
            return Rows()
        try:
            conn = sqlite3.connect(f"{self.path.resolve().as_uri()}?mode=ro", uri=True, timeout=5.0)
        except sqlite3.Error as exc:
            raise HistoryError(f"cannot read {self.path} ({_reason(exc)})") from None
        try:
            return _read_rows(conn, since, until)
        except sqlite3.Error as exc:
            raise HistoryError(f"cannot read {self.path} ({_reason(exc)})") from None
        finally:
            conn.close()


def _read_rows(conn: sqlite3.Connection, since: float, until: float) -> Rows:
    if not conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'sessions'").fetchone():
        return Rows()  # created, schema not written yet
    sessions = []
    for started, alive, ended in conn.execute("SELECT started, alive, ended FROM sessions"):
        if ended is not None:
            end = ended
        elif alive >= until - 2 * HEARTBEAT_S:  # recording now (heartbeat within two minutes)
            end = until
        else:  # ended without closing (killed): its last heartbeat
            end = alive
        sessions.append(Span(started, end))
    placements = [
        PlacementRow(t, node, model, placement, cause)
        for node, model, placement, cause, t in conn.execute(
            "SELECT node, model, placement, cause, max(t) FROM placements WHERE t < ? GROUP BY node, model",
            (since,),
        )
    ]
    placements += [
        PlacementRow(t, node, model, placement, cause)
        for t, node, model, placement, cause in conn.execute(
            "SELECT t, node, model, placement, cause FROM placements WHERE t >= ? AND t <= ? ORDER BY t",
            (since, until),
        )
    ]
    nodes = [
        NodeRow(t, node, kind)
        for node, kind, t in conn.execute(
            "SELECT node, kind, max(t) FROM node_events WHERE t < ? GROUP BY node, kind", (since,)
        )
    ]
    nodes += [
        NodeRow(t, node, kind)
        for t, node, kind in conn.execute(
            "SELECT t, node, kind FROM node_events WHERE t >= ? AND t <= ? ORDER BY t", (since, until)
        )
    ]
    moves = [
        MoveRow(t, node, model, target or "", source or "", bool(ok), reason or "")
        for t, node, model, target, source, ok, reason in conn.execute(
            "SELECT t, node, model, target, source, ok, reason FROM moves WHERE t >= ? AND t <= ? ORDER BY t",
            (since, until),
        )
    ]
    return Rows(sessions, nodes, placements, moves)
