"""SimExporter: a GPU metrics exporter running BESIDE a simulated node, as dcgm-exporter runs beside Ollama.

Real exporters are separate programs reading the driver (NVML), not Ollama: they see the whole GPU (also one
this Ollama process did not discover), what every process holds on it (other programs, and each runner's
size_vram plus its CUDA context) and what is free. So the figures come from `Scheduler.driver_memory()`,
split evenly over `gpus` GPUs, and the page is written in one exporter's own format:

- "dcgm": NVIDIA dcgm-exporter, label order of internal/pkg/rendermetrics/render_metrics.go
  (`gpu`, `UUID`, `pci_bus_id`, `device`, `modelName`, `hostname`), names and HELP texts of
  etc/default-counters.csv, framebuffer figures as integers in MiB;
- "nvidia_smi": utkuozdemir/nvidia_gpu_exporter (Go client: families sorted by name, labels sorted,
  values in strconv 'g' form), memory in bytes labelled by the lower-case UUID without `GPU-`;
- "nvitop": nvitop-exporter (prometheus_client text: `gpu_memory_total_MiB` ..., floats such as `24576.0`).

`page=` serves a fixed page instead (a recorded scrape). Faults, as for SimNode: "down" (connection refused),
"hang" (never answers until cleared), "garbage" (200, not Prometheus text), "error500", "huge" (a page of
`size` bytes, close-delimited, so a client must cap what it reads). A node without a GPU (`vram_gb` 0:
a CPU box, or a GPU lost at run time) is written as each exporter writes it: dcgm-exporter an empty page,
nvidia_gpu_exporter nvidia-smi's failure (exit code 6, no series), nvitop-exporter `device_count="0"` and
its gauges without series. Standard library only.
"""

from __future__ import annotations

import contextlib
import decimal
import http.server
import math
import socket
import sys
import threading
from typing import Any

from ollama_sim.catalogue import MiB
from ollama_sim.server import SimNode

FORMATS = ("dcgm", "nvidia_smi", "nvitop")
FAULTS = ("down", "hang", "garbage", "error500", "huge")
GPU_NAME = "NVIDIA RTX A5000"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False  # stop() must never wait on a hung handler
    allow_reuse_address = True

    def accept_loop(self) -> None:
        """Block in accept() instead of serve_forever's polling: no idle CPU, and close_listener() wakes it
        at once (shutdown() on a listening socket makes a blocked accept() fail on Linux)."""
        while True:
            try:
                request, client_address = self.socket.accept()
            except OSError:
                return
            self.process_request(request, client_address)  # ThreadingMixIn: one daemon thread each

    def close_listener(self) -> None:
        with contextlib.suppress(OSError):
            self.socket.shutdown(socket.SHUT_RDWR)
        self.server_close()

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Quiet for sockets closed under a handler (stop, down, client gone); loud for real bugs."""
        if not isinstance(sys.exc_info()[1], OSError):
            super().handle_error(request, client_address)


class SimExporter:
    """Serves `http://127.0.0.1:PORT/metrics` for one SimNode (or a fixed `page`): see the module's doc."""

    def __init__(
        self,
        node: SimNode | None = None,
        format: str = "dcgm",  # noqa: A002 - the exporter's format, as the brief names it
        gpus: int = 1,
        page: str | None = None,
        port: int = 0,
        hostname: str = "sim-gpu-node",
    ) -> None:
        if format not in FORMATS:
            raise ValueError(f"unknown exporter format {format!r} (known: {', '.join(FORMATS)})")
        if node is None and page is None:
            raise ValueError("SimExporter needs a node to read figures from, or a fixed page")
        self.node, self.format, self.gpus, self.page = node, format, max(1, int(gpus)), page
        self.hostname = hostname
        self.port = port
        self.host = "127.0.0.1"
        self.scrapes = 0  # GET /metrics requests served (tests count them)
        self._lock = threading.Lock()
        self._fault: str | None = None
        self._fault_size = 0
        self._released = threading.Event()
        self._stopping = threading.Event()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._connections: set[socket.socket] = set()  # open ones: a process that dies drops them all

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> SimExporter:
        self._stopping.clear()
        self._bind()
        return self

    def stop(self) -> None:
        self._stopping.set()
        self._released.set()
        self._unbind()

    def __enter__(self) -> SimExporter:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/metrics"

    def _bind(self) -> None:
        server = _Server((self.host, self.port), _ExporterHandler)
        server.exporter = self  # type: ignore[attr-defined]
        self.port = server.server_address[1]
        self._server = server
        name = f"sim-exporter-{self.port}"
        self._thread = threading.Thread(target=server.accept_loop, name=name, daemon=True)
        self._thread.start()

    def _unbind(self) -> None:
        """Close the listener (connections are refused) and drop every open connection."""
        server, self._server = self._server, None
        if server is not None:
            server.close_listener()
            if self._thread is not None:
                self._thread.join(timeout=2)
        with self._lock:
            connections = list(self._connections)
        for conn in connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)

    # ------------------------------------------------------------------ faults
    def set_fault(self, kind: str, size: int = 50 * 1024 * 1024) -> None:
        """down | hang | garbage | error500 | huge (`size` bytes)."""
        if kind not in FAULTS:
            raise ValueError(f"unknown fault {kind!r}")
        self.clear_fault()
        self._released.clear()
        self._fault, self._fault_size = kind, int(size)
        if kind == "down":
            self._unbind()

    def clear_fault(self) -> None:
        was_down = self._fault == "down"
        self._fault = None
        self._released.set()
        if was_down and not self._stopping.is_set():
            self._bind()

    # ------------------------------------------------------------------ the page
    def figures(self) -> list[tuple[float, float]]:
        """Per GPU (total, used) in MiB: the node's driver figures split evenly; none once the GPU is gone."""
        assert self.node is not None
        total, used = self.node.scheduler.driver_memory()
        if total <= 0:
            return []
        return [(total / MiB / self.gpus, used / MiB / self.gpus)] * self.gpus

    def page_text(self) -> str:
        if self.page is not None:
            return self.page
        gpus = [_Gpu(i, self._uuid(i), total, used) for i, (total, used) in enumerate(self.figures())]
        render = {"dcgm": _dcgm, "nvidia_smi": _nvidia_smi, "nvitop": _nvitop}[self.format]
        return render(gpus, self.hostname)

    def _uuid(self, index: int) -> str:
        return f"GPU-{self.port:08x}-5ea1-4e11-8d0c-{index:012x}"


class _Gpu:
    __slots__ = ("free", "index", "reserved", "total", "used", "uuid")

    def __init__(self, index: int, uuid: str, total: float, used: float) -> None:
        self.index, self.uuid, self.total, self.used = index, uuid, total, used
        self.free = max(0.0, total - used)
        self.reserved = 0.0  # the simulated GPU reserves nothing: total = used + free


class _ExporterHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True

    @property
    def exporter(self) -> SimExporter:
        return self.server.exporter  # type: ignore[attr-defined]

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet, like a daemon
        pass

    def setup(self) -> None:
        super().setup()
        with self.exporter._lock:
            self.exporter._connections.add(self.connection)

    def finish(self) -> None:
        with self.exporter._lock:
            self.exporter._connections.discard(self.connection)
        with contextlib.suppress(OSError):
            super().finish()

    def do_GET(self) -> None:
        exporter = self.exporter
        if self.path.split("?", 1)[0] != "/metrics":
            self._send(404, b"404 page not found\n", "text/plain; charset=utf-8")
            return
        with exporter._lock:
            exporter.scrapes += 1
        fault = exporter._fault
        if fault == "hang":
            exporter._released.wait()
            self.close_connection = True
            return
        if fault == "error500":
            self._send(500, b"An error has occurred while serving metrics\n", "text/plain; charset=utf-8")
        elif fault == "garbage":
            self._send(200, b"\x00\x17<html>{{ not a metric }} \xff\xfe\n" * 64, CONTENT_TYPE)
        elif fault == "huge":
            self._send_huge(exporter.page_text().encode(), exporter._fault_size)
        else:
            self._send(200, exporter.page_text().encode(), CONTENT_TYPE)

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _send_huge(self, page: bytes, size: int) -> None:
        """The real page, then comment lines up to `size` bytes, ended by closing the connection."""
        self.send_response(200)
        self.send_header("Content-Type", CONTENT_TYPE)
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        filler = b"# padding " + b"x" * 1013 + b"\n"  # 1 KiB a line
        sent = 0
        with contextlib.suppress(OSError):  # the client stops reading at its cap and closes: expected
            self.wfile.write(page)
            sent += len(page)
            while sent < size and not self.exporter._stopping.is_set():
                self.wfile.write(filler * 64)
                sent += len(filler) * 64


# ------------------------------------------------------------------ the three formats


def _dcgm(gpus: list[_Gpu], hostname: str) -> str:
    """dcgm-exporter's page (a few default counters, then the framebuffer ones)."""
    counters = [
        ("DCGM_FI_DEV_SM_CLOCK", "SM clock frequency (in MHz).", lambda g: 1695),
        ("DCGM_FI_DEV_GPU_TEMP", "GPU temperature (in C).", lambda g: 41),
        ("DCGM_FI_DEV_GPU_UTIL", "GPU utilization (in %).", lambda g: 0),
        ("DCGM_FI_DEV_FB_FREE", "Framebuffer memory free (in MiB).", lambda g: round(g.free)),
        ("DCGM_FI_DEV_FB_USED", "Framebuffer memory used (in MiB).", lambda g: round(g.used)),
        ("DCGM_FI_DEV_FB_RESERVED", "Framebuffer memory reserved (in MiB).", lambda g: 0),
    ]
    lines = []
    for name, help_text, value in counters if gpus else ():  # the template writes families with series only
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} gauge"]
        for g in gpus:
            labels = (
                f'gpu="{g.index}",UUID="{g.uuid}",pci_bus_id="00000000:{0x3B + g.index:02X}:00.0",'
                f'device="nvidia{g.index}",modelName="{GPU_NAME}",hostname="{hostname}"'
            )
            lines.append(f"{name}{{{labels}}} {value(g)}")
    return "\n".join(lines) + "\n"


def go_float(value: float) -> str:
    """strconv.FormatFloat(v, 'g', -1, 64): how Go's Prometheus client writes a sample value."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value == 0:
        return "0"
    sign, digits, exponent = decimal.Decimal(repr(float(value))).normalize().as_tuple()
    text = "".join(map(str, digits))
    point = len(text) + int(exponent)  # digits before the decimal point
    exp = point - 1
    prefix = "-" if sign else ""
    if exp < -4 or exp >= 6:  # ftoa.go: "if precision was the shortest possible, use precision 6"
        mantissa = text[0] + ("." + text[1:] if len(text) > 1 else "")
        return f"{prefix}{mantissa}e{'+' if exp >= 0 else '-'}{abs(exp):02d}"
    if point <= 0:
        return f"{prefix}0.{'0' * -point}{text}"
    if point >= len(text):
        return prefix + text + "0" * (point - len(text))
    return f"{prefix}{text[:point]}.{text[point:]}"


def _nvidia_smi(gpus: list[_Gpu], hostname: str) -> str:
    """nvidia_gpu_exporter's page: identity, collection status and the memory families, sorted by name."""
    uuid = {g.index: g.uuid.removeprefix("GPU-").lower() for g in gpus}
    exit_code = 0 if gpus else 6  # nvidia-smi without a GPU: "No devices were found", exit code 6
    families: list[tuple[str, str, list[tuple[str, float]]]] = [
        ("nvidia_smi_command_exit_code", "Exit code of the most recent nvidia-smi run", [("", exit_code)]),
        (
            "nvidia_smi_gpu_info",
            "A metric with a constant '1' value labeled by gpu uuid, name, driver_model_current, "
            "driver_model_pending, vbios_version, driver_version, pci_bus_id, serial, compute_cap, "
            "pci_sub_device_id, index, cuda_version.",
            [
                (
                    f'{{compute_cap="8.6",cuda_version="12.4",driver_model_current="[N/A]",'
                    f'driver_model_pending="[N/A]",driver_version="550.54.14",index="{g.index}",'
                    f'name="{GPU_NAME}",pci_bus_id="00000000:{0x3B + g.index:02X}:00.0",'
                    f'pci_sub_device_id="0x147E10DE",serial="[N/A]",uuid="{uuid[g.index]}",'
                    f'vbios_version="94.02.71.00.01"}}',
                    1,
                )
                for g in gpus
            ],
        ),
        (
            "nvidia_smi_last_collect_success",
            "Whether the most recent collection succeeded (1) or not (0)",
            [("", 0 if exit_code else 1)],
        ),
    ]
    for figure in ("free", "reserved", "total", "used"):
        samples = [(f'{{uuid="{uuid[g.index]}"}}', getattr(g, figure)) for g in gpus]
        families.append((f"nvidia_smi_memory_{figure}_bytes", f"memory.{figure} [MiB]", samples))
    lines = []
    for name, help_text, samples in families:
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} gauge"]
        for labels, value in samples:
            mib = name.startswith("nvidia_smi_memory_")
            lines.append(f"{name}{labels} {go_float(round(value) * MiB if mib else value)}")
    return "\n".join(lines) + "\n"


def _nvitop(gpus: list[_Gpu], hostname: str) -> str:
    """nvitop-exporter's page (prometheus_client text format): its info, then the GPU memory gauges."""
    lines = [
        "# HELP nvitop_info NVITOP Prometheus Exporter.",
        "# TYPE nvitop_info gauge",
        f'nvitop_info{{hostname="{hostname}",device_count="{len(gpus)}",driver_version="550.54.14",'
        f'cuda_driver_version="12.4"}} 1.0',
    ]
    for figure, help_text in (("total", "total"), ("used", "used"), ("free", "free")):
        name = f"gpu_memory_{figure}_MiB"
        lines += [f"# HELP {name} GPU memory {help_text} (MiB).", f"# TYPE {name} gauge"]
        for g in gpus:
            labels = f'hostname="{hostname}",index="{g.index}",devicename="{GPU_NAME}",uuid="{g.uuid}"'
            lines.append(f"{name}{{{labels}}} {float(getattr(g, figure))!r}")
    return "\n".join(lines) + "\n"
