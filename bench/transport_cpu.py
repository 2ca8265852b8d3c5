"""Client CPU time per `/api/ps` call, the health check's hot path (issue 8's scale goal).

    python3 bench/transport_cpu.py [calls]

Measures `time.thread_time()` of the calling thread only, so the simulator's own threads (same process)
are not counted. "before" is the transport the controller used up to issue 8 (a requests Session per node,
`response.json()`), kept here verbatim as a reference; "after" is `GPUController.call` as it is now. Both
hit the same simulated node with two models loaded, one connection reused throughout.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import requests  # noqa: E402
from requests.adapters import HTTPAdapter  # noqa: E402

from gpu_controller import GPUController  # noqa: E402
from ollama_sim import SimNode  # noqa: E402


def legacy_call(url: str) -> Callable[[], object]:
    """The pre-issue-8 transport: requests Session, (connect, read) timeouts, response.json()."""
    session = requests.Session()
    session.trust_env = False
    session.headers = {"User-Agent": "flockparse", "Accept": "application/json"}
    adapter = HTTPAdapter(pool_connections=1, pool_maxsize=8, max_retries=0)
    session.mount("http://", adapter)

    def call() -> object:
        response = session.request("GET", url + "/api/ps", json=None, timeout=(5.0, 5.0))
        return response.status_code, response.json(), response.text, response.headers.get("Date")

    return call


def current_call(url: str) -> Callable[[], object]:
    controller = GPUController(timeout=5.0)
    return lambda: controller.call(url, "GET", "/api/ps")


def cpu_per_call(call: Callable[[], object], calls: int) -> float:
    """Microseconds of this thread's CPU per call (after a warm-up that opens the connection)."""
    for _ in range(50):
        call()
    started = time.thread_time()
    for _ in range(calls):
        call()
    return (time.thread_time() - started) / calls * 1e6


def main() -> int:
    calls = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
    with SimNode(preload=[("mxbai-embed-large", "gpu"), ("llama3.1", "gpu")]) as node:
        before, after = [], []
        for _ in range(5):  # interleaved rounds: the machine is shared, take medians
            before.append(cpu_per_call(legacy_call(node.url), calls))
            after.append(cpu_per_call(current_call(node.url), calls))
    b, a = statistics.median(before), statistics.median(after)
    print(f"client CPU per /api/ps call over {calls} calls x 5 rounds (median)")
    print(f"  before (requests Session): {b:7.1f} us   rounds {[round(x) for x in before]}")
    print(f"  after  (GPUController.call): {a:7.1f} us   rounds {[round(x) for x in after]}")
    print(f"  after / before = {a / b:.2f}  ({b / a:.1f}x less CPU)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
