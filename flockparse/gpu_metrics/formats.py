"""GPU exporters' pages -> per-GPU memory figures, recognised by their metric names (pure: no I/O, no clock).

Ollama reports only what its own models hold (`size_vram`); the size of the GPU, what other programs hold
and what is free come from the Prometheus exporter a GPU cluster already runs on each node. Three are
recognised, by the names their own sources define:

- NVIDIA dcgm-exporter (`etc/default-counters.csv`, `internal/pkg/rendermetrics/render_metrics.go`):
  `DCGM_FI_DEV_FB_USED`, `_FREE`, `_RESERVED` (and `_TOTAL` when configured), in MiB, one series per GPU
  labelled `gpu` and `UUID` (`uuid` with --use-old-namespace), per GPU instance under MIG (`GPU_I_ID`);
  in Kubernetes one copy per pod sharing the GPU (same figures, extra pod labels);
- utkuozdemir/nvidia_gpu_exporter (`internal/exporter/exporter.go`): `nvidia_smi_memory_total_bytes`,
  `_used_bytes`, `_free_bytes`, `_reserved_bytes` in bytes, labelled `uuid`, names and indexes in
  `nvidia_smi_gpu_info`; `nvidia_smi_command_exit_code` / `nvidia_smi_nvml_return_code` non-zero when it
  could not read the GPUs;
- XuehaiPan/nvitop's nvitop-exporter (`nvitop-exporter/nvitop_exporter/exporter.py`): `gpu_memory_total_MiB`,
  `gpu_memory_used_MiB`, `gpu_memory_free_MiB` labelled `index`, `devicename`, `uuid`; MIG devices have an
  index `GPU:INSTANCE`; `nvitop_info{device_count=...}`.

The page is parsed with prometheus_client's text parser. Only the lines of the families read here are
handed to it (a dcgm page is mostly other metrics; the parser costs about 90 us a labelled line, so the cut
makes a big page about 10x cheaper: bench/gpu_metrics_cpu.py).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

MIB = 1024 * 1024
DCGM = "dcgm"
NVIDIA_SMI = "nvidia_smi"
NVITOP = "nvitop"
FORMAT_NAMES = {
    DCGM: "dcgm-exporter",
    NVIDIA_SMI: "nvidia_gpu_exporter",
    NVITOP: "nvitop-exporter",
}
DCGM_BLANK_INT32 = 0x7FFFFFF0  # DCGM's "no value" sentinels start here (dcgm_structs.h DCGM_INT32_BLANK)

# family -> (format, which figure, multiplier to MiB)
_MEMORY_FAMILIES: dict[str, tuple[str, str, float]] = {
    "DCGM_FI_DEV_FB_TOTAL": (DCGM, "total", 1.0),
    "DCGM_FI_DEV_FB_USED": (DCGM, "used", 1.0),
    "DCGM_FI_DEV_FB_FREE": (DCGM, "free", 1.0),
    "DCGM_FI_DEV_FB_RESERVED": (DCGM, "reserved", 1.0),
    "nvidia_smi_memory_total_bytes": (NVIDIA_SMI, "total", 1.0 / MIB),
    "nvidia_smi_memory_used_bytes": (NVIDIA_SMI, "used", 1.0 / MIB),
    "nvidia_smi_memory_free_bytes": (NVIDIA_SMI, "free", 1.0 / MIB),
    "nvidia_smi_memory_reserved_bytes": (NVIDIA_SMI, "reserved", 1.0 / MIB),
    "gpu_memory_total_MiB": (NVITOP, "total", 1.0),
    "gpu_memory_used_MiB": (NVITOP, "used", 1.0),
    "gpu_memory_free_MiB": (NVITOP, "free", 1.0),
}
# families that say which exporter this is, or that it failed, without being memory figures
_STATUS_FAMILIES: dict[str, str] = {
    "nvidia_smi_gpu_info": NVIDIA_SMI,
    "nvidia_smi_command_exit_code": NVIDIA_SMI,
    "nvidia_smi_nvml_return_code": NVIDIA_SMI,
    "nvidia_smi_last_collect_success": NVIDIA_SMI,
    "nvitop_info": NVITOP,
}
_FAMILIES = frozenset(_MEMORY_FAMILIES) | frozenset(_STATUS_FAMILIES)
_PREFERENCE = (DCGM, NVIDIA_SMI, NVITOP)  # one page with several exporters' names: the first wins
_MIG_LABELS = ("GPU_I_ID",)


class ExporterPageError(ValueError):
    """The page gives no usable GPU memory figures; the message is one line for the user."""


@dataclass(frozen=True)
class GpuFigures:
    """One GPU's memory (MiB) as its exporter showed it; `instance` is the MIG GPU instance, if any."""

    index: str
    uuid: str | None
    name: str | None
    total_mb: float
    used_mb: float
    free_mb: float
    reserved_mb: float = 0.0
    instance: str | None = None

    def as_dict(self) -> dict[str, object]:
        return {
            "index": self.index,
            "uuid": self.uuid,
            "name": self.name,
            "instance": self.instance,
            "total_mb": round(self.total_mb, 1),
            "used_mb": round(self.used_mb, 1),
            "free_mb": round(self.free_mb, 1),
            "reserved_mb": round(self.reserved_mb, 1),
        }


@dataclass(frozen=True)
class ExporterPage:
    """What one scrape showed: the exporter's format and its GPUs (an empty tuple: it lists no GPU)."""

    format: str
    gpus: tuple[GpuFigures, ...]


def parse_page(text: str) -> ExporterPage:
    """The GPUs' memory on one exporter page; ExporterPageError when the page gives none.

    A page of a recognised exporter that lists no GPU is a valid answer (zero GPUs), unless the exporter
    itself says it failed to read them (nvidia_gpu_exporter's exit or return code).
    """
    return parse_memory_lines(memory_lines(text), dcgm_page="DCGM_FI_" in text)


def memory_lines(text: str) -> str:
    """The page's lines that parse_memory_lines reads (its memory and status families): a cheap cut, and
    what a scraper compares with the last page's to skip parsing figures that did not change."""
    return "\n".join(_relevant_lines(text.splitlines())) + "\n"


def parse_memory_lines(lines: str, dcgm_page: bool = False) -> ExporterPage:
    """parse_page on lines already cut by memory_lines; `dcgm_page`: the page had other DCGM fields (a
    dcgm-exporter whose counters file leaves the framebuffer out, said in the error)."""
    families = _read_families(lines)
    found = {_MEMORY_FAMILIES.get(name, (_STATUS_FAMILIES.get(name),))[0] for name in families}
    kind = next((k for k in _PREFERENCE if k in found), None)
    if kind is None:
        hint = " (dcgm-exporter without DCGM_FI_DEV_FB_USED/FREE: add them to its counters file)"
        raise ExporterPageError(
            "no GPU memory metrics on the page: not a dcgm-exporter, nvidia_gpu_exporter or nvitop-exporter "
            "page" + (hint if dcgm_page else "")
        )
    if kind == NVIDIA_SMI:
        _check_nvidia_smi_status(families)
    devices = _devices(kind, families)
    return ExporterPage(kind, tuple(devices))


def _read_families(lines: str) -> dict[str, list]:
    """{family: [samples]} of the families read here, parsed by the real Prometheus text parser."""
    try:
        parsed = list(text_string_to_metric_families(lines))
    except Exception as exc:  # the parser raises ValueError, IndexError, ... on text that is not Prometheus
        why = f"{type(exc).__name__}: {str(exc)[:80]}"
        raise ExporterPageError(f"not a Prometheus text page ({why})") from None
    families: dict[str, list] = {}
    for family in parsed:
        if family.name in _FAMILIES:
            families.setdefault(family.name, []).extend(family.samples)
    return families


def _relevant_lines(lines: Iterable[str]) -> Iterable[str]:
    """The sample, HELP and TYPE lines of the families read here (a cheap prefix test per line)."""
    for line in lines:
        stripped = line.lstrip()
        if stripped.startswith("#"):
            parts = stripped.split(None, 3)
            if len(parts) >= 3 and parts[1] in ("HELP", "TYPE") and parts[2] in _FAMILIES:
                yield stripped
            continue
        end = len(stripped)
        for stop in "{ \t":
            cut = stripped.find(stop)
            if 0 <= cut < end:
                end = cut
        if stripped[:end] in _FAMILIES:
            yield stripped


def _check_nvidia_smi_status(families: dict[str, list]) -> None:
    """nvidia_gpu_exporter says when its last nvidia-smi run or NVML read failed: no figures then."""
    for name in ("nvidia_smi_command_exit_code", "nvidia_smi_nvml_return_code"):
        for sample in families.get(name, []):
            if sample.value != 0:
                what = "nvidia-smi exit code" if "command" in name else "NVML return code"
                raise ExporterPageError(f"the exporter could not read its GPUs ({what} {sample.value:g})")
    for sample in families.get("nvidia_smi_last_collect_success", []):
        if sample.value == 0:
            raise ExporterPageError("the exporter's last collection failed")


def _figure(kind: str, value: float, multiplier: float) -> float | None:
    """A usable figure in MiB, or None for NaN (nvitop's N/A), negative or DCGM's blank sentinels."""
    if not math.isfinite(value) or value < 0 or (kind == DCGM and value >= DCGM_BLANK_INT32):
        return None
    return value * multiplier


def _device_key(kind: str, labels: dict[str, str]) -> tuple[str, str | None]:
    """(the GPU, its MIG instance or None): the identity under which copies of one series collapse."""
    if kind == DCGM:
        gpu = labels.get("UUID") or labels.get("uuid") or labels.get("gpu", "")
        return gpu, next((labels[k] for k in _MIG_LABELS if labels.get(k)), None)
    if kind == NVITOP:
        parent, _, instance = labels.get("index", "").partition(":")  # a MIG device is `GPU:INSTANCE`
        return parent, instance or None
    return labels.get("uuid", ""), None


def _devices(kind: str, families: dict[str, list]) -> list[GpuFigures]:
    figures: dict[tuple[str, str | None], dict[str, float]] = {}
    labels_of: dict[tuple[str, str | None], dict[str, str]] = {}
    for family, samples in families.items():
        spec = _MEMORY_FAMILIES.get(family)
        if spec is None or spec[0] != kind:
            continue
        _, figure, multiplier = spec
        for sample in samples:
            key = _device_key(kind, sample.labels)
            value = _figure(kind, sample.value, multiplier)
            labels_of.setdefault(key, sample.labels)
            if value is not None:
                figures.setdefault(key, {}).setdefault(figure, value)  # a pod's copy: the first one
    info = _gpu_info(families) if kind == NVIDIA_SMI else {}
    parents = {gpu for gpu, instance in figures if instance is None}
    devices = []
    for key, values in figures.items():
        gpu, instance = key
        if instance is not None and gpu in parents:
            continue  # the whole GPU is listed too: its instances would count twice
        device = _device(kind, key, values, labels_of[key], info.get(gpu, {}))
        if device is not None:
            devices.append(device)
    return sorted(devices, key=lambda d: (_index_order(d.index), d.instance or ""))


def _gpu_info(families: dict[str, list]) -> dict[str, dict[str, str]]:
    """nvidia_gpu_exporter's identity series: uuid -> its labels (index, name)."""
    samples = families.get("nvidia_smi_gpu_info", [])
    return {sample.labels.get("uuid", ""): sample.labels for sample in samples}


def _device(
    kind: str, key: tuple[str, str | None], values: dict[str, float], labels: dict[str, str], info: dict
) -> GpuFigures | None:
    """One GPU from its figures: total = used + free + reserved, whichever one the exporter leaves out."""
    used, free, total = values.get("used"), values.get("free"), values.get("total")
    reserved = values.get("reserved")
    if reserved is None and total is not None and used is not None and free is not None:
        reserved = max(0.0, total - used - free)  # NVML's v1 total includes what the driver reserves
    reserved = reserved or 0.0
    if used is None and free is not None and total is not None:
        used = max(0.0, total - free - reserved)
    if free is None and used is not None and total is not None:
        free = max(0.0, total - used - reserved)
    if used is None or free is None:
        return None
    if total is None:
        total = used + free + reserved
    gpu, instance = key
    if kind == DCGM:
        index, name = labels.get("gpu", gpu), labels.get("modelName")
    elif kind == NVITOP:
        index, name = labels.get("index", gpu).partition(":")[0], labels.get("devicename")
    else:
        index, name = info.get("index", gpu), info.get("name")
    uuid = labels.get("UUID") or labels.get("uuid")
    return GpuFigures(str(index), uuid, name, total, used, free, reserved, instance)


def _index_order(index: str) -> tuple[int, str]:
    return (int(index), "") if index.isdigit() else (1 << 30, index)
