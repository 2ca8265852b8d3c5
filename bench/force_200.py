"""force_gpu_all_nodes over 200 nodes against one node's load (issue 8 goal: at most 1.5x).

    python3 bench/force_200.py

llama3.1 on CPU on every node, 0.5 s/GB loads, the farm in 2 child processes (bench/sim_farm.py).
"""

from __future__ import annotations

import json
import threading
import time

from sim_farm import Farm

from flockparse.balancer import OllamaLoadBalancer
from flockparse.limits import raise_fd_limit


def timed_force(urls: list[str]) -> tuple[float, int]:
    """Seconds for force_gpu_all_nodes over `urls` (GPU declared), and how many nodes moved."""
    with OllamaLoadBalancer(urls, auto_optimize_gpu=False, gpu_capability=dict.fromkeys(urls, True)) as lb:
        deadline = time.monotonic() + 60
        while lb.summary()["online"] < len(urls) and time.monotonic() < deadline:
            threading.Event().wait(0.1)
        started = time.monotonic()
        results = lb.force_gpu_all_nodes("llama3.1")
        return time.monotonic() - started, sum(r["result"]["reason"] == "moved" for r in results)


def main() -> int:
    raise_fd_limit()
    farm = Farm(
        201, procs=2, latency_ms=0, preload=["llama3.1@cpu"], load_seconds_per_gb=0.5, keep_alive="24h"
    )
    with farm:
        single, _ = timed_force(farm.urls[:1])
        whole, moved = timed_force(farm.urls[1:])
    ratio = whole / single
    print(json.dumps({"single_node_s": round(single, 2), "nodes_200_s": round(whole, 2), "moved": moved,
                      "ratio": round(ratio, 2), "goal": "ratio <= 1.5", "met": ratio <= 1.5}))  # fmt: skip
    return 0 if ratio <= 1.5 else 1


if __name__ == "__main__":
    raise SystemExit(main())
