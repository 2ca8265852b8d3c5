"""The command line: `python3 -m ollama_sim --port 11434 --vram-gb 24 --preload llama3.1@auto ...`.

Owns: the flags (each maps to one SimNode argument) and the process's life: it prints its URL as the
first line of output and serves until Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import sys
import threading

from ollama_sim.server import SimNode
from ollama_sim.wire import VERSION


def _parse_preload(text: str) -> tuple[str, str]:
    name, _, where = text.partition("@")
    return name, where or "auto"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python3 -m ollama_sim", description="A simulated Ollama node on 127.0.0.1."
    )
    parser.add_argument("--port", type=int, default=11434, help="0 = ephemeral")
    parser.add_argument("--vram-gb", type=float, default=24.0, help="GPU memory in GiB, 0 = CPU-only node")
    parser.add_argument("--ram-gb", type=float, default=64.0)
    parser.add_argument(
        "--models", nargs="*", default=None, help="installed models (default: the 7 base models)"
    )
    parser.add_argument("--preload", action="append", default=[], type=_parse_preload,
                        metavar="NAME@auto|gpu|cpu|forced-cpu")  # fmt: skip
    parser.add_argument("--load-seconds-per-gb", type=float, default=0.0)
    parser.add_argument("--unload-seconds", type=float, default=0.05)
    parser.add_argument("--latency-ms", type=float, default=0.0)
    parser.add_argument("--max-loaded", type=int, default=0, help="OLLAMA_MAX_LOADED_MODELS (0 = automatic)")
    parser.add_argument("--max-queue", type=int, default=512, help="OLLAMA_MAX_QUEUE (503 beyond)")
    parser.add_argument("--keep-alive", default="5m", help="OLLAMA_KEEP_ALIVE")
    parser.add_argument("--inference-time-scale", type=float, default=0.0, help="1 = simulated token rates")
    parser.add_argument("--gpu-missing", action="store_true", help="GPU not discovered by this process")
    parser.add_argument("--external-vram-gb", type=float, default=0.0, help="VRAM held by other programs")
    parser.add_argument("--ps-stall-seconds", type=float, default=0.0, help="/api/ps waits during unloads")
    parser.add_argument("--version", default=VERSION, help="Ollama version to report (<= 0.12.10: era A)")
    args = parser.parse_args(argv)
    node = SimNode(
        vram_gb=args.vram_gb,
        ram_gb=args.ram_gb,
        models=args.models,
        preload=args.preload,
        load_seconds_per_gb=args.load_seconds_per_gb,
        unload_seconds=args.unload_seconds,
        latency_ms=args.latency_ms,
        max_loaded=args.max_loaded,
        max_queue=args.max_queue,
        keep_alive_default=args.keep_alive,
        port=args.port,
        inference_time_scale=args.inference_time_scale,
        gpu_found=not args.gpu_missing,
        external_vram_gb=args.external_vram_gb,
        ps_stall_seconds=args.ps_stall_seconds,
        version=args.version,
    )
    try:
        node.start()
    except (OSError, ValueError) as err:
        print(f"ollama_sim: {err}", file=sys.stderr)
        return 1
    print(node.url, flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        node.stop()
    return 0
