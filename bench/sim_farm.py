"""Run many simulated nodes in a child process, so the simulator does not share the GIL with the client.

Usage: python3 bench/sim_farm.py --nodes 200 --latency-ms 50 [--preload llama3.1@gpu ...]
Prints one JSON line {"urls": [...]} once every node listens, then serves until stdin closes.
"""

from __future__ import annotations

import argparse
import json
import sys

from ollama_sim import SimCluster


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--nodes", type=int, default=200)
    parser.add_argument("--latency-ms", type=float, default=50.0)
    parser.add_argument("--preload", action="append", default=[], help="model@placement, e.g. llama3.1@gpu")
    args = parser.parse_args()
    preload = [tuple(item.split("@", 1)) for item in args.preload]
    config = {"latency_ms": args.latency_ms, "preload": preload}
    with SimCluster([dict(config) for _ in range(args.nodes)]) as cluster:
        print(json.dumps({"urls": cluster.urls}), flush=True)
        sys.stdin.read()  # serve until the parent closes our stdin
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
