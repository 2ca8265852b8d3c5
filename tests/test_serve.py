"""serve's data plane (issue 10 items 2-4) in process: the official `ollama` client and raw HTTP through
serve to simulated Ollama nodes, over real sockets. Routing, retries before the first byte, error lines
mid-stream, the cluster's /api/tags and /api/ps, Ollama's own answers, the token, and lb_stats."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from typing import Any

import ollama
import pytest
import requests
from helpers import LLAMA, wait_until
from serve_support import ServeThread

from ollama_sim import SimNode

SMALL = "llama3.2:3b"


@pytest.fixture
def serve(make_balancer) -> Iterator[Callable[..., tuple[Any, ServeThread]]]:
    """`balancer, server = serve([node, ...], token=None, **build_app_options)`: started, nodes checked."""
    started: list[ServeThread] = []

    def start(
        nodes: list[SimNode], token: str | None = None, health_interval: float = 0.2, **options: Any
    ) -> tuple[Any, ServeThread]:
        balancer = make_balancer([node.url for node in nodes], health_interval=health_interval)
        wait_until(
            lambda: all(s.online and s.installed for s in balancer.node_states()), "every node checked"
        )
        server = ServeThread(balancer, token=token, **options).start()
        started.append(server)
        return balancer, server

    yield start
    for server in started:
        server.stop()


def calls(node: SimNode, path: str) -> int:
    return sum(logged_path == path for _, logged_path, _ in list(node.request_log))


def lines_of(reply: requests.Response) -> list[dict]:
    return [json.loads(line) for line in reply.iter_lines() if line]


# --------------------------------------------------------------------------------------------- the client
def test_the_official_client_through_serve_streamed_and_not(sim_node, serve) -> None:
    node = sim_node(preload=[("llama3.1", "gpu"), ("all-minilm", "gpu")])
    _, server = serve([node])
    client = ollama.Client(host=server.url)

    whole = client.generate(model="llama3.1", prompt="Why is the sky blue?", stream=False)
    assert whole.done and whole.response and whole.eval_count > 0
    parts = list(client.generate(model="llama3.1", prompt="Why is the sky blue?", stream=True))
    assert len(parts) > 2 and parts[-1].done and "".join(p.response for p in parts) == whole.response

    messages = [{"role": "user", "content": "hello"}]
    answer = client.chat(model="llama3.1", messages=messages, stream=False)
    assert answer.done and answer.message.role == "assistant" and answer.message.content
    streamed = list(client.chat(model="llama3.1", messages=messages, stream=True))
    assert len(streamed) > 2 and streamed[-1].done
    assert "".join(p.message.content for p in streamed) == answer.message.content

    vectors = client.embed(model="all-minilm", input=["a", "b"]).embeddings
    assert len(vectors) == 2 and len(vectors[0]) == 384
    assert len(client.embeddings(model="all-minilm", prompt="a").embedding) == 384
    assert client.show("llama3.1").details.family == "llama"
    assert {m.model for m in client.list().models} >= {LLAMA, "all-minilm:latest"}
    assert {m.model for m in client.ps().models} == {LLAMA, "all-minilm:latest"}
    assert calls(node, "/api/generate") == 2 and calls(node, "/api/chat") == 2


def test_a_stream_arrives_in_pieces_while_the_node_still_generates(sim_node, serve) -> None:
    """Chunk by chunk, never buffered to the end: the client holds three chunks while the node's runner is
    still producing the rest (the simulator sends each token when produced, as Ollama does)."""
    node = sim_node(inference_time_scale=20.0, preload=[(SMALL, "gpu")])
    _, server = serve([node])
    stream = ollama.Client(host=server.url).generate(model=SMALL, prompt="why is the sky blue", stream=True)
    received = [next(stream) for _ in range(3)]
    assert not any(part.done for part in received)
    assert node.loaded()[0]["computing"] == 1  # the last chunk is not produced yet
    rest = list(stream)
    assert rest[-1].done and rest[-1].eval_count == len(received) + len(rest) - 1


# --------------------------------------------------------------------------------------------- routing
def test_a_request_goes_to_the_node_with_the_model_in_vram(sim_node, serve) -> None:
    on_cpu = sim_node(preload=[("llama3.1", "cpu")])
    in_vram = sim_node(preload=[("llama3.1", "gpu")])
    _, server = serve([on_cpu, in_vram])
    client = ollama.Client(host=server.url)
    for _ in range(3):
        assert client.generate(model="llama3.1", prompt="hi", stream=False).done
    assert (calls(in_vram, "/api/generate"), calls(on_cpu, "/api/generate")) == (3, 0)


@pytest.mark.parametrize("fault", ["error500", "busy", "drop", "down", "garbage", "hang"])
def test_a_node_failing_before_any_byte_is_retried_on_another(sim_node, serve, fault: str) -> None:
    broken = sim_node(preload=[("llama3.1", "gpu")])
    spare = sim_node(preload=[("llama3.1", "cpu")])
    # health checks far apart: the request, not the monitor, is the first to meet the fault
    balancer, server = serve([spare, broken], request_timeout=1.0, health_interval=60)
    broken.set_fault(fault, paths=None if fault == "down" else ("/api/generate", "/api/chat"))
    client = ollama.Client(host=server.url)

    assert client.generate(model="llama3.1", prompt="hi", stream=False).done
    parts = list(client.chat(model="llama3.1", messages=[{"role": "user", "content": "hi"}], stream=True))
    assert parts[-1].done

    stats = {n["node"]: n for n in balancer.get_stats()["nodes"]}
    assert stats[broken.url]["errors"] >= 1 and stats[spare.url]["errors"] == 0
    assert calls(spare, "/api/generate") == 1 and calls(spare, "/api/chat") == 1
    assert stats[broken.url]["in_flight"] == stats[spare.url]["in_flight"] == 0


def test_a_failed_node_cools_down_and_is_skipped_meanwhile(sim_node, serve) -> None:
    broken = sim_node(preload=[("llama3.1", "gpu")])
    spare = sim_node(preload=[("llama3.1", "cpu")])
    balancer, server = serve([spare, broken])
    broken.set_fault("error500", paths=("/api/generate",))
    client = ollama.Client(host=server.url)
    for _ in range(3):
        assert client.generate(model="llama3.1", prompt="hi", stream=False).done
    assert calls(broken, "/api/generate") == 1  # asked once; then cooling down while the spare serves
    route = balancer.explain_route("llama3.1")["nodes"]
    assert [(n["node"], n["skipped"]) for n in route] == [(spare.url, False), (broken.url, True)]
    assert route[1]["reason"].startswith("cooling down")


def test_the_callers_own_mistake_is_handed_back_from_one_node(sim_node, serve) -> None:
    first, second = sim_node(), sim_node()
    _, server = serve([first, second])
    with pytest.raises(ollama.ResponseError) as error:
        ollama.Client(host=server.url).generate(model="all-minilm", prompt="hello")
    assert error.value.status_code == 400 and "does not support generate" in error.value.error
    assert calls(first, "/api/generate") + calls(second, "/api/generate") == 1


def test_a_model_no_node_has_is_ollamas_404_from_one_node(sim_node, serve) -> None:
    first, second = sim_node(), sim_node()
    _, server = serve([first, second])
    reply = requests.post(server.url + "/api/generate", json={"model": "nope", "prompt": "x"}, timeout=10)
    assert (reply.status_code, reply.json()) == (404, {"error": "model 'nope' not found"})
    assert calls(first, "/api/generate") + calls(second, "/api/generate") == 1


def test_a_model_one_node_lacks_goes_to_the_node_that_has_it(sim_node, serve) -> None:
    without = sim_node(models=["llama3.1"], preload=[("llama3.1", "gpu")])
    with_it = sim_node(models=["llama3.1", "codellama"])
    _, server = serve([without, with_it])
    assert ollama.Client(host=server.url).generate(model="codellama", prompt="x", stream=False).done
    assert (calls(without, "/api/generate"), calls(with_it, "/api/generate")) == (0, 1)


def test_no_node_online_is_a_503_with_why(sim_node, serve) -> None:
    node = sim_node()
    balancer, server = serve([node])
    node.set_fault("down")
    balancer.vram_report()  # seen down now
    reply = requests.post(server.url + "/api/chat", json={"model": "llama3.1", "messages": []}, timeout=10)
    assert (reply.status_code, reply.json()) == (503, {"error": "no node is online to serve llama3.1:latest"})


# --------------------------------------------------------------------------------------------- mid-stream
def test_a_node_that_dies_mid_stream_ends_it_with_an_error_line(sim_node, serve) -> None:
    node = sim_node(inference_time_scale=20.0, preload=[(SMALL, "gpu")])
    balancer, server = serve([node])
    body = {"model": SMALL, "prompt": "why is the sky blue"}
    with requests.post(server.url + "/api/generate", json=body, stream=True, timeout=30) as reply:
        lines = reply.iter_lines()
        assert json.loads(next(lines))["done"] is False
        node.stop()
        rest = [json.loads(line) for line in lines if line]  # the chunked body ends properly
    assert "error" in rest[-1] and node.url in rest[-1]["error"] and "mid-stream" in rest[-1]["error"]
    assert not any(part.get("done") for part in rest)
    [stats] = balancer.get_stats()["nodes"]
    assert (stats["errors"], stats["in_flight"]) == (1, 0)


def test_the_official_client_raises_on_the_error_line(sim_node, serve) -> None:
    node = sim_node(inference_time_scale=20.0, preload=[(SMALL, "gpu")])
    _, server = serve([node])
    stream = ollama.Client(host=server.url).generate(model=SMALL, prompt="why is the sky blue", stream=True)
    assert next(stream).done is False
    node.stop()
    with pytest.raises(ollama.ResponseError, match="mid-stream"):
        list(stream)


def test_a_node_silent_mid_stream_is_cut_at_the_chunk_timeout(sim_node, serve) -> None:
    """A token every ~1.5 s (a very slow node) against a 0.3 s limit between chunks: the stream ends with
    an error line naming the pause, the node's connection is closed."""
    node = sim_node(inference_time_scale=365.0, preload=[(SMALL, "gpu")])
    balancer, server = serve([node], chunk_timeout=0.3)
    body = {"model": SMALL, "prompt": "why"}
    with requests.post(server.url + "/api/generate", json=body, stream=True, timeout=30) as reply:
        parts = lines_of(reply)
    assert parts[0]["done"] is False
    assert parts[-1] == {
        "error": f"{node.url} sent nothing for 0.3s in the middle of /api/generate (mid-stream)"
    }
    assert balancer.get_stats()["nodes"][0]["errors"] == 1


def test_a_client_that_leaves_mid_stream_is_not_the_nodes_error(sim_node, serve) -> None:
    node = sim_node(inference_time_scale=20.0, preload=[(SMALL, "gpu")])
    balancer, server = serve([node])
    body = {"model": SMALL, "prompt": "why is the sky blue"}
    reply = requests.post(server.url + "/api/generate", json=body, stream=True, timeout=30)
    assert json.loads(next(reply.iter_lines()))["done"] is False
    reply.close()  # the client goes away
    wait_until(lambda: balancer.get_stats()["nodes"][0]["in_flight"] == 0, "the relay noticed")
    wait_until(lambda: node.loaded()[0]["computing"] == 0, "the node stopped generating for nobody")
    assert balancer.get_stats()["nodes"][0]["errors"] == 0


# --------------------------------------------------------------------------------------------- the cluster
def test_tags_and_ps_are_the_union_over_the_nodes(sim_node, serve) -> None:
    gpu = sim_node(models=["llama3.1", "all-minilm"], preload=[("llama3.1", "gpu")])
    cpu = sim_node(vram_gb=0, models=["llama3.1", "codellama"], preload=[("llama3.1", "auto")])
    gone = sim_node(models=["nomic-embed-text"])
    balancer, server = serve([gpu, cpu, gone])
    gone.set_fault("down")
    balancer.vram_report()
    client = ollama.Client(host=server.url)
    names = [m.model for m in client.list().models]
    assert sorted(names) == ["all-minilm:latest", "codellama:latest", LLAMA]  # each name once
    [running] = client.ps().models
    assert running.model == LLAMA and running.size_vram == running.size > 0  # the copy in VRAM


def test_tags_with_every_node_down_is_an_error_not_an_empty_list(sim_node, serve) -> None:
    """An empty list would tell a client the cluster holds no model (a new user got 200 and [])."""
    only = sim_node()
    balancer, server = serve([only])
    only.set_fault("down")
    balancer.vram_report()  # the node is now known down
    for path in ("/api/tags", "/api/ps"):
        reply = requests.get(server.url + path, timeout=10)
        assert reply.status_code == 502 and "no node is online" in reply.json()["error"]


def test_ollamas_own_answers(sim_node, serve) -> None:
    old, new = sim_node(version="0.12.10"), sim_node()
    balancer, server = serve([old, new])
    wait_until(lambda: all(s.ollama_version for s in balancer.node_states()), "versions read")
    root = requests.get(server.url + "/", timeout=5)
    assert (root.status_code, root.text, root.headers["Content-Type"]) == (
        200,
        "Ollama is running",
        "text/plain; charset=utf-8",
    )
    assert requests.head(server.url + "/", timeout=5).status_code == 200
    assert requests.get(server.url + "/api/version", timeout=5).json() == {"version": "0.12.10"}
    unknown = requests.get(server.url + "/api/nothing", timeout=5)
    assert (unknown.status_code, unknown.text) == (404, "404 page not found")
    wrong = requests.get(server.url + "/api/generate", timeout=5)
    assert (wrong.status_code, wrong.text) == (405, "405 method not allowed")
    pull = requests.post(server.url + "/api/pull", json={"model": "llama3.1"}, timeout=5)
    assert pull.status_code == 501 and "run it against that node" in pull.json()["error"]
    assert requests.get(server.url + "/api/status", timeout=5).json()["cloud"]["disabled"] is False


def test_a_request_body_that_is_not_json_gets_the_nodes_own_400(sim_node, serve) -> None:
    node = sim_node()
    _, server = serve([node])
    reply = requests.post(server.url + "/api/generate", data=b"{not json", timeout=5)
    assert reply.status_code == 400 and "invalid character" in reply.json()["error"]


# --------------------------------------------------------------------------------------------- token
def test_with_a_token_every_request_must_carry_it(sim_node, serve) -> None:
    node = sim_node(preload=[("llama3.1", "gpu")])
    _, server = serve([node], token="s3cret")
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
        refused = requests.get(server.url + "/api/tags", headers=headers, timeout=5)
        assert refused.status_code == 401 and refused.headers["WWW-Authenticate"] == "Bearer"
        assert "Authorization: Bearer TOKEN" in refused.json()["error"]
    assert calls(node, "/api/tags") == 1  # the health monitor's first read only: nothing was forwarded
    with pytest.raises(ollama.ResponseError) as error:
        ollama.Client(host=server.url).generate(model="llama3.1", prompt="hi")
    assert error.value.status_code == 401
    client = ollama.Client(host=server.url, headers={"Authorization": "Bearer s3cret"})
    assert client.generate(model="llama3.1", prompt="hi", stream=False).done


# --------------------------------------------------------------------------------------------- lb_stats
def test_lb_stats_counts_latency_ttft_and_token_rate(sim_node, serve) -> None:
    node = sim_node(inference_time_scale=1.0, preload=[(SMALL, "gpu")])
    balancer, server = serve([node])
    client = ollama.Client(host=server.url)
    finals = []
    for _ in range(4):
        finals.append(list(client.generate(model=SMALL, prompt="why is the sky blue", stream=True))[-1])
        finals.append(client.generate(model=SMALL, prompt="and the sea?", stream=False))
    [stats] = balancer.get_stats()["nodes"]
    assert (stats["requests"], stats["errors"], stats["in_flight"], stats["samples"]) == (8, 0, 0, 8)
    assert 0 < stats["latency_p50_ms"] <= stats["latency_p95_ms"]
    assert 0 < stats["ttft_p50_ms"] <= stats["ttft_p95_ms"] <= stats["latency_p95_ms"]
    expected = sum(f.eval_count for f in finals) / (sum(f.eval_duration for f in finals) / 1e9)
    assert stats["tokens_per_s"] == round(expected, 1)


def test_concurrent_streams_are_each_relayed_whole(sim_node, serve) -> None:
    nodes = [sim_node(inference_time_scale=1.0, preload=[(SMALL, "gpu")]) for _ in range(2)]
    balancer, server = serve(nodes)
    outcomes: list[Any] = []

    def ask(index: int) -> None:
        client = ollama.Client(host=server.url)
        parts = list(client.generate(model=SMALL, prompt=f"question {index}", stream=True))
        outcomes.append(parts[-1].done and len(parts) > 2)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert outcomes == [True] * 16
    per_node = [calls(node, "/api/generate") for node in nodes]
    assert sum(per_node) == 16 and min(per_node) >= 4  # fewest in flight among equals spreads them


def test_a_request_not_answered_by_the_end_of_the_grace_period_gets_a_503(sim_node, make_balancer) -> None:
    node = sim_node(preload=[("llama3.1", "gpu")])
    balancer = make_balancer([node.url])
    wait_until(lambda: balancer.node_state(node.url).online, "node checked")
    node.set_fault("hang", paths=("/api/generate",))
    server = ServeThread(balancer, grace=0.2).start()
    replies: list[requests.Response] = []
    body = {"model": "llama3.1", "prompt": "hi", "stream": False}
    asker = threading.Thread(
        target=lambda: replies.append(requests.post(server.url + "/api/generate", json=body, timeout=30))
    )
    asker.start()
    wait_until(lambda: server.proxy.in_flight == 1 and calls(node, "/api/generate") == 1, "the request sent")
    server.stop()
    asker.join(10)
    assert (replies[0].status_code, replies[0].json()) == (
        503,
        {"error": "flockparse serve is shutting down"},
    )
    assert balancer.get_stats()["nodes"][0]["in_flight"] == 0


def test_the_control_api_is_on_the_same_address_and_checks_the_token(sim_node, serve) -> None:
    node = sim_node()
    _, server = serve([node], token="s3cret")
    status = requests.get(server.url + "/flockparse/v1/status", timeout=5)  # reads open on loopback
    assert status.status_code == 200 and status.json()["nodes"] == [node.url]
    refused = requests.post(server.url + "/flockparse/v1/optimizer/on", timeout=5)
    assert refused.status_code == 401
    _, guarded = serve([node], token="s3cret", control_reads_need_token=True)  # beyond loopback
    assert requests.get(guarded.url + "/flockparse/v1/status", timeout=5).status_code == 401
    allowed = requests.get(
        guarded.url + "/flockparse/v1/status", headers={"Authorization": "Bearer s3cret"}, timeout=5
    )
    assert allowed.status_code == 200
