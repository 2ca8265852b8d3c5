"""Issue 8's scale goals against a farm of simulated nodes in child processes (bench/sim_farm.py).

    python3 bench/scale.py [--nodes 5000] [--procs 4] [--latency-ms 20] [--window 30]

At default settings (health every 5 s, optimizer interval 300 s) with llama3.1 already on every node's GPU:
1. the health check: checks per node per minute and the longest gap between two checks of a node, and the
   client process's CPU time over a window (`time.process_time()`: every client thread), as a share of
   one core (goal: 12 a minute, at most 25%);
2. `vram_report()`: wall time and nodes reported stale (goal: none);
3. a steady optimizer pass (nothing to move) against the serial bound nodes x latency (goal: 50x);
4. the client's memory (RSS) and threads, and the farm's CPU over the same window (not the wall).
Prints one JSON object; run_all.py folds it into bench/results/latest.json.
"""

from __future__ import annotations

import argparse
import gc
import json
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

from sim_farm import Farm

from flockparse.balancer import OllamaLoadBalancer
from flockparse.limits import raise_fd_limit


def wait_for(predicate: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    pause = threading.Event()
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        pause.wait(0.2)


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def bench_scale(nodes: int, procs: int, latency_ms: float, window: float) -> dict:
    """See the module docstring."""
    raise_fd_limit()
    with Farm(nodes, procs=procs, latency_ms=latency_ms, preload=["llama3.1@gpu"], keep_alive="24h") as farm:
        rss_before = rss_mb()
        started = time.monotonic()
        with OllamaLoadBalancer(farm.urls, gpu_priority_models=["llama3.1"]) as balancer:
            checks: dict[str, list[float]] = defaultdict(list)
            poll = balancer.controller.poll_status  # every /api/ps read goes through it

            def counted(url: str, done: Callable, path: str = "/api/ps") -> bool:
                if path == "/api/ps":
                    checks[url].append(time.monotonic())  # list.append is atomic: no lock needed here
                return poll(url, done, path)

            balancer.controller.poll_status = counted  # type: ignore[method-assign]
            wait_for(lambda: balancer.summary()["online"] == nodes, 120, "every node online")
            wait_for(lambda: balancer.optimizer_status()["last_pass"] is not None, 120, "the start-up pass")
            up_s = time.monotonic() - started
            threading.Event().wait(6)  # one health interval to settle after the start-up pass
            gc.collect()

            # 1. the health check alone, at its interval
            checks.clear()
            farm_cpu0, cpu0, t0 = farm.cpu_seconds(), time.process_time(), time.monotonic()
            threading.Event().wait(window)
            cpu1, t1, farm_cpu1 = time.process_time(), time.monotonic(), farm.cpu_seconds()
            seen = {url: [t for t in times if t0 <= t <= t1] for url, times in checks.items()}
            per_minute = sum(len(times) for times in seen.values()) / nodes / (t1 - t0) * 60
            gaps = [b - a for times in seen.values() for a, b in zip(times, times[1:], strict=False)]
            missing = nodes - sum(1 for times in seen.values() if times)
            health = {
                "window_s": round(t1 - t0, 1),
                "checks_per_node_per_minute": round(per_minute, 2),
                "longest_gap_s": round(max(gaps), 2) if gaps else None,
                "nodes_never_checked": missing,
                "client_cpu_share_of_one_core": round((cpu1 - cpu0) / (t1 - t0), 3),
                "client_cpu_us_per_check": round((cpu1 - cpu0) / max(1, sum(map(len, seen.values()))) * 1e6),
                "farm_cpu_share": round((farm_cpu1 - farm_cpu0) / (t1 - t0), 3),
                "goal": "12 checks per node per minute, at most 0.25 of one core",
            }
            health["met"] = per_minute >= 12 * 0.98 and health["client_cpu_share_of_one_core"] <= 0.25
            threads_steady = threading.active_count()
            rss_steady = rss_mb()

            # 2. vram_report: every node answers within its timeout, none reported stale
            reports = []
            for _ in range(3):
                t = time.monotonic()
                report = balancer.vram_report()
                reports.append((time.monotonic() - t, sum(1 for row in report if row["stale"]), len(report)))
            report_result = {
                "nodes": nodes,
                "wall_s": [round(w, 2) for w, _, _ in reports],
                "stale": [s for _, s, _ in reports],
                "goal": "no node reported stale",
                "met": all(s == 0 and n == nodes for _, s, n in reports),
            }

            # 3. a steady optimizer pass (models already on GPU: one /api/ps per node, nothing moved)
            durations = []
            for _ in range(3):
                t = time.monotonic()
                actions = balancer.optimize_gpu_once()
                durations.append(time.monotonic() - t)
                assert not [a for a in actions if a["action"] != "skipped"], actions[:3]
            serial = nodes * latency_ms / 1000
            pass_result = {
                "nodes": nodes,
                "latency_ms": latency_ms,
                "serial_bound_s": serial,
                "pass_s": [round(d, 2) for d in durations],
                "speedup_worst": round(serial / max(durations), 1),
                "goal": "speedup >= 50",
                "met": serial / max(durations) >= 50,
            }
            memory = {
                "client_rss_mb_before": round(rss_before, 1),
                "client_rss_mb_steady": round(rss_steady, 1),
                "client_rss_mb_after": round(rss_mb(), 1),
                "client_threads_steady": threads_steady,
                "client_threads_after": threading.active_count(),
                "kb_per_node_steady": round((rss_steady - rss_before) * 1024 / nodes, 1),
                "startup_to_all_online_and_first_pass_s": round(up_s, 1),
            }
    return {
        "nodes": nodes,
        "farm_processes": procs,
        "latency_ms": latency_ms,
        "health": health,
        "vram_report": report_result,
        "steady_pass": pass_result,
        "memory": memory,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--nodes", type=int, default=5000)
    parser.add_argument("--procs", type=int, default=4)
    parser.add_argument("--latency-ms", type=float, default=20.0)
    parser.add_argument("--window", type=float, default=30.0)
    args = parser.parse_args()
    result = bench_scale(args.nodes, args.procs, args.latency_ms, args.window)
    print(json.dumps(result, indent=2))
    return 0 if all(v.get("met", True) for v in result.values() if isinstance(v, dict)) else 1


if __name__ == "__main__":
    raise SystemExit(main())
