"""A node killed during a run of many requests through serve: no request that could be retried is lost.

Every request gets its whole answer, except a stream that was already relaying from the killed node: that
one ends with Ollama's error line (the official client raises ResponseError), never a silent cut.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import ollama
from helpers import wait_until
from serve_support import ServeThread

SMALL = "llama3.2:3b"
EMBED = "all-minilm"
REQUESTS = 60
CLIENTS = 12
KILL_AFTER = 15


def one_request(url: str, index: int) -> tuple[str, str]:
    """(kind, outcome): `full`, `error line` (a stream cut mid-way by the node), or `lost: why`."""
    client = ollama.Client(host=url, timeout=60)
    kind = ("generate", "generate-stream", "chat-stream", "embed")[index % 4]
    try:
        if kind == "generate":
            ok = client.generate(model=SMALL, prompt=f"question {index}", stream=False).done
        elif kind == "embed":
            ok = len(client.embed(model=EMBED, input=[f"text {index}"]).embeddings) == 1
        elif kind == "generate-stream":
            ok = list(client.generate(model=SMALL, prompt=f"question {index}", stream=True))[-1].done
        else:
            messages = [{"role": "user", "content": f"question {index}"}]
            ok = list(client.chat(model=SMALL, messages=messages, stream=True))[-1].done
    except ollama.ResponseError as error:
        if kind.endswith("stream") and error.status_code == -1 and "mid-stream" in error.error:
            return kind, "error line"
        return kind, f"lost: {error.status_code} {error.error}"
    except Exception as error:  # a transport error would be a silent cut: reported, never swallowed
        return kind, f"lost: {type(error).__name__}: {error}"
    return kind, "full" if ok else "lost: no final chunk"


def test_a_node_killed_mid_run_loses_no_request_that_could_be_retried(sim_cluster, make_balancer) -> None:
    preload = [(SMALL, "gpu"), (EMBED, "gpu")]
    cluster = sim_cluster([{"inference_time_scale": 3.0, "preload": preload} for _ in range(3)])
    balancer = make_balancer(cluster.urls)
    wait_until(lambda: all(s.online and s.installed for s in balancer.node_states()), "every node checked")
    victim = cluster.nodes[1]
    done: list[tuple[str, str]] = []
    lock = threading.Lock()

    def run(index: int) -> None:
        outcome = one_request(server.url, index)
        with lock:
            done.append(outcome)

    with ServeThread(balancer) as server, ThreadPoolExecutor(CLIENTS) as pool:
        futures = [pool.submit(run, index) for index in range(REQUESTS)]
        wait_until(lambda: len(done) >= KILL_AFTER, "the first answers")
        assert any(path == "/api/generate" for _, path, _ in victim.request_log)  # it was serving
        victim.stop()  # killed: its listener and every open connection go at once
        for future in futures:
            future.result(timeout=120)

    lost = [outcome for outcome in done if outcome[1].startswith("lost")]
    assert lost == []
    assert len(done) == REQUESTS
    cut = [kind for kind, outcome in done if outcome == "error line"]
    assert all(kind.endswith("stream") for kind in cut) and len(cut) <= CLIENTS
    stats = {node["node"]: node for node in balancer.get_stats()["nodes"]}
    assert stats[victim.url]["errors"] >= 1
    assert all(node["in_flight"] == 0 for node in stats.values())
