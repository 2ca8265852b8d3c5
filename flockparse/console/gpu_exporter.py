"""`flockparse gpu-exporter [--listen HOST:PORT]`: serve this machine's GPU memory from NVML at /metrics.

The command around flockparse/gpu_metrics/nvml.py (which reads NVML and writes the page, and never
prints): flags, one-line errors, serving until Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from flockparse.gpu_metrics.nvml import (
    DEFAULT_LISTEN,
    NvmlReader,
    NvmlUnavailable,
    listen_address,
    load_nvml,
    serve,
)

EXIT_NO_NVML, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130


def main(argv: Sequence[str], nvml: Any = None, ready: Any = None) -> int:
    """`flockparse gpu-exporter [--listen HOST:PORT]`: serve until Ctrl-C. Exit 1 without NVML, 2 on usage."""
    parser = argparse.ArgumentParser(
        prog="flockparse gpu-exporter",
        description="Serve this machine's GPU memory from NVML at /metrics, in dcgm-exporter's names.",
    )
    parser.add_argument(
        "--listen", default=DEFAULT_LISTEN, metavar="HOST:PORT", help=f"default {DEFAULT_LISTEN}"
    )
    try:
        args = parser.parse_args(list(argv))
        host, port = listen_address(args.listen)
    except SystemExit as exc:  # argparse's own usage errors and --help
        return int(exc.code or 0)
    except ValueError as exc:
        print(f"flockparse gpu-exporter: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        reader = NvmlReader(nvml if nvml is not None else load_nvml())
    except NvmlUnavailable as exc:
        print(f"flockparse gpu-exporter: {exc}", file=sys.stderr)
        return EXIT_NO_NVML
    try:
        server = serve(reader, host, port)
    except OSError as exc:
        print(
            f"flockparse gpu-exporter: cannot listen on {host}:{port}: {exc.strerror or exc}", file=sys.stderr
        )
        reader.close()
        return EXIT_NO_NVML
    bound = server.server_address
    print(f"serving {len(reader.devices())} GPU(s) at http://{host}:{bound[1]}/metrics", flush=True)
    if ready is not None:  # tests: the server that runs, to read it and shut it down
        ready(server)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    finally:
        server.server_close()
        reader.close()
    return 0
