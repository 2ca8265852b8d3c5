"""Real VRAM figures from the GPU exporters a cluster already runs (dcgm-exporter, nvidia_gpu_exporter,
nvitop-exporter), next to what Ollama says its models hold.

  formats.py  an exporter page -> per-GPU memory (pure; prometheus_client's text parser)
  scraper.py  GpuMetricsScraper: each node's exporter at most every 15 s, own threads, deadline, cap, stale
  vram.py     the report's VRAM keys and VRAM held by other programs (pure), HeldOffTracker (events)
  nvml.py     `flockparse gpu-exporter`: NVML figures in dcgm-exporter's names, for nodes without one

The balancer owns a scraper (started and closed with it); nothing here prints.
"""

from flockparse.gpu_metrics.formats import ExporterPage, ExporterPageError, GpuFigures, parse_page
from flockparse.gpu_metrics.scraper import GpuMemory, GpuMetricsScraper, exporter_url
from flockparse.gpu_metrics.vram import HeldOff, HeldOffTracker, kept_off_by_others, vram_fields

__all__ = [
    "ExporterPage",
    "ExporterPageError",
    "GpuFigures",
    "GpuMemory",
    "GpuMetricsScraper",
    "HeldOff",
    "HeldOffTracker",
    "exporter_url",
    "kept_off_by_others",
    "parse_page",
    "vram_fields",
]
