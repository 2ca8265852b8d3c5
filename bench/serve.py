"""What `serve` costs in front of Ollama (issue 10): simulated nodes and serve each in a child process.

    python3 bench/serve.py     # about a minute on 2 cores; prints a table, writes bench/results/serve.json

1. latency added over going direct: sequential non-streamed /api/generate on one kept-alive connection,
   through serve and straight to the node, interleaved in rounds; p50 and p95 (goal: p50 at most 2 ms);
2. time to first chunk of a streamed /api/generate, through serve and direct (p50, p95);
3. requests per second with 64 concurrent clients (non-streamed generate), through serve and direct, in
   interleaved rounds;
4. 256 concurrent streams held: 256 nodes, one streamed generation each, paced as Ollama sends tokens;
   how many streamed at the same moment, how many finished whole, serve's CPU meanwhile.

The simulated generations are instant for 1-3 (only the transport is measured) and paced for 4. The client
(this process) shares the machine's cores with the simulator and serve: all figures are from one machine,
and README gives them as ratios to going direct.

Server library: aiohttp (asyncio). One event loop holds every stream and relays each chunk as it comes,
with its client's connection pool to the nodes; the standard library's http.server needs a thread per
connection and a hand-written chunked relay, and its client no pooled asynchronous reads.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
from sim_farm import Farm

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "serve.json"
MODEL = "llama3.2:3b"
BODY = json.dumps({"model": MODEL, "prompt": "why is the sky blue", "stream": False}).encode()
STREAM_BODY = json.dumps({"model": MODEL, "prompt": "why is the sky blue"}).encode()
GOAL_ADDED_P50_MS = 2.0


# --------------------------------------------------------------------------------------------- processes
class Serve:
    """`flockparsecli.py serve` in a child process in front of `urls`; its URL once it listens."""

    def __init__(self, urls: list[str]) -> None:
        env = {k: v for k, v in os.environ.items() if k not in ("OLLAMA_HOST", "FLOCKPARSE_TOKEN")}
        env["FLOCKPARSE_CONFIG_DIR"] = str(ROOT / "bench" / "results")  # reads no user config
        command = [sys.executable, str(ROOT / "flockparsecli.py"), "--nodes", ",".join(urls),
                   "--no-optimizer", "serve", "--listen", "127.0.0.1:0"]  # fmt: skip
        self.proc = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=env)
        self.url = ""
        self.online = 0  # nodes the event log has said are online
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self._count(line)
            if match := re.search(r"listening on (http://\S+)", line):
                self.url = match.group(1)
                break
        if not self.url:
            raise RuntimeError("serve did not start")
        threading.Thread(target=self._drain, daemon=True).start()

    def _count(self, line: str) -> None:
        self.online += line.rstrip().endswith(" is online")

    def _drain(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:  # the event log: read so that the pipe never fills
            self._count(line)

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def wait_ready(self, nodes: int, timeout: float = 60) -> None:
        """Until every node is online in serve's log (routing puts nodes not checked yet last) and a
        request is answered."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if self.online >= nodes and post(self.url, BODY)[0] == 200:
                    return
            except OSError:
                pass
            threading.Event().wait(0.2)
        raise RuntimeError(f"serve in front of {nodes} node(s) did not answer ({self.online} online)")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def post(url: str, body: bytes) -> tuple[int, bytes]:
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    try:
        conn.request("POST", "/api/generate", body, {"Content-Type": "application/json"})
        reply = conn.getresponse()
        return reply.status, reply.read()
    finally:
        conn.close()


# --------------------------------------------------------------------------------------------- 1 and 2
class Client:
    """One kept-alive connection; times a whole reply, or the first chunk of a stream."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self.conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)

    def whole(self) -> float:
        started = time.perf_counter()
        self.conn.request("POST", "/api/generate", BODY, {"Content-Type": "application/json"})
        reply = self.conn.getresponse()
        data = reply.read()
        elapsed = time.perf_counter() - started
        assert reply.status == 200 and b'"done":true' in data, data[:200]
        return elapsed

    def first_chunk(self) -> float:
        started = time.perf_counter()
        self.conn.request("POST", "/api/generate", STREAM_BODY, {"Content-Type": "application/json"})
        reply = self.conn.getresponse()
        line = reply.readline()
        elapsed = time.perf_counter() - started
        rest = reply.read()
        assert reply.status == 200 and b'"done":false' in line and b'"done":true' in rest
        return elapsed


def percentiles(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {
        "p50_ms": round(statistics.median(ordered) * 1000, 3),
        "p95_ms": round(ordered[int(0.95 * (len(ordered) - 1))] * 1000, 3),
    }


def bench_added_latency(direct: str, served: str, rounds: int = 20, per_round: int = 25) -> dict:
    """Interleaved rounds (direct, then serve) so that a busy moment of the machine hits both."""
    clients = {"direct": Client(direct), "serve": Client(served)}
    whole: dict[str, list[float]] = {"direct": [], "serve": []}
    first: dict[str, list[float]] = {"direct": [], "serve": []}
    for client in clients.values():  # warm-up: connections open, the model's runner in use
        for _ in range(20):
            client.whole()
            client.first_chunk()
    for _ in range(rounds):
        for name, client in clients.items():
            whole[name] += [client.whole() for _ in range(per_round)]
            first[name] += [client.first_chunk() for _ in range(per_round)]
    d, s = percentiles(whole["direct"]), percentiles(whole["serve"])
    fd, fs = percentiles(first["direct"]), percentiles(first["serve"])
    added_p50 = round(s["p50_ms"] - d["p50_ms"], 3)
    return {
        "requests_each": rounds * per_round,
        "direct": d,
        "serve": s,
        "added_p50_ms": added_p50,
        "added_p95_ms": round(s["p95_ms"] - d["p95_ms"], 3),
        "ratio_p50": round(s["p50_ms"] / d["p50_ms"], 2),
        "first_chunk_direct": fd,
        "first_chunk_serve": fs,
        "first_chunk_added_p50_ms": round(fs["p50_ms"] - fd["p50_ms"], 3),
        "first_chunk_ratio_p50": round(fs["p50_ms"] / fd["p50_ms"], 2),
        "goal": f"added p50 <= {GOAL_ADDED_P50_MS} ms",
        "met": added_p50 <= GOAL_ADDED_P50_MS,
    }


# --------------------------------------------------------------------------------------------- 3
async def _hammer(url: str, clients: int, warm_up: float, seconds: float) -> tuple[int, int, list[str]]:
    """`clients` tasks sending non-streamed generates: `warm_up` seconds (connections opened, not
    counted), then `seconds` counted: (answered, failed, the first failures' texts)."""
    answered = failed = 0
    errors: list[str] = []
    loop = asyncio.get_running_loop()
    counting_from = loop.time() + warm_up
    deadline = counting_from + seconds
    connector = aiohttp.TCPConnector(limit=clients)
    headers = {"Content-Type": "application/json"}
    async with aiohttp.ClientSession(connector=connector) as session:

        async def one_client() -> None:
            nonlocal answered, failed
            while (now := loop.time()) < deadline:
                try:
                    async with session.post(url + "/api/generate", data=BODY, headers=headers) as reply:
                        await reply.read()
                        ok = reply.status == 200
                        problem = f"HTTP {reply.status}"
                except (aiohttp.ClientError, OSError) as exc:
                    ok, problem = False, f"{type(exc).__name__}: {exc}"
                if now < counting_from:
                    continue
                answered += ok
                failed += not ok
                if not ok and len(errors) < 3:
                    errors.append(problem)

        await asyncio.gather(*(one_client() for _ in range(clients)))
    return answered, failed, errors


def bench_throughput(
    direct: str, served: str, clients: int = 64, rounds: int = 4, seconds: float = 2.0
) -> dict:
    """Interleaved rounds (direct, then serve), each with a 1 s warm-up: a burst of load on the shared
    machine then hits both sides instead of one."""
    totals = {name: {"answered": 0, "failed": 0, "errors": []} for name in ("direct", "serve")}
    for _ in range(rounds):
        for name, url in (("direct", direct), ("serve", served)):
            answered, failed, errors = asyncio.run(_hammer(url, clients, 1.0, seconds))
            totals[name]["answered"] += answered
            totals[name]["failed"] += failed
            totals[name]["errors"] = (totals[name]["errors"] + errors)[:3]
    counted = rounds * seconds
    figures = {
        name: {"rps": round(t["answered"] / counted, 1), "failed": t["failed"], "errors": t["errors"]}
        for name, t in totals.items()
    }
    return {
        "clients": clients,
        "seconds": counted,
        **figures,
        "ratio": round(figures["serve"]["rps"] / figures["direct"]["rps"], 2),
    }


# --------------------------------------------------------------------------------------------- 4
async def _streams(url: str, count: int) -> dict:
    """`count` streamed generations at once; how many were streaming at the same moment."""
    streaming = peak = whole = failed = 0
    firsts: list[float] = []
    connector = aiohttp.TCPConnector(limit=count + 8)
    timeout = aiohttp.ClientTimeout(total=300)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def one_stream() -> None:
            nonlocal streaming, peak, whole, failed
            started = time.monotonic()
            last = b""
            seen_first = False
            async with session.post(url + "/api/generate", data=STREAM_BODY) as reply:
                async for line in reply.content:
                    if not seen_first:
                        seen_first = True
                        firsts.append(time.monotonic() - started)
                        streaming += 1
                        peak = max(peak, streaming)
                    last = line
            if seen_first:
                streaming -= 1
            done = b'"done":true' in last
            whole += done
            failed += not done

        started = time.monotonic()
        await asyncio.gather(*(one_stream() for _ in range(count)))
        elapsed = time.monotonic() - started
    return {"peak": peak, "whole": whole, "failed": failed, "seconds": elapsed, "firsts": firsts}


def bench_streams(count: int = 256, scale: float = 100.0) -> dict:
    """One node per stream (Ollama's runner computes one request at a time: OLLAMA_NUM_PARALLEL=1), the
    tokens paced as Ollama sends them (~0.4 s each at this scale, 8-24 per answer)."""
    with Farm(count, procs=2, preload=[f"{MODEL}@gpu"], inference_time_scale=scale) as farm:
        serve = Serve(farm.urls)
        try:
            serve.wait_ready(count)
            cpu_before = serve.cpu_seconds()
            outcome = asyncio.run(_streams(serve.url, count))
            cpu = serve.cpu_seconds() - cpu_before
        finally:
            serve.stop()
    firsts = percentiles(outcome["firsts"]) if outcome["firsts"] else {}
    return {
        "streams": count,
        "nodes": count,
        "peak_streaming_at_once": outcome["peak"],
        "finished_whole": outcome["whole"],
        "failed": outcome["failed"],
        "wall_s": round(outcome["seconds"], 2),
        "first_chunk": firsts,
        "serve_cpu_s": round(cpu, 2),
        "serve_cpu_share_of_a_core": round(cpu / outcome["seconds"], 2),
        "goal": f"{count} streams held at once, all whole",
        "met": outcome["peak"] == count and outcome["whole"] == count,
    }


# --------------------------------------------------------------------------------------------- main
def run() -> dict:
    """Every figure; run_all.py folds it into bench/results/latest.json."""
    started = time.monotonic()
    with Farm(1, preload=[f"{MODEL}@gpu"]) as farm:
        serve = Serve(farm.urls)
        try:
            serve.wait_ready(1)
            latency = bench_added_latency(farm.urls[0], serve.url)
            throughput = bench_throughput(farm.urls[0], serve.url)
        finally:
            serve.stop()
    streams = bench_streams()
    return {
        "server_library": f"aiohttp {aiohttp.__version__}",
        "why": "asyncio: one event loop holds every stream and its pooled connection to the node; "
        "http.server needs a thread per connection and a hand-written chunked relay",
        "latency": latency,
        "throughput_64_clients": throughput,
        "streams_256": streams,
        "duration_s": round(time.monotonic() - started, 1),
    }


def print_table(r: dict) -> None:
    lat, thr, st = r["latency"], r["throughput_64_clients"], r["streams_256"]
    print(f"serve: {r['server_library']} ({r['why']})")
    rows = [
        ("added latency p50 / p95", f"+{lat['added_p50_ms']:.2f} / +{lat['added_p95_ms']:.2f} ms",
         f"{lat['ratio_p50']}x direct ({lat['direct']['p50_ms']:.2f} ms)", lat["goal"], lat["met"]),
        ("first chunk p50 / p95", f"{lat['first_chunk_serve']['p50_ms']:.2f} / "
         f"{lat['first_chunk_serve']['p95_ms']:.2f} ms", f"{lat['first_chunk_ratio_p50']}x direct "
         f"({lat['first_chunk_direct']['p50_ms']:.2f} ms)", "-", True),
        ("requests/s, 64 clients", f"{thr['serve']['rps']:.0f} (direct {thr['direct']['rps']:.0f})",
         f"{thr['ratio']}x direct; failed {thr['serve']['failed']} (direct {thr['direct']['failed']})", "-",
         thr["serve"]["failed"] == 0),
        ("256 streams held", f"{st['peak_streaming_at_once']} at once, {st['finished_whole']} whole",
         f"serve CPU {st['serve_cpu_share_of_a_core']} core over {st['wall_s']} s", st["goal"], st["met"]),
    ]  # fmt: skip
    print(f"{'figure':26} {'measured':34} {'ratio':38} {'goal':24} met")
    for name, measured, ratio, goal, met in rows:
        print(f"{name:26} {measured:34} {ratio:38} {goal:24} {'yes' if met else 'NO'}")


def main() -> int:
    results = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        **run(),
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(f"{results['date']}  {results['machine']}  (bench took {results['duration_s']} s)")
    print_table(results)
    print(f"written to {RESULTS.relative_to(ROOT)}")
    met = results["latency"]["met"] and results["streams_256"]["met"]
    return 0 if met else 1


if __name__ == "__main__":
    raise SystemExit(main())
