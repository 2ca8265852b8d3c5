"""What one simulated reply costs the farm: CPU per `/api/ps` reply of a farm process under steady load.

    python3 bench/farm_cost.py [--nodes 1250] [--connections 128] [--latency-ms 20] [--seconds 10]

One farm process (bench/sim_farm.py) serves `nodes` nodes with llama3.1 on GPU; this process keeps
`connections` keep-alive connections (spread over the nodes) each asking `GET /api/ps` again as soon as the
reply is in (a closed loop, like the status poller's requests in flight). Reported: replies a second, the
farm's CPU per reply (user + system, /proc) and its share of one core. The load generator is a bare
selectors loop so that it costs little beside the farm. Prints one JSON object (run_all.py folds it in).
"""

from __future__ import annotations

import argparse
import json
import selectors
import socket
import time

from sim_farm import Farm

REQUEST = b"GET /api/ps HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: */*\r\n\r\n"


def _reply_length(buffer: bytes) -> int:
    """Bytes of the first complete reply in `buffer` (Content-Length framing), 0 while incomplete."""
    head_end = buffer.find(b"\r\n\r\n")
    if head_end < 0:
        return 0
    head = buffer[:head_end].lower()
    start = head.find(b"content-length:")
    if start < 0:
        raise ValueError(f"reply without Content-Length: {buffer[:200]!r}")
    length = int(head[start + 15 :].split(b"\r\n", 1)[0])
    total = head_end + 4 + length
    return total if len(buffer) >= total else 0


def bench_farm_cost(nodes: int, connections: int, latency_ms: float, seconds: float) -> dict:
    """See the module docstring."""
    with Farm(nodes, procs=1, latency_ms=latency_ms, preload=["llama3.1@gpu"], keep_alive="24h") as farm:
        selector = selectors.DefaultSelector()
        buffers: dict[socket.socket, bytes] = {}
        for index in range(connections):
            host, port = farm.urls[index % nodes].removeprefix("http://").split(":")
            sock = socket.create_connection((host, int(port)))
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setblocking(False)
            selector.register(sock, selectors.EVENT_READ)
            buffers[sock] = b""
        replies, statuses = 0, set()

        def run(until: float) -> None:
            nonlocal replies
            for sock in buffers:
                sock.send(REQUEST)
            while time.monotonic() < until:
                for key, _ in selector.select(0.5):
                    sock = key.fileobj
                    data = sock.recv(65536)
                    if not data:
                        raise RuntimeError("the farm closed a connection")
                    buffers[sock] += data
                    length = _reply_length(buffers[sock])
                    if length:
                        statuses.add(buffers[sock][9:12])
                        buffers[sock] = buffers[sock][length:]
                        replies += 1
                        sock.send(REQUEST)
            while any(True for _ in buffers):  # let the replies in flight land, so connections are idle
                pending = [s for s in buffers if not _reply_length(buffers[s])]
                if not pending or not selector.select(1.0):
                    break
                for key, _ in selector.select(0.1):
                    buffers[key.fileobj] += key.fileobj.recv(65536)

        run(time.monotonic() + 1.0)  # warm up: every connection accepted and its handler running
        replies = 0
        cpu0, t0, own0 = farm.cpu_seconds(), time.monotonic(), time.process_time()
        run(t0 + seconds)
        cpu1, t1, own1 = farm.cpu_seconds(), time.monotonic(), time.process_time()
        for sock in buffers:
            sock.close()
    return {
        "nodes": nodes,
        "connections": connections,
        "latency_ms": latency_ms,
        "statuses": sorted(s.decode() for s in statuses),
        "replies_per_s": round(replies / (t1 - t0)),
        "farm_cpu_us_per_reply": round((cpu1 - cpu0) / max(1, replies) * 1e6),
        "farm_cpu_share_of_one_core": round((cpu1 - cpu0) / (t1 - t0), 2),
        "load_generator_cpu_share": round((own1 - own0) / (t1 - t0), 2),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--nodes", type=int, default=1250)
    parser.add_argument("--connections", type=int, default=128)
    parser.add_argument("--latency-ms", type=float, default=20.0)
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    print(json.dumps(bench_farm_cost(args.nodes, args.connections, args.latency_ms, args.seconds), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
