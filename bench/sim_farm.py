"""Run many simulated nodes in child processes, so the simulator does not share the GIL with the client.

Usage: python3 bench/sim_farm.py --nodes 200 --latency-ms 50 [--preload llama3.1@gpu ...]
Prints one JSON line {"urls": [...]} once every node listens, then serves until stdin closes.

From Python (bench/run_all.py, bench/scale.py): `with Farm(5000, procs=4, ...) as farm: farm.urls`
starts `procs` such processes of about nodes/procs nodes each (5,000 listening sockets and their
connections need more descriptors than one default soft limit, so each process raises its own).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import subprocess
import sys
import threading
from pathlib import Path
from typing import IO, Any

from ollama_sim import SimCluster

FARM = Path(__file__).resolve()


def raise_fd_limit() -> int:
    """Soft RLIMIT_NOFILE up to the hard one: each node holds a listener and its connections."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--nodes", type=int, default=200)
    parser.add_argument("--latency-ms", type=float, default=50.0)
    parser.add_argument("--load-seconds-per-gb", type=float, default=0.0)
    parser.add_argument("--keep-alive", default="5m", help="OLLAMA_KEEP_ALIVE of every node (e.g. 24h)")
    parser.add_argument("--preload", action="append", default=[], help="model@placement, e.g. llama3.1@gpu")
    parser.add_argument(
        "--inference-time-scale", type=float, default=0.0, help="1 = generations take their simulated time"
    )
    args = parser.parse_args()
    raise_fd_limit()
    threading.stack_size(256 * 1024)  # a scheduler expiry thread per node (the sockets share one loop)
    preload = [tuple(item.split("@", 1)) for item in args.preload]
    config = {
        "latency_ms": args.latency_ms,
        "preload": preload,
        "load_seconds_per_gb": args.load_seconds_per_gb,
        "keep_alive_default": args.keep_alive,
        "inference_time_scale": args.inference_time_scale,
    }
    with SimCluster([dict(config) for _ in range(args.nodes)]) as cluster:
        print(json.dumps({"urls": cluster.urls}), flush=True)
        sys.stdin.read()  # serve until the parent closes our stdin
    return 0


class Farm:
    """`procs` child processes serving `nodes` simulated nodes between them; stopped on exit (bounded)."""

    def __init__(self, nodes: int, procs: int = 1, latency_ms: float = 0.0, **options: Any) -> None:
        self.nodes, self.procs, self.latency_ms = nodes, max(1, min(procs, nodes)), latency_ms
        self.options = options
        self.urls: list[str] = []
        self.children: list[subprocess.Popen] = []

    def __enter__(self) -> Farm:
        share, extra = divmod(self.nodes, self.procs)
        for index in range(self.procs):
            count = share + (1 if index < extra else 0)
            command = [sys.executable, str(FARM), "--nodes", str(count), "--latency-ms", str(self.latency_ms)]
            for preload in self.options.get("preload", []):
                command += ["--preload", preload]
            if "load_seconds_per_gb" in self.options:
                command += ["--load-seconds-per-gb", str(self.options["load_seconds_per_gb"])]
            if "keep_alive" in self.options:
                command += ["--keep-alive", str(self.options["keep_alive"])]
            if "inference_time_scale" in self.options:
                command += ["--inference-time-scale", str(self.options["inference_time_scale"])]
            child = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            self.children.append(child)
        try:
            for child in self.children:
                line = _stdout(child).readline()
                if not line:
                    raise RuntimeError("a farm process ended before listening")
                self.urls += json.loads(line)["urls"]
        except BaseException:
            self.__exit__()
            raise
        return self

    def pids(self) -> list[int]:
        return [child.pid for child in self.children]

    def cpu_seconds(self) -> float:
        """User + system CPU of the farm processes so far (Linux /proc), to show the farm is not the wall."""
        total = 0.0
        ticks = _clock_ticks()
        for pid in self.pids():
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            total += (int(fields[11]) + int(fields[12])) / ticks
        return total

    def __exit__(self, *exc: object) -> None:
        for child in self.children:
            if child.stdin is not None:
                child.stdin.close()
        for child in self.children:
            try:
                child.wait(30)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait(5)


def _stdout(child: subprocess.Popen) -> IO[str]:
    assert child.stdout is not None
    return child.stdout


def _clock_ticks() -> int:
    import os

    return os.sysconf("SC_CLK_TCK")


if __name__ == "__main__":
    raise SystemExit(main())
