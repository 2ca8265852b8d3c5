"""How big history.sqlite grows (issue 11): changes only, so 200 idle nodes cost nothing per check.

    python3 bench/history_size.py        # about half a minute

1. Live: 200 simulated nodes (bench/sim_farm.py, two models each on GPU, kept 24 h) checked every second
   by a balancer whose HistoryRecorder writes to a temporary file; after the first snapshot, rows and bytes
   written over a window of idle health checks (goal: none).
2. Scripted week: the recorder fed a week of events for 200 nodes with a simulated clock, as the agent
   emits them: a first snapshot (3 models per node), then each day a client's model expiring at night and
   reloaded in the morning, one priority model falling to a split in the afternoon and moved back by the
   optimizer, and one Ollama restart per node per week followed by the warm-up's two moves. Bytes per day
   of the file (after its last commit, schema excluded), and the same week with nothing changing.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from sim_farm import Farm

from flockparse.balancer import OllamaLoadBalancer
from flockparse.events import Event
from flockparse.history import HistoryRecorder
from gpu_controller import GPUController

NODES = 200
DAY = 86400.0
WEEK_START = 1_800_000_000.0  # a fixed date: the file's size must not depend on when it runs
ROW = {
    "mxbai-embed-large:latest": {"location": "GPU (VRAM)", "gpu_percent": 100, "vram_mb": 1100.0,
                                 "size_mb": 1100.0, "context_length": 512},
    "llama3.1:latest": {"location": "GPU (VRAM)", "gpu_percent": 100, "vram_mb": 9044.8, "size_mb": 9044.8,
                        "context_length": 32768},
    "codellama:latest": {"location": "GPU (VRAM)", "gpu_percent": 100, "vram_mb": 7000.0, "size_mb": 7000.0,
                         "context_length": 16384},
}  # fmt: skip
SPLIT = {"location": "Split (62% GPU)", "gpu_percent": 62, "vram_mb": 5607.8}


class CountingController(GPUController):
    """Counts the /api/ps reads (every health check is one)."""

    def __init__(self) -> None:
        super().__init__()
        self.reads = 0
        self._lock = threading.Lock()

    def poll_status(self, node_url: str, done: Callable, path: str = "/api/ps") -> bool:
        """Every /api/ps read goes through here (the health checks' included)."""
        if path == "/api/ps":
            with self._lock:
                self.reads += 1
        return super().poll_status(node_url, done, path)


def file_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in (path, Path(f"{path}-wal")) if p.exists())


def rows(path: Path) -> int:
    with contextlib.closing(sqlite3.connect(path)) as conn:  # closed: the writer's close checkpoints the WAL
        return sum(
            conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0]
            for t in ("placements", "node_events", "moves")
        )


# --------------------------------------------------------------------------------------------- 1
def live_idle(window_s: float = 15.0, health_interval: float = 1.0) -> dict:
    with (
        tempfile.TemporaryDirectory() as tmp,
        Farm(NODES, procs=1, preload=["mxbai-embed-large@gpu", "llama3.1@gpu"], keep_alive="24h") as farm,
    ):
        path = Path(tmp) / "history.sqlite"
        controller = CountingController()
        lb = OllamaLoadBalancer(
            farm.urls,
            auto_optimize_gpu=False,
            health_interval=health_interval,
            start=False,
            controller=controller,
        )
        recorder = HistoryRecorder(path).attach(lb)
        try:
            lb.start()
            deadline = time.monotonic() + 120
            while recorder.status()["written"] < 3 * NODES and time.monotonic() < deadline:
                threading.Event().wait(0.2)  # node_up and two placements per node: the first snapshot
            recorder.flush()
            snapshot_rows, snapshot_bytes, checks_before = rows(path), file_bytes(path), controller.reads
            threading.Event().wait(window_s)
            recorder.flush()
            after_rows, after_bytes, checks = rows(path), file_bytes(path), controller.reads - checks_before
        finally:
            recorder.close()
            lb.close()
    return {
        "nodes": NODES,
        "health_interval_s": health_interval,
        "window_s": window_s,
        "checks": checks,
        "snapshot_rows": snapshot_rows,
        "rows_written_in_window": after_rows - snapshot_rows,
        "bytes_written_in_window": after_bytes - snapshot_bytes,
        "goal": "0 rows per idle check",
        "met": after_rows == snapshot_rows,
    }


# --------------------------------------------------------------------------------------------- 2
def placements(t: float, node: str, now: dict, before: dict) -> Event:
    changed = sorted(k for k in now.keys() | before.keys() if now.get(k) != before.get(k))
    return Event(
        "placements_changed", node=node, time=t, data={"models": now, "previous": before, "changed": changed}
    )


def move(t: float, node: str, model: str, then: dict, before: dict) -> Iterator[Event]:
    data = {"target": "GPU", "source": "optimizer"}
    yield Event("move_started", node=node, model=model, time=t, data=dict(data))
    yield placements(t + 4, node, then, before)
    yield Event("move_finished", node=node, model=model, time=t + 5,
                data={**data, "reason": "moved", "location": "GPU (VRAM)", "vram_mb": 9044.8})  # fmt: skip


def node_week(index: int, busy: bool) -> Iterator[Event]:
    node = f"http://10.0.{index // 250}.{index % 250}:11434"
    held = dict(ROW)
    yield Event("node_up", node=node, time=WEEK_START + index)
    yield placements(WEEK_START + index, node, held, {})
    if not busy:
        return
    for day in range(7):
        start = WEEK_START + day * DAY + index
        if day == index % 7:  # Ollama restarts (an upgrade): nothing loaded, the warm-up loads two back
            yield Event("node_restarted", node=node, time=start + 3 * 3600)
            yield placements(start + 3 * 3600, node, {}, held)
            warm = {"mxbai-embed-large:latest": ROW["mxbai-embed-large:latest"]}
            yield from move(start + 3 * 3600 + 1, node, "mxbai-embed-large:latest", warm, {})
            yield from move(
                start + 3 * 3600 + 10,
                node,
                "llama3.1:latest",
                {**warm, "llama3.1:latest": ROW["llama3.1:latest"]},
                warm,
            )
            held = {**warm, "llama3.1:latest": ROW["llama3.1:latest"]}
        night = {k: v for k, v in held.items() if k != "codellama:latest"}
        if night != held:
            yield placements(start + 1 * 3600, node, night, held)  # the client's model expires at night
        held, morning = night, {**night, "codellama:latest": ROW["codellama:latest"]}
        yield placements(start + 9 * 3600, node, morning, held)  # and is loaded again in the morning
        fell = {**morning, "llama3.1:latest": {**ROW["llama3.1:latest"], **SPLIT}}
        yield placements(start + 14 * 3600, node, fell, morning)  # a training job: llama3.1 reloads split
        yield from move(start + 14 * 3600 + 300, node, "llama3.1:latest", morning, fell)
        held = morning


def scripted_week(busy: bool) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "history.sqlite"
        empty = HistoryRecorder(Path(tmp) / "empty.sqlite").start()
        empty.flush()
        empty.close()
        schema_bytes = file_bytes(Path(tmp) / "empty.sqlite")
        clock = [WEEK_START]
        recorder = HistoryRecorder(path, clock=lambda: clock[0]).start()
        events = sorted((e for i in range(NODES) for e in node_week(i, busy)), key=lambda e: e.time)
        first = [e for e in events if e.time < WEEK_START + NODES]  # every node's first check
        for event in first:
            recorder.on_event(event)
        recorder.flush(60)
        snapshot_rows = rows(path)
        rest = events[len(first) :]
        for start in range(0, len(rest), 5000):
            for event in rest[start : start + 5000]:
                recorder.on_event(event)
            recorder.flush(60)
        clock[0] = WEEK_START + 7 * DAY
        recorded = rows(path)
        recorder.close()
        size = file_bytes(path)
        with tempfile.TemporaryDirectory() as only:  # the snapshot alone, to tell it from the week's growth
            alone = HistoryRecorder(Path(only) / "h.sqlite", clock=lambda: WEEK_START).start()
            for event in first:
                alone.on_event(event)
            alone.close()
            snapshot_bytes = file_bytes(Path(only) / "h.sqlite")
    assert recorder.status()["dropped"] == 0
    growth = size - snapshot_bytes
    return {
        "nodes": NODES,
        "events": len(events),
        "snapshot_rows": snapshot_rows,
        "rows_after_snapshot": recorded - snapshot_rows,
        "file_bytes": size,
        "snapshot_bytes": snapshot_bytes - schema_bytes,
        "bytes_per_day": round(growth / 7),
        "bytes_per_node_per_day": round(growth / 7 / NODES, 1),
        "mb_per_30_days": round(growth / 7 * 30 / 1024 / 1024, 1),
    }


def bench() -> dict:
    """All three figures (bench/run_all.py records them with the others)."""
    results = {
        "scripted_busy_week": scripted_week(busy=True),
        "scripted_idle_week": scripted_week(busy=False),
    }
    results["live_idle_checks"] = live_idle()
    results["goal"] = "0 rows per idle check"
    results["met"] = (
        results["live_idle_checks"]["met"] and results["scripted_idle_week"]["bytes_per_day"] == 0
    )
    return results


def main() -> int:
    results = bench()
    print(json.dumps(results, indent=2))
    return 0 if results["met"] else 1


if __name__ == "__main__":
    sys.exit(main())
