"""OllamaLoadBalancer against simulated nodes: nodes, health, evidence, placement, routing, faults."""

from __future__ import annotations

import threading

import pytest
from helpers import LLAMA, Recorder, on_cpu, on_gpu, wait_until

from flockparse.balancer import AllNodesFailedError, OllamaLoadBalancer, RequestRejectedError
from gpu_controller import GPUController, normalize_url


# --------------------------------------------------------------------------------------------- nodes
def test_node_urls_are_validated_and_normalised() -> None:
    balancer = OllamaLoadBalancer(["127.0.0.1:11434/"], start=False)
    try:
        assert balancer.nodes == ["http://127.0.0.1:11434"]
        assert balancer.auto_optimize_gpu is True and balancer.optimization_running is False
        assert balancer.gpu_priority_models == ["mxbai-embed-large", "llama3.1"]
        assert balancer.check_interval == 300
        for bad in ("ftp://127.0.0.1:1", "http://", "http://127.0.0.1:99999", "http://h:1/?x=1"):
            with pytest.raises(ValueError, match="invalid node URL"):
                balancer.add_node(bad)
        with pytest.raises(ValueError, match="already"):
            balancer.add_node("HTTP://127.0.0.1:11434")
        assert normalize_url("https://Example.test:8443/ollama/") == "https://example.test:8443/ollama"
        assert balancer.remove_node("http://127.0.0.1:11434/") is True
        assert balancer.remove_node("http://127.0.0.1:11434") is False and balancer.nodes == []
    finally:
        balancer.close()


def test_the_defaults_really_start_the_optimizer(sim_node) -> None:
    node = sim_node()
    with OllamaLoadBalancer([node.url]) as balancer:
        assert balancer.optimization_running is True
        assert balancer.optimizer_status()["interval"] == 300
        balancer.auto_optimize_gpu = False  # the attribute really switches the thread
        assert balancer.optimization_running is False
        balancer.auto_optimize_gpu = True
        assert balancer.optimization_running is True
    assert balancer.optimization_running is False


def test_nodes_can_be_added_and_removed_at_run_time(sim_node, make_balancer) -> None:
    first, second = sim_node(), sim_node()
    balancer = make_balancer([first.url])
    events = Recorder(balancer)

    state = balancer.add_node(second.url, has_gpu=True)
    assert state.url == second.url and state.has_gpu is True
    wait_until(lambda: balancer.node_state(second.url).online, "added node checked")
    assert balancer.remove_node(first.url) is True

    assert balancer.nodes == [second.url]
    assert [e.kind for e in events.events if e.node == second.url] == ["node_added", "node_up"]
    assert events.of("node_removed")[0].node == first.url


# --------------------------------------------------------------------------------------------- health
def test_down_node_is_reported_offline_with_its_last_models_marked_stale(sim_node, make_balancer) -> None:
    node = sim_node(preload=[("llama3.1", "gpu")])
    balancer = make_balancer([node.url], start=False)
    events = Recorder(balancer)  # before start(): sees the start-up node_up too
    balancer.start()
    wait_until(lambda: balancer.node_state(node.url).models, "first status")

    node.set_fault("down")
    events.wait("node_down")

    [row] = balancer.vram_report()
    assert row["online"] is False and row["stale"] is True and "refused" in row["error"]
    assert [m["name"] for m in row["models"]] == [LLAMA]
    node.clear_fault()
    events.wait("node_up", count=2)  # the first one was the start-up check
    [row] = balancer.vram_report()
    assert row["online"] is True and row["stale"] is False and row["error"] is None


def test_garbage_reply_is_recorded_as_an_error(sim_node, make_balancer) -> None:
    node = sim_node()
    balancer = make_balancer([node.url])
    wait_until(lambda: balancer.node_state(node.url).online, "node online")

    node.set_fault("garbage")

    wait_until(lambda: balancer.node_state(node.url).online is False, "node marked offline")
    assert "malformed" in balancer.node_state(node.url).last_error


def test_a_hung_node_does_not_stall_the_report_for_the_others(sim_node, make_balancer) -> None:
    good, hung = sim_node(preload=[("llama3.1", "gpu")]), sim_node()
    balancer = make_balancer([hung.url, good.url], controller=GPUController(timeout=1.0))
    wait_until(lambda: all(s.online for s in balancer.node_states()), "both online")
    hung.set_fault("hang")

    report = {row["node"]: row for row in balancer.vram_report()}

    assert report[good.url]["online"] is True and report[good.url]["models"][0]["location"] == "GPU (VRAM)"
    assert report[hung.url]["stale"] is True and report[hung.url]["error"]
    hung.clear_fault()


# --------------------------------------------------------------------------------------------- evidence
def test_gpu_evidence_is_yes_no_or_unknown_and_kept_up_to_date(sim_node, make_balancer) -> None:
    gpu = sim_node(preload=[("llama3.1", "gpu")])
    cpu_only = sim_node(vram_gb=0, preload=[("llama3.1", "cpu")])
    declared = sim_node(vram_gb=0)
    balancer = make_balancer([gpu.url, cpu_only.url, declared.url], gpu_capability={declared.url: False})
    wait_until(lambda: all(s.online for s in balancer.node_states()), "all online")

    assert balancer.node_state(gpu.url).has_gpu is True
    assert balancer.node_state(gpu.url).gpu_evidence == "model seen in VRAM"
    assert balancer.node_state(cpu_only.url).has_gpu is None  # a model on CPU proves nothing
    assert balancer.node_state(declared.url).has_gpu is False
    assert balancer.node_state(declared.url).gpu_evidence == "declared in configuration"

    results = {r["node"]: r["result"] for r in balancer.force_gpu_all_nodes("llama3.1")}
    assert results[cpu_only.url]["reason"] == "no_gpu" and not results[cpu_only.url].get("skipped")
    assert balancer.node_state(cpu_only.url).has_gpu is False
    assert balancer.node_state(cpu_only.url).gpu_evidence == "all-layers load landed in RAM"
    assert results[declared.url]["skipped"] is True and results[declared.url]["reason"] == "no_gpu"

    cpu_only.set_fault("down")  # a restart may bring a GPU back: the no-GPU evidence is dropped
    wait_until(lambda: balancer.node_state(cpu_only.url).online is False, "down")
    cpu_only.clear_fault()
    wait_until(lambda: balancer.node_state(cpu_only.url).online, "up again")
    assert balancer.node_state(cpu_only.url).has_gpu is None


# --------------------------------------------------------------------------------------------- placement
def test_force_all_nodes_lists_skipped_nodes_with_reasons_in_node_order(sim_node, make_balancer) -> None:
    gpu = sim_node(preload=[("llama3.1", "cpu")])
    offline = sim_node()
    no_gpu = sim_node(vram_gb=0)
    balancer = make_balancer([gpu.url, offline.url, no_gpu.url], gpu_capability={no_gpu.url: False})
    wait_until(lambda: all(s.online for s in balancer.node_states()), "all online")
    offline.set_fault("down")
    wait_until(lambda: balancer.node_state(offline.url).online is False, "offline seen")
    events = Recorder(balancer)

    results = balancer.force_gpu_all_nodes("llama3.1")

    assert [r["node"] for r in results] == [gpu.url, offline.url, no_gpu.url]
    assert results[0]["result"]["success"] is True and results[0]["result"]["location"] == "GPU (VRAM)"
    assert (results[1]["result"]["skipped"], results[1]["result"]["reason"]) == (True, "offline")
    assert (results[2]["result"]["skipped"], results[2]["result"]["reason"]) == (True, "no_gpu")
    assert on_gpu(gpu, LLAMA)
    assert [(e.kind, e.node) for e in events.events] == [
        ("move_started", gpu.url),
        ("move_finished", gpu.url),
    ]

    [moved_cpu, down_cpu, cpu_result] = balancer.force_cpu_all_nodes("llama3.1")
    assert moved_cpu["result"]["success"] is True and on_cpu(gpu, LLAMA)
    assert down_cpu["result"]["reason"] == "offline"
    # force_cpu acts only where the model is loaded: nothing is loaded just to sit in RAM
    assert (cpu_result["result"]["skipped"], cpu_result["result"]["reason"]) == (True, "not_loaded")
    assert no_gpu.loaded() == [] and no_gpu.counts(LLAMA)["loads"] == 0


def test_two_threads_forcing_the_same_model_send_one_load(sim_node, make_balancer) -> None:
    node = sim_node(load_seconds_per_gb=0.1, preload=[("llama3.1", "cpu")])
    balancer = make_balancer([node.url])
    results: list[dict] = []
    threads = [
        threading.Thread(target=lambda: results.extend(balancer.force_gpu_all_nodes("llama3.1")))
        for _ in range(2)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)

    assert sorted(r["result"]["reason"] for r in results) == ["already", "moved"]
    assert node.counts(LLAMA)["loads"] == 1 and on_gpu(node, LLAMA)


# --------------------------------------------------------------------------------------------- routing
def test_routing_prefers_vram_then_a_gpu_node_then_ram_then_unknown(sim_node, make_balancer) -> None:
    """The adaptive order of issue 10 (flockparse/routing.py Tier): 100% in VRAM, a GPU node where it is
    installed (Ollama loads it onto the GPU), loaded in RAM, then a node whose GPU is not known yet."""
    in_vram = sim_node(preload=[("llama3.1", "gpu")])
    on_ram = sim_node(preload=[("llama3.1", "cpu")])
    gpu_no_model = sim_node(preload=[("all-minilm", "gpu")])
    unknown = sim_node()
    urls = [unknown.url, gpu_no_model.url, on_ram.url, in_vram.url]
    balancer = make_balancer(urls)
    wait_until(lambda: all(s.online and s.installed for s in balancer.node_states()), "all online")

    assert balancer.pick_node("llama3.1") == in_vram.url
    assert balancer.pick_node("llama3.1", exclude=[in_vram.url]) == gpu_no_model.url
    assert balancer.pick_node("llama3.1", exclude=[in_vram.url, gpu_no_model.url]) == on_ram.url
    assert balancer.pick_node("llama3.1", exclude=urls[1:]) == unknown.url
    assert balancer.pick_node("llama3.1", exclude=urls) is None
    explained = balancer.explain_route("llama3.1")
    assert [n["node"] for n in explained["nodes"]] == [in_vram.url, gpu_no_model.url, on_ram.url, unknown.url]
    assert explained["nodes"][0]["reason"] == "llama3.1:latest is 100% in VRAM"


def test_generate_fails_over_to_a_different_node_and_counts(sim_node, make_balancer) -> None:
    broken = sim_node(preload=[("llama3.1", "gpu")])
    spare = sim_node(preload=[("llama3.1", "cpu")])
    balancer = make_balancer([spare.url, broken.url])
    wait_until(lambda: all(s.online for s in balancer.node_states()), "both online")
    broken.set_fault("error500", paths=("/api/generate",))

    reply = balancer.generate("llama3.1", "Why is the sky blue?", options={"num_predict": 4})

    assert reply["done"] is True and reply["response"]
    assert sum(path == "/api/generate" for _, path, _ in broken.request_log) == 1  # never retried
    assert sum(path == "/api/generate" for _, path, _ in spare.request_log) == 1
    stats = {n["node"]: n for n in balancer.get_stats()["nodes"]}
    assert (stats[broken.url]["requests"], stats[broken.url]["errors"]) == (1, 1)
    assert (stats[spare.url]["requests"], stats[spare.url]["errors"], stats[spare.url]["in_flight"]) == (
        1,
        0,
        0,
    )
    assert "optimizer" in balancer.get_stats()


def test_embed_is_routed_and_all_nodes_failing_raises_a_clear_error(sim_node, make_balancer) -> None:
    first, second = sim_node(), sim_node()
    balancer = make_balancer([first.url, second.url])
    wait_until(lambda: all(s.online for s in balancer.node_states()), "both online")

    assert len(balancer.embed("all-minilm", ["a", "b"])["embeddings"]) == 2

    first.set_fault("drop", paths=("/api/embed",))
    second.set_fault("garbage", paths=("/api/embed",))
    with pytest.raises(AllNodesFailedError) as failure:
        balancer.embed("all-minilm", "text")
    assert {node for node, _ in failure.value.errors} == {first.url, second.url}
    assert "no node could serve all-minilm" in str(failure.value)


def test_a_client_error_is_not_failed_over(sim_node, make_balancer) -> None:
    first, second = sim_node(), sim_node()
    balancer = make_balancer([first.url, second.url])
    wait_until(lambda: all(s.online for s in balancer.node_states()), "both online")

    with pytest.raises(RequestRejectedError, match="does not support generate"):
        balancer.generate("all-minilm", "hello")
    assert sum(p == "/api/generate" for _, p, _ in first.request_log + second.request_log) == 1


def test_known_models_lists_installed_and_loaded_names(sim_node, make_balancer) -> None:
    node = sim_node(models=["llama3.1", "all-minilm"], preload=[("llama3.1", "gpu")])
    balancer = make_balancer([node.url])
    wait_until(lambda: balancer.node_state(node.url).installed, "installed list read")

    assert balancer.known_models() == ["all-minilm:latest", LLAMA]


def test_an_offline_node_is_rechecked_sooner_than_the_health_interval(sim_node, make_balancer) -> None:
    node = sim_node()
    balancer = make_balancer([node.url], health_interval=60)
    events = Recorder(balancer)
    wait_until(lambda: balancer.node_state(node.url).online, "first check")
    node.set_fault("down")
    balancer.vram_report()  # records it offline without waiting a minute for the monitor
    assert balancer.node_state(node.url).online is False

    ups = len(events.of("node_up"))

    node.clear_fault()

    events.wait("node_up", count=ups + 1, timeout=10)  # well before the next 60 s round
