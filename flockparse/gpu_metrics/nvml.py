"""`flockparse gpu-exporter --listen HOST:PORT`: a node's GPU memory from NVML, in dcgm-exporter's names.

For a GPU node that runs no exporter: NVIDIA's management library (the `nvidia-ml-py` package, an optional
dependency: `pip install 'flockparse-gpu[nvml]'`) gives each GPU's total, used, free and reserved memory,
served at `/metrics` as `DCGM_FI_DEV_FB_USED` / `_FREE` / `_RESERVED` (MiB, one series per GPU labelled
`gpu` and `UUID`, as dcgm-exporter writes them), so one format covers both. NVML is read at each scrape
(microseconds). Without the package or without an NVIDIA driver, NvmlUnavailable says so in one line
(the command, flockparse/console/gpu_exporter.py, prints it and exits 1).
"""

from __future__ import annotations

import contextlib
import http.server
import socket
import threading
from dataclasses import dataclass
from typing import Any

MIB = 1024 * 1024
DEFAULT_LISTEN = "127.0.0.1:9400"  # dcgm-exporter's port; 0.0.0.0:9400 to be scraped from other hosts
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_COUNTERS = (
    ("DCGM_FI_DEV_FB_FREE", "Framebuffer memory free (in MiB).", "free"),
    ("DCGM_FI_DEV_FB_USED", "Framebuffer memory used (in MiB).", "used"),
    ("DCGM_FI_DEV_FB_RESERVED", "Framebuffer memory reserved (in MiB).", "reserved"),
)


class NvmlUnavailable(RuntimeError):
    """No NVML to read: the package is missing or no NVIDIA driver answers. One line for the user."""


@dataclass(frozen=True)
class DeviceMemory:
    index: int
    uuid: str
    name: str
    pci_bus_id: str
    total: int  # bytes
    used: int
    free: int
    reserved: int


def load_nvml() -> Any:
    """The `pynvml` module of nvidia-ml-py, or NvmlUnavailable saying how to install it."""
    try:
        import pynvml
    except ImportError:
        raise NvmlUnavailable(
            "the NVML bindings are not installed: pip install 'flockparse-gpu[nvml]' (nvidia-ml-py)"
        ) from None
    return pynvml


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


class NvmlReader:
    """Reads every GPU's memory through an NVML module (the real `pynvml`, or a stand-in in tests)."""

    def __init__(self, nvml: Any) -> None:
        self.nvml = nvml
        self._lock = threading.Lock()  # NVML calls from one scrape at a time; memory only, no I/O
        try:
            nvml.nvmlInit()
        except nvml.NVMLError as exc:
            raise NvmlUnavailable(
                f"no NVIDIA driver answers on this machine (NVML: {exc}): nothing to export"
            ) from None

    def devices(self) -> list[DeviceMemory]:
        nvml = self.nvml
        with self._lock:
            found = []
            for index in range(nvml.nvmlDeviceGetCount()):
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
                total, used, free, reserved = self._memory(handle)
                found.append(
                    DeviceMemory(
                        index=index,
                        uuid=_text(nvml.nvmlDeviceGetUUID(handle)),
                        name=_text(nvml.nvmlDeviceGetName(handle)),
                        pci_bus_id=_text(nvml.nvmlDeviceGetPciInfo(handle).busId),
                        total=total,
                        used=used,
                        free=free,
                        reserved=reserved,
                    )
                )
            return found

    def _memory(self, handle: Any) -> tuple[int, int, int, int]:
        """(total, used, free, reserved) bytes: NVML's v2 figures where the driver has them (used without
        what the driver reserves), else v1 (reserved folded into used)."""
        nvml = self.nvml
        version = getattr(nvml, "nvmlMemory_v2", None)
        info = None
        if version is not None:
            try:
                info = nvml.nvmlDeviceGetMemoryInfo(handle, version=version)
            except nvml.NVMLError:  # a driver before 510 has no v2: the v1 figures below
                info = None
        if info is not None:
            return int(info.total), int(info.used), int(info.free), int(info.reserved)
        info = nvml.nvmlDeviceGetMemoryInfo(handle)
        return int(info.total), int(info.used), int(info.free), 0

    def close(self) -> None:
        """Release NVML; an error here (the driver went away) leaves nothing to release."""
        with contextlib.suppress(self.nvml.NVMLError):
            self.nvml.nvmlShutdown()


def render(devices: list[DeviceMemory], hostname: str) -> str:
    """The page in dcgm-exporter's form (internal/pkg/rendermetrics/render_metrics.go)."""
    lines: list[str] = []
    for name, help_text, figure in _COUNTERS if devices else ():
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} gauge"]
        for d in devices:
            labels = (
                f'gpu="{d.index}",UUID="{_label(d.uuid)}",pci_bus_id="{_label(d.pci_bus_id)}",'
                f'device="nvidia{d.index}",modelName="{_label(d.name)}",hostname="{_label(hostname)}"'
            )
            lines.append(f"{name}{{{labels}}} {getattr(d, figure) // MIB}")
    return "\n".join(lines) + "\n" if lines else ""


def _label(value: str) -> str:
    """A label value escaped as the Prometheus text format wants it."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class _Handler(http.server.BaseHTTPRequestHandler):
    server_version = "flockparse-gpu-exporter"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet, like an exporter
        pass

    def do_GET(self) -> None:
        if self.path.split("?", 1)[0] != "/metrics":
            self._send(404, b"404 page not found\n", "text/plain; charset=utf-8")
            return
        reader: NvmlReader = self.server.reader  # type: ignore[attr-defined]
        try:
            body = render(reader.devices(), self.server.hostname).encode()  # type: ignore[attr-defined]
        except reader.nvml.NVMLError as exc:
            self._send(500, f"NVML: {exc}\n".encode(), "text/plain; charset=utf-8")
            return
        self._send(200, body, CONTENT_TYPE)

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def serve(reader: NvmlReader, host: str, port: int) -> http.server.ThreadingHTTPServer:
    """An HTTP server for `/metrics` bound to host:port (serve_forever() on it; port 0 = any free one)."""
    server = http.server.ThreadingHTTPServer((host, port), _Handler)
    server.daemon_threads = True
    server.reader = reader  # type: ignore[attr-defined]
    server.hostname = socket.gethostname()  # type: ignore[attr-defined]
    return server


def listen_address(text: str) -> tuple[str, int]:
    """`HOST:PORT` (or `[::1]:PORT`; port 0: any free one) -> (host, port); ValueError with one line."""
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ValueError(f"--listen {text!r}: expected HOST:PORT, e.g. 0.0.0.0:9400")
    return host, int(port)
