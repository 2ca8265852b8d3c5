"""History in SQLite (flockparse/history.py): what is recorded, shares over a real scenario on simulated
nodes, a writer killed mid-write, a file that cannot be written, retention."""

from __future__ import annotations

import os
import signal
import sqlite3
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from helpers import LLAMA, Recorder, wait_until

from flockparse.events import Event
from flockparse.history import History, HistoryRecorder
from flockparse.timeline import CPU, GPU, NOT_LOADED, OFFLINE, SPLIT, placement_of

N = "http://10.0.0.1:11434"
GPU_ROW = {"location": "GPU (VRAM)", "gpu_percent": 100, "vram_mb": 9000.0, "size_mb": 9000.0,
           "context_length": 32768}  # fmt: skip
CPU_ROW = {**GPU_ROW, "location": "CPU (RAM)", "gpu_percent": 0, "vram_mb": 0.0}


def placements(t: float, models: dict, previous: dict, node: str = N) -> Event:
    changed = sorted(k for k in models.keys() | previous.keys() if models.get(k) != previous.get(k))
    return Event(
        "placements_changed",
        node=node,
        time=t,
        data={"models": models, "previous": previous, "changed": changed},
    )


def count(path: Path, table: str) -> int:
    with sqlite3.connect(path) as conn:
        return conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]


def test_changes_and_moves_are_recorded_and_read_back(tmp_path: Path) -> None:
    path = tmp_path / "history.sqlite"
    t0 = time.time() - 1000
    recorder = HistoryRecorder(path, clock=lambda: t0).start()
    recorder.on_event(Event("node_up", node=N, time=t0))
    recorder.on_event(placements(t0, {LLAMA: GPU_ROW}, {}))
    recorder.on_event(Event("pass_finished", time=t0 + 1))  # not a placement: not recorded
    recorder.on_event(placements(t0 + 400, {LLAMA: CPU_ROW}, {LLAMA: GPU_ROW}))
    recorder.on_event(Event("move_started", node=N, model="llama3.1:latest", time=t0 + 690,
                            data={"target": "GPU", "source": "optimizer"}))  # fmt: skip
    recorder.on_event(placements(t0 + 700, {LLAMA: GPU_ROW}, {LLAMA: CPU_ROW}))
    recorder.on_event(Event("move_finished", node=N, model="llama3.1:latest", time=t0 + 701,
                            data={"target": "GPU", "source": "optimizer", "reason": "moved",
                                  "location": "GPU (VRAM)"}))  # fmt: skip
    # the user's force_cpu, verified by the move itself at 800, then seen by a check at 805
    recorder.on_event(Event("move_started", node=N, model="llama3.1:latest", time=t0 + 795,
                            data={"target": "CPU", "source": "user"}))  # fmt: skip
    recorder.on_event(Event("move_finished", node=N, model="llama3.1:latest", time=t0 + 800,
                            data={"target": "CPU", "source": "user", "reason": "moved",
                                  "location": "CPU (RAM)"}))  # fmt: skip
    recorder.on_event(placements(t0 + 805, {LLAMA: CPU_ROW}, {LLAMA: GPU_ROW}))
    assert recorder.flush()
    recorder.close()

    assert count(path, "node_events") == 1
    with sqlite3.connect(path) as conn:
        rows = list(conn.execute("SELECT t - ?, placement, cause FROM placements ORDER BY t", (t0,)))
        started = [row[0] - t0 for row in conn.execute("SELECT started FROM moves ORDER BY t")]
    # the first move's change was seen by a check during the move (its own row would say nothing new);
    # the second one's by the move first: the check after it is marked as the move's too
    assert [(round(t), p, c) for t, p, c in rows] == [
        (0, "gpu", ""), (400, "cpu", ""), (700, "gpu", "move"), (800, "cpu", "move"), (805, "cpu", "move")
    ]  # fmt: skip
    assert started == pytest.approx([690, 795])
    summary = History(path).summary(since_s=1000, until=t0 + 1000)
    [pair] = summary.pairs
    assert (pair.node, pair.model) == (N, LLAMA)
    assert pair.shares[GPU] == pytest.approx(0.5)
    assert pair.shares[CPU] == pytest.approx(0.5)
    assert (pair.fallbacks, pair.moves) == (1, 2)  # the user's force_cpu is not a fall
    assert History(path).summary(since_s=1000, until=t0 + 1000, model="llama3.1").pairs == [pair]
    assert History(path).summary(since_s=1000, until=t0 + 1000, model="llama3.2").pairs == []
    assert History(path).summary(since_s=1000, until=t0 + 1000, node="http://other:11434").pairs == []


def test_the_file_is_private_and_a_missing_file_reads_as_empty(tmp_path: Path) -> None:
    assert History(tmp_path / "none.sqlite").summary().pairs == []
    path = tmp_path / "history.sqlite"
    recorder = HistoryRecorder(path).start()
    assert recorder.flush()
    recorder.close()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_history_of_a_fallback_a_move_and_the_recovery_on_a_simulated_node(
    tmp_path, sim_node, make_balancer
) -> None:
    """llama3.1 on GPU; Ollama restarts while a training job holds 20 of 24 GB, and the next request loads
    it split; the job ends and force_gpu moves it back. The shares match the times the events were seen."""
    node = sim_node(vram_gb=24, preload=[("llama3.1", "gpu")])
    lb = make_balancer([node.url], gpu_priority_models=["llama3.1"], start=False)
    path = tmp_path / "history.sqlite"
    recorder = HistoryRecorder(path).attach(lb)
    events = Recorder(lb)
    lb.start()

    def llama_placements() -> list[tuple[float, str]]:
        """What was observed of llama3.1: by health checks, and by a move's own verification."""
        seen = [
            (e.time, placement_of((e.data["models"].get(LLAMA) or {}).get("location")) if
             LLAMA in e.data["models"] else NOT_LOADED)
            for e in events.of("placements_changed") if LLAMA in e.data["changed"]
        ]  # fmt: skip
        seen += [(e.time, placement_of(e.data["location"])) for e in events.of("move_finished")]
        return sorted(seen)

    wait_until(lambda: [p for _, p in llama_placements()] == [GPU], "llama3.1 seen on GPU")
    node.external_vram_gb = 20  # a training job
    node.restart()
    wait_until(lambda: llama_placements()[-1][1] == NOT_LOADED, "the restart seen: nothing loaded")
    lb.generate("llama3.1", "hello")  # the next client loads it, automatically placed
    wait_until(lambda: llama_placements()[-1][1] in (SPLIT, CPU), "llama3.1 seen split or on CPU")
    node.external_vram_gb = 0  # the job ends; Ollama moves nothing by itself
    [result] = lb.force_gpu_all_nodes("llama3.1")
    assert result["result"]["reason"] == "moved"
    wait_until(lambda: llama_placements()[-1][1] == GPU, "llama3.1 seen on GPU again")
    assert recorder.flush()
    until = time.time()
    seen = llama_placements()
    since = seen[0][0]

    [pair] = History(path).summary(since_s=until - since, until=until).pairs

    expected = dict.fromkeys((GPU, SPLIT, CPU, NOT_LOADED, OFFLINE), 0.0)
    for (start, placement), (end, _) in zip(seen, [*seen[1:], (until, None)], strict=True):
        expected[placement] += end - start
    for down in events.of("node_down"):  # a check that hit the restart: that time is offline
        up = min(e.time for e in events.of("node_up") if e.time > down.time)
        expected[OFFLINE] += up - down.time
        expected[NOT_LOADED] -= up - down.time
    for category, seconds in expected.items():
        assert pair.seconds[category] == pytest.approx(seconds, abs=1e-3), category
    assert pair.fallbacks == 1
    assert pair.moves == 1
    assert pair.now == GPU
    assert pair.timeline[0] == GPU
    assert {SPLIT, CPU} & set(pair.timeline)
    recorder.close()


CHILD = """
import sys, time
from flockparse.events import Event
from flockparse.history import HistoryRecorder

recorder = HistoryRecorder(sys.argv[1]).start()
row = {"location": "GPU (VRAM)", "gpu_percent": 100, "vram_mb": 1.0, "size_mb": 1.0, "context_length": 4}
i = 0
while True:
    for _ in range(20):
        i += 1
        model = f"m{i}:latest"
        recorder.on_event(Event("placements_changed", node="http://n:1", time=time.time(),
                                data={"models": {model: row}, "previous": {}, "changed": [model]}))
    if not recorder.flush(10):
        sys.exit(3)
    print(i, flush=True)
"""


def test_a_writer_killed_mid_write_leaves_a_readable_database_with_every_committed_row(tmp_path) -> None:
    path = tmp_path / "history.sqlite"
    child = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(CHILD), str(path)], stdout=subprocess.PIPE, text=True
    )
    committed = 0
    try:
        while committed < 400:  # the child prints how many observations are committed, after each flush
            line = child.stdout.readline()
            assert line, f"the writer ended early (exit {child.poll()})"
            committed = int(line)
        os.kill(child.pid, signal.SIGKILL)  # while it goes on writing
    finally:
        child.kill()
        child.wait(10)
    assert child.returncode == -signal.SIGKILL

    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        rows = conn.execute("SELECT count(*) FROM placements").fetchone()[0]
    assert rows >= committed
    summary = History(path).summary(since_s=3600)
    assert len(summary.pairs) == rows


def test_an_unwritable_file_turns_history_off_with_one_warning(tmp_path, sim_node, make_balancer) -> None:
    """Its directory is a file: one `history_warning` event; the balancer keeps checking and moving."""
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    node = sim_node(vram_gb=24, preload=[("llama3.1", "cpu")])
    lb = make_balancer([node.url], start=False)
    events = Recorder(lb)
    recorder = HistoryRecorder(blocker / "history.sqlite").attach(lb)
    lb.start()
    [warning] = events.wait("history_warning")
    assert "no placement history from now on" in warning.message and "not-a-dir" in warning.message
    [result] = lb.force_gpu_all_nodes("llama3.1")
    assert result["result"]["reason"] == "moved"
    assert not recorder.flush()
    assert len(events.of("history_warning")) == 1
    recorder.close()


class TinyDisk(HistoryRecorder):
    """A disk that fills up: SQLite's page cap gives the same SQLITE_FULL a full file system gives."""

    def _connect(self) -> sqlite3.Connection:
        conn = super()._connect()
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
        conn.execute(f"PRAGMA max_page_count = {pages + 2}")
        return conn


def test_a_full_disk_turns_history_off_once_and_later_events_are_ignored(tmp_path) -> None:
    warnings: list[Event] = []
    recorder = TinyDisk(tmp_path / "history.sqlite", emit=warnings.append).start()
    row = {**GPU_ROW, "location": "GPU (VRAM)"}
    for i in range(2000):
        recorder.on_event(placements(time.time(), {f"model-{i}:latest": row}, {}))
        if i % 100 == 99:
            recorder.flush()
    wait_until(lambda: warnings, "the history warning")
    assert len(warnings) == 1
    assert "full" in warnings[0].message
    assert not recorder.enabled
    recorder.on_event(placements(time.time(), {"late:latest": row}, {}))  # ignored, no second warning
    assert len(warnings) == 1
    recorder.close()


def test_retention_prunes_old_rows_but_keeps_the_state_they_leave(tmp_path) -> None:
    """40 days ago llama3.1 went to GPU and stayed: after pruning the file still says it is on GPU."""
    path = tmp_path / "history.sqlite"
    now = time.time()
    old = now - 40 * 86400
    first = HistoryRecorder(path, clock=lambda: old).start()
    first.on_event(Event("node_up", node=N, time=old))
    first.on_event(placements(old, {LLAMA: CPU_ROW}, {}))
    first.on_event(placements(old + 10, {LLAMA: GPU_ROW}, {LLAMA: CPU_ROW}))
    assert first.flush()
    first._clock = lambda: now  # the console runs for 40 days; its next heartbeat is now
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE sessions SET alive = ?", (now,))
    first.close()
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE sessions SET ended = ?", (now,))

    second = HistoryRecorder(path, retention_days=30, clock=lambda: now).start()  # prunes at start
    assert second.flush()
    second.close()

    assert count(path, "placements") == 1  # the CPU row is gone, the last (GPU) one is kept
    [pair] = History(path).summary(since_s=86400, until=now).pairs
    assert pair.shares[GPU] == pytest.approx(1.0)


def test_a_file_that_is_not_a_database_is_one_warning_and_one_read_error(tmp_path) -> None:
    from flockparse.history import HistoryError

    path = tmp_path / "history.sqlite"
    path.write_bytes(b"this is not an SQLite file, it is somebody's notes\n" * 100)
    warnings: list[Event] = []
    recorder = HistoryRecorder(path, emit=warnings.append).start()
    wait_until(lambda: warnings, "the history warning")
    assert "not a database" in warnings[0].message
    recorder.close()
    with pytest.raises(HistoryError, match="cannot read"):
        History(path).summary()
