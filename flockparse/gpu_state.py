"""What the core knows about a node's GPU, and what it does when the GPU is lost.

Ollama reports no GPU inventory, so a node's GPU is known only from evidence: a model seen in VRAM, a load
that landed in VRAM or in RAM, or the operator's declaration. Four states:
- `yes`: a GPU was seen; `no`: an all-layers load landed in RAM on a node never seen with a GPU (CPU box);
- `unknown`: nothing decides yet (a fresh node, or one that restarted since a `no`/`lost` verdict);
- `lost`: a node seen with a GPU now loads into RAM. Ollama discovers GPUs once, when it starts
  (discover/runner.go:45,265 in Ollama's source), so no API call can bring the GPU back: the driver must be
  fixed and the Ollama service restarted. That is an alert with a remedy, never a quiet "CPU-only node".

The remedy command (`on_gpu_lost`) is the operator's own: it runs at most once per node per loss, with a
timeout, and its exit code and output are reported as an event.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import signal
import subprocess
from dataclasses import dataclass
from urllib.parse import urlsplit

GPU_YES = "yes"
GPU_NO = "no"
GPU_UNKNOWN = "unknown"
GPU_LOST = "lost"
GPU_STATES = (GPU_YES, GPU_NO, GPU_UNKNOWN, GPU_LOST)

EVIDENCE_VRAM = "model seen in VRAM"
EVIDENCE_NEW_VRAM = "a model loaded since the loss is in VRAM"
EVIDENCE_LOAD_VRAM = "an all-layers load landed in VRAM"
EVIDENCE_RAM = "all-layers load landed in RAM"
EVIDENCE_DECLARED = "declared in configuration"
EVIDENCE_LOST = "seen with a GPU before, now an all-layers load lands in RAM"
EVIDENCE_ONE_LANDING = "one all-layers load landed in RAM (Ollama < 0.30 reports estimates: not conclusive)"
EVIDENCE_RESTARTED = "restarted since the last verdict: asking again"
EVIDENCE_EXPORTER_NO_GPU = "its GPU exporter lists no GPU"
EVIDENCE_EXPORTER_GPU = "its GPU exporter lists a GPU; whether Ollama uses it is not known yet"
EVIDENCE_LOST_EXPORTER = "its GPU exporter lists a GPU, but an all-layers load landed in RAM"

FIRST_EXACT_VERSION = (0, 30)  # era C: /api/ps figures are measured (llama-server logs), not estimated
REMEDY_TIMEOUT_S = 120.0
REMEDY_OUTPUT_CHARS = 2000


def has_gpu_flag(state: str) -> bool | None:
    """The older tri-state view (`has_gpu`): True, False, or None when unknown."""
    return {GPU_YES: True, GPU_NO: False, GPU_LOST: False}.get(state)


def lost_remedy_text(node_url: str) -> str:
    """The sentence every lost-GPU line ends with."""
    return (
        "Ollama finds GPUs only when it starts: fix the driver, then restart the Ollama service on "
        f"{node_host(node_url)}"
    )


def node_host(node_url: str) -> str:
    return urlsplit(node_url).hostname or node_url


def version_tuple(version: str | None) -> tuple[int, ...] | None:
    """`0.12.10` -> (0, 12, 10); pre-release and build suffixes are ignored; None when unreadable."""
    if not version:
        return None
    match = re.match(r"v?(\d+)\.(\d+)(?:\.(\d+))?", version.strip())
    if match is None:
        return None
    return tuple(int(part) for part in match.groups() if part is not None)


def reports_estimates(version: str | None) -> bool:
    """Ollama before 0.30 shows *estimated* size/size_vram in /api/ps (ollama-api.md, eras A and B)."""
    parsed = version_tuple(version)
    return parsed is not None and parsed < FIRST_EXACT_VERSION


def landing_verdict(gpu_seen: bool, landings: int, estimates: bool, exporter_gpus: int | None) -> str | None:
    """What an all-layers load landing in RAM says: `lost`, `no`, or None (not conclusive yet).

    `landings` counts such loads in a row (this one included). Where the node's GPU exporter lists a GPU
    the landing is conclusive at once, even on Ollama < 0.30: the GPU is there and Ollama does not use it.
    """
    if exporter_gpus:
        return GPU_LOST
    if estimates and landings < 2:
        return None
    return GPU_LOST if gpu_seen else GPU_NO


def exporter_verdict(
    gpu: str, evidence: str, gpu_seen: bool, exporter_gpus: int | None
) -> tuple[str, str] | None:
    """What the GPU list of a node's exporter changes in its verdict: (state, evidence), or None.

    - no GPU listed, on a node never seen with one and not declared: `no`;
    - a GPU listed on a node judged `no` from a RAM landing (the load came before the first scrape): the
      GPU is there and Ollama does not use it, `lost`;
    - a GPU listed on a node the exporter itself had judged `no`: `unknown`, evidence is gathered again.
    A node seen with a GPU is never made `no` by its exporter (a loss shows when a load lands in RAM).
    """
    if exporter_gpus is None:
        return None
    if exporter_gpus == 0:
        return (GPU_NO, EVIDENCE_EXPORTER_NO_GPU) if gpu == GPU_UNKNOWN and not gpu_seen else None
    if gpu == GPU_NO and evidence == EVIDENCE_EXPORTER_NO_GPU:
        return GPU_UNKNOWN, EVIDENCE_EXPORTER_GPU
    if gpu == GPU_NO and evidence == EVIDENCE_RAM:
        return GPU_LOST, EVIDENCE_LOST_EXPORTER
    return None


@dataclass(frozen=True)
class RemedyOutcome:
    """What the operator's remedy command did."""

    command: str
    exit_code: int | None  # None: it did not finish (timeout) or could not start
    output: str  # the last REMEDY_OUTPUT_CHARS of stdout and stderr together
    timed_out: bool = False
    error: str | None = None  # why it could not start


def remedy_command(template: str, node_url: str) -> str:
    """Fill `{url}` and `{host}` (shell-quoted: they come from a node address)."""
    host = shlex.quote(node_host(node_url))
    return template.replace("{url}", shlex.quote(node_url)).replace("{host}", host)


def run_remedy(template: str, node_url: str, timeout: float = REMEDY_TIMEOUT_S) -> RemedyOutcome:
    """Run the remedy through the shell with a timeout; the node is also in FLOCKPARSE_NODE_URL/_HOST."""
    command = remedy_command(template, node_url)
    env = {**os.environ, "FLOCKPARSE_NODE_URL": node_url, "FLOCKPARSE_NODE_HOST": node_host(node_url)}
    try:
        process = subprocess.Popen(
            command,
            shell=True,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: Ctrl-C at the console is not sent to it
        )
    except OSError as exc:
        return RemedyOutcome(command, None, "", error=str(exc))
    try:
        out, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)  # the shell and whatever it started (ssh ...)
        out, _ = process.communicate()
        return RemedyOutcome(command, None, _tail(out), timed_out=True)
    return RemedyOutcome(command, process.returncode, _tail(out))


def _tail(output: bytes | None) -> str:
    return (output or b"").decode(errors="replace")[-REMEDY_OUTPUT_CHARS:]
