"""Measure the figures of issues #3 and #7 against the simulator and write bench/results/latest.json.

    python3 bench/run_all.py            # about a minute on 2 cores

1. one optimizer pass over 200 nodes with 50 ms added latency each, against the serial bound (10 s);
2. force_gpu wall time against the simulated load time (goal: at most 0.2 s over it);
3. a restarted node (nothing loaded, as real Ollama) until the warm-up has its priority models on GPU, at
   default settings (health every 5 s, pass every 300 s), from the node answering again; once with the
   downtime seen by a health check and once without (the restart noticed by its models vanishing);
4. bytes on the wire per node per idle health check (goal: at most 1.5 KB);
5. history.sqlite growth (bench/history_size.py): rows per idle health check of 200 nodes (goal: none),
   and bytes per day for a scripted week of 200 nodes.
6. serve (bench/serve.py, about a minute more): latency added over going direct (goal: p50 at most 2 ms),
   time to first chunk, requests per second with 64 clients, 256 concurrent streams held.
7. the simulator farm's CPU per kept-alive /api/ps reply (bench/farm_cost.py: 1,250 nodes in one process,
   128 connections, 20 ms latency), what the scale bench (bench/scale.py) costs on the farm's side.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import farm_cost
import history_size
import serve as serve_bench  # bench/serve.py (this script's directory is on sys.path)

from flockparse.balancer import OllamaLoadBalancer
from ollama_sim import GiB, SimNode

ROOT = Path(__file__).resolve().parent.parent

RESULTS = ROOT / "bench" / "results" / "latest.json"
LLAMA = "llama3.1:latest"
EMBED = "mxbai-embed-large:latest"


def wait_for(predicate: Callable[[], object], timeout: float, what: str) -> float:
    """Poll until true; returns the time.monotonic() at which it became true."""
    deadline = time.monotonic() + timeout
    pause = threading.Event()
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        pause.wait(0.01)
    return time.monotonic()


def on_gpu(node: SimNode, model: str) -> bool:
    return any(
        m["name"] == model and not m["stopping"] and m["size_vram"] == m["size"] > 0 for m in node.loaded()
    )


# --------------------------------------------------------------------------------------------- 1
def bench_pass_over_200_nodes(nodes: int = 200, latency_ms: float = 50.0, repeats: int = 5) -> dict:
    """Steady state (models already on GPU): a pass is one /api/ps per node, all nodes concurrently."""
    farm = subprocess.Popen(
        [sys.executable, str(ROOT / "bench" / "sim_farm.py"), "--nodes", str(nodes),
         "--latency-ms", str(latency_ms), "--preload", "llama3.1@gpu"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        urls = json.loads(farm.stdout.readline())["urls"]
        with OllamaLoadBalancer(urls, auto_optimize_gpu=False, gpu_priority_models=["llama3.1"]) as balancer:
            wait_for(lambda: all(s.online for s in balancer.node_states()), 60, "all nodes online")
            durations = []
            for _ in range(repeats):
                started = time.perf_counter()
                actions = balancer.optimize_gpu_once()
                durations.append(time.perf_counter() - started)
                assert actions == [], f"steady state must not move anything: {actions[:3]}"
    finally:
        farm.stdin.close()
        farm.wait(30)
    serial_bound = nodes * latency_ms / 1000
    median = statistics.median(durations)
    return {
        "nodes": nodes,
        "latency_ms": latency_ms,
        "serial_bound_s": serial_bound,
        "pass_s_median": round(median, 3),
        "pass_s_worst": round(max(durations), 3),
        "speedup_median": round(serial_bound / median, 1),
        "speedup_worst": round(serial_bound / max(durations), 1),
        "goal": "speedup >= 10",
        "met": serial_bound / max(durations) >= 10,
    }


# --------------------------------------------------------------------------------------------- 2
def bench_force_gpu_overhead(repeats: int = 3, seconds_per_gb: float = 0.5) -> dict:
    """Wall time of force_gpu_all_nodes on one node minus the time the simulator spends loading."""
    with (
        SimNode(load_seconds_per_gb=seconds_per_gb, preload=[("llama3.1", "cpu")]) as node,
        OllamaLoadBalancer([node.url], auto_optimize_gpu=False) as balancer,
    ):
        wait_for(lambda: balancer.node_state(node.url).online, 10, "node online")
        overheads, walls, loads = [], [], []
        for _ in range(repeats):
            started = time.perf_counter()
            [result] = balancer.force_gpu_all_nodes("llama3.1")
            wall = time.perf_counter() - started
            assert result["result"]["reason"] == "moved", result
            size = next(m["size"] for m in node.loaded() if m["name"] == LLAMA and not m["stopping"])
            load = seconds_per_gb * size / GiB
            walls.append(wall)
            loads.append(load)
            overheads.append(wall - load)
            [back] = balancer.force_cpu_all_nodes("llama3.1")  # CPU loads are timed too; not measured
            assert back["result"]["success"], back
    return {
        "load_seconds_per_gb": seconds_per_gb,
        "simulated_load_s": round(statistics.median(loads), 3),
        "wall_s_median": round(statistics.median(walls), 3),
        "overhead_s_median": round(statistics.median(overheads), 3),
        "overhead_s_worst": round(max(overheads), 3),
        "goal": "overhead <= 0.2 s",
        "met": max(overheads) <= 0.2,
    }


# --------------------------------------------------------------------------------------------- 3
def bench_restart_warm_up(downtime: float, trials: int = 3, seconds_per_gb: float = 0.5) -> dict:
    """Default settings (health every 5 s, pass every 300 s). A restarted Ollama has nothing loaded; the
    warm-up loads the priority models onto its GPU. Measured from the node answering again (restart()
    returns once it listens) until both are on GPU, against the simulated load time of the two models."""
    preload = [("mxbai-embed-large", "gpu"), ("llama3.1", "gpu")]
    times, load_s = [], 0.0
    with (
        SimNode(load_seconds_per_gb=seconds_per_gb, preload=preload) as node,
        OllamaLoadBalancer([node.url]) as balancer,  # defaults: health 5 s, pass every 300 s
    ):
        wait_for(lambda: balancer.optimizer_status()["last_pass"] is not None, 30, "start-up pass")
        load_s = seconds_per_gb * sum(m["size"] for m in node.loaded()) / GiB
        for trial in range(trials):
            threading.Event().wait(0.5 + trial * 1.3)  # vary the phase against the 5 s health cycle
            node.restart(downtime=downtime)  # returns once the new process listens, nothing loaded
            answering = time.monotonic()
            done = wait_for(lambda: on_gpu(node, EMBED) and on_gpu(node, LLAMA), 120, "models on GPU")
            times.append(done - answering)
    return {
        "health_interval_s": 5.0,
        "check_interval_s": 300,
        "downtime_s": downtime,
        "seen_down": downtime > 5.0,
        "simulated_load_s": round(load_s, 2),
        "trials_s": [round(t, 2) for t in times],
        "worst_s": round(max(times), 2),
        "worst_over_load_s": round(max(times) - load_s, 2),
        "ratio_to_plain_loop": round(max(times) / 300, 3),
        "goal": "worst <= 15 s",
        "met": max(times) <= 15,
    }


# --------------------------------------------------------------------------------------------- 4
def bench_idle_check_bytes(checks: int = 50) -> dict:
    """Request + response bytes (headers included) per node per idle health check, 2 models loaded."""
    with (
        SimNode(preload=[("mxbai-embed-large", "gpu"), ("llama3.1", "gpu")]) as node,
        OllamaLoadBalancer([node.url], health_interval=0.05) as balancer,
    ):
        wait_for(lambda: balancer.optimizer_status()["last_pass"] is not None, 30, "start-up pass")

        def ps_count() -> int:
            return sum(path == "/api/ps" for _, path, _ in list(node.request_log))

        wait_for(lambda: ps_count() >= 3, 10, "first checks")
        first, bytes_before = ps_count(), node.bytes_in + node.bytes_out
        wait_for(lambda: ps_count() >= first + checks, 30, f"{checks} idle checks")
        counted, bytes_after = ps_count(), node.bytes_in + node.bytes_out
        other = [(m, p) for m, p, _ in node.request_log[first:] if p != "/api/ps"]
    per_check = (bytes_after - bytes_before) / (counted - first)
    return {
        "checks": counted - first,
        "models_loaded": 2,
        "bytes_per_check": round(per_check),
        "other_requests_in_window": len(other),
        "goal": "<= 1536 bytes",
        "met": per_check <= 1536,
    }


def main() -> int:
    started = time.monotonic()
    results = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "pass_200_nodes": bench_pass_over_200_nodes(),
        "force_gpu_overhead": bench_force_gpu_overhead(),
        "restart_seen_down": bench_restart_warm_up(downtime=6.0),
        "restart_unseen": bench_restart_warm_up(downtime=0.0),
        "idle_check_bytes": bench_idle_check_bytes(),
        "history_size": history_size.bench(),
        "serve": serve_bench.run(),
        "farm_cost": farm_cost.bench_farm_cost(nodes=1250, connections=128, latency_ms=20.0, seconds=8.0),
    }
    results["bench_duration_s"] = round(time.monotonic() - started, 1)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print_table(results)
    serve_met = results["serve"]["latency"]["met"] and results["serve"]["streams_256"]["met"]
    met = all(v.get("met", True) for v in results.values() if isinstance(v, dict)) and serve_met
    return 0 if met else 1


def print_table(r: dict) -> None:
    p, f, b = r["pass_200_nodes"], r["force_gpu_overhead"], r["idle_check_bytes"]
    s, u, h = r["restart_seen_down"], r["restart_unseen"], r["history_size"]
    rows = [
        ("pass over 200 nodes x 50 ms", f"{p['pass_s_median']:.2f} s (worst {p['pass_s_worst']:.2f} s)",
         f"{p['speedup_worst']:.0f}x faster than 10 s serial", ">= 10x", p["met"]),
        ("force_gpu overhead", f"{f['wall_s_median']:.2f} s for {f['simulated_load_s']:.2f} s load",
         f"+{f['overhead_s_worst']:.3f} s worst", "<= 0.2 s", f["met"]),
        ("restart (seen down) -> on GPU", f"{s['trials_s']} s", f"+{s['worst_over_load_s']:.2f} s over "
         f"{s['simulated_load_s']:.1f} s load", "<= 15 s", s["met"]),
        ("restart (unseen) -> on GPU", f"{u['trials_s']} s", f"+{u['worst_over_load_s']:.2f} s over "
         f"{u['simulated_load_s']:.1f} s load", "<= 15 s", u["met"]),
        ("bytes per idle check", f"{b['bytes_per_check']} B", f"{b['bytes_per_check'] / 1536:.2f} of 1.5 KB",
         "<= 1.5 KB", b["met"]),
        ("history rows per idle check", f"{h['live_idle_checks']['rows_written_in_window']} in "
         f"{h['live_idle_checks']['checks']} checks",
         f"busy week {h['scripted_busy_week']['bytes_per_day'] // 1024} KB/day", "0", h["met"]),
    ]  # fmt: skip
    print(f"{r['date']}  {r['machine']}  (bench took {r['bench_duration_s']} s)")
    print(f"{'figure':30} {'measured':34} {'ratio':30} {'goal':8} met")
    for name, measured, ratio, goal, met in rows:
        print(f"{name:30} {measured:34} {ratio:30} {goal:8} {'yes' if met else 'NO'}")
    serve_bench.print_table(r["serve"])
    c = r["farm_cost"]
    per_reply, rate = c["farm_cpu_us_per_reply"], c["replies_per_s"]
    print(f"simulator farm: {per_reply} us of CPU per /api/ps reply at {rate} replies/s")
    print(f"written to {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    raise SystemExit(main())
