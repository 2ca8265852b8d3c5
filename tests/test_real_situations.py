"""The situations real Ollama nodes get into (shared/spec/real-ollama-gaps.md), end to end through the core:
(a) a restart leaves nothing loaded; (b) VRAM held by another program; (c) a GPU missing at start;
(d) a Modelfile that pins a model; MLX models; older Ollama versions."""

from __future__ import annotations

import shlex

import requests
from helpers import LLAMA, Recorder, loaded, on_cpu, on_gpu, posts, wait_until

PINNED = "llama3.1-cpu:latest"  # llama3.1 created with `PARAMETER num_gpu 0`
MLX = "qwen3.5:2b-nvfp4"  # details.format "safetensors"
EMBED = "mxbai-embed-large:latest"
EMBED_NAME = "mxbai-embed-large"


def client_loads(node, model: str, **options) -> None:
    """An application's request: automatic placement unless it sends options."""
    body = {"model": model, "prompt": "hi", "stream": False, "options": options}
    requests.post(f"{node.url}/api/generate", json=body, timeout=10).raise_for_status()


def split_or_cpu(node, model: str) -> bool:
    entry = loaded(node, model)
    return entry is not None and entry["size_vram"] < entry["size"]


# ------------------------------------------------------------------------------- (a) restart: nothing loaded
def test_a_restarted_node_is_warmed_up_with_what_it_held_and_what_is_named(sim_node, make_balancer) -> None:
    node = sim_node(preload=[("llama3.1", "gpu"), ("llama3.2:3b", "gpu")])
    balancer = make_balancer(
        [node.url], auto_optimize_gpu=True, gpu_priority_models=["llama3.2*", EMBED_NAME]
    )
    events = Recorder(balancer)
    wait_until(lambda: balancer.node_state(node.url).gpu == "yes", "GPU seen")
    node.set_fault("down")
    events.wait("node_down")

    node.restart()  # Ollama >= 0.30: nothing loaded until a client asks (sched.go:97)
    node.clear_fault()

    events.wait("node_up", count=2)
    wait_until(lambda: on_gpu(node, "llama3.2:3b") and on_gpu(node, EMBED), "warm-up onto the GPU")
    assert loaded(node, LLAMA) is None  # held before, but not a priority model: not brought back


# ------------------------------------------------------------------------------- (b) VRAM held elsewhere
def test_vram_held_by_another_program_then_released_is_used_at_the_next_pass(sim_node, make_balancer) -> None:
    node = sim_node(vram_gb=24, external_vram_gb=20)  # a training job holds 20 of 24 GiB
    balancer = make_balancer([node.url], gpu_priority_models=["llama3.1"])
    wait_until(lambda: balancer.node_state(node.url).online, "node checked")
    client_loads(node, "llama3.1")
    assert split_or_cpu(node, LLAMA)  # automatic placement: what fits, the rest in RAM
    interval_pass = balancer.optimizer.run_pass

    [failed] = interval_pass()
    assert (failed["action"], failed["reason"]) == ("failed", "out_of_memory")
    assert split_or_cpu(node, LLAMA)  # restored as it was, never lost
    node.external_vram_gb = 0  # the job ends; Ollama moves nothing by itself
    assert split_or_cpu(node, LLAMA)

    [moved] = interval_pass()

    assert (moved["action"], moved["reason"]) == ("moved", "moved") and on_gpu(node, LLAMA)
    assert balancer.node_state(node.url).gpu == "yes"


def test_a_pass_asked_for_moves_at_once_even_after_back_offs(sim_node, make_balancer) -> None:
    node = sim_node(vram_gb=24, external_vram_gb=20)
    balancer = make_balancer([node.url], gpu_priority_models=["llama3.1"])
    wait_until(lambda: balancer.node_state(node.url).online, "node checked")
    client_loads(node, "llama3.1")
    for _ in range(2):
        balancer.optimizer.run_pass()  # two failures: the next interval pass would skip it
    assert [b["reason"] for b in balancer.optimizer_status()["backed_off"]] == ["out_of_memory"]
    node.external_vram_gb = 0

    [moved] = balancer.optimize_gpu_once()

    assert moved["action"] == "moved" and on_gpu(node, LLAMA)
    assert balancer.optimizer_status()["backed_off"] == []


# ------------------------------------------------------------------------------- (c) GPU missing at start
def test_a_gpu_missing_at_start_is_one_alert_one_remedy_and_no_reload_storm(
    sim_node, make_balancer, tmp_path
) -> None:
    node = sim_node(preload=[("llama3.1", "gpu")])
    runs = tmp_path / "remedy-runs"
    balancer = make_balancer(
        [node.url],
        auto_optimize_gpu=True,
        gpu_priority_models=["llama3.1", "codellama"],
        on_gpu_lost=f"echo restarting ollama on {{host}} | tee -a {shlex.quote(str(runs))}",
    )
    events = Recorder(balancer)
    wait_until(lambda: balancer.node_state(node.url).gpu == "yes", "GPU seen")
    node.set_fault("down")
    events.wait("node_down")

    node.restart(gpu_found=False)  # the driver was not ready when Ollama started
    node.clear_fault()

    [lost] = events.wait("gpu_lost")  # the warm-up's load landed in RAM
    assert "restart the Ollama service on 127.0.0.1" in lost.message
    [remedy] = events.wait("remedy_finished")
    assert remedy.data["exit_code"] == 0 and "restarting ollama on 127.0.0.1" in remedy.data["output"]
    wait_until(lambda: node.loaded() == [], "the warm-up's landings in RAM unloaded again")
    # clients load the models anyway (into RAM); passes try no move on the lost GPU
    client_loads(node, "llama3.1")
    client_loads(node, "codellama")
    loads = node.counts(LLAMA)["loads"] + node.counts("codellama")["loads"]
    for _ in range(4):
        assert {a["reason"] for a in balancer.optimizer.run_pass()} == {"gpu_lost"}
    assert node.counts(LLAMA)["loads"] + node.counts("codellama")["loads"] == loads
    assert on_cpu(node, LLAMA) and on_cpu(node, "codellama:latest")
    assert len(events.of("gpu_lost")) == 1 and runs.read_text().count("restarting") == 1

    downs = len(events.of("node_down"))
    node.set_fault("down")  # the operator fixes the driver and restarts Ollama
    events.wait("node_down", count=downs + 1)
    node.restart(gpu_found=True)
    node.clear_fault()

    events.wait("gpu_back")
    wait_until(lambda: on_gpu(node, LLAMA) and on_gpu(node, "codellama:latest"), "priority models on GPU")
    assert balancer.node_state(node.url).gpu == "yes" and len(events.of("gpu_lost")) == 1


# ------------------------------------------------------------------------------- (d) Modelfile pins, MLX
def test_a_modelfile_pinned_model_is_never_reload_stormed(sim_node, make_balancer) -> None:
    """Modelfile options apply to every request (routes.go:141-146): moving it would be undone at once."""
    node = sim_node(models=["llama3.1", PINNED])
    balancer = make_balancer([node.url], gpu_priority_models=[PINNED])
    wait_until(lambda: balancer.node_state(node.url).online, "node checked")
    client_loads(node, PINNED)
    assert on_cpu(node, PINNED)  # its Modelfile says num_gpu 0
    loads_sent = len([p for p in posts(node) if p[1] in ("/api/generate", "/api/embed")])

    first = balancer.optimizer.run_pass()
    later = [a for _ in range(10) for a in balancer.optimizer.run_pass()]

    assert [(a["action"], a["reason"]) for a in first] == [("failed", "pinned_by_modelfile")]
    assert "num_gpu 0" in first[0]["message"] and "re-create the model" in first[0]["message"]
    assert {(a["action"], a["reason"]) for a in later} == {("skipped", "pinned_by_modelfile")}
    assert len([p for p in posts(node) if p[1] in ("/api/generate", "/api/embed")]) == loads_sent
    assert len([p for p in posts(node) if p[1] == "/api/show"]) == 1  # asked once, remembered
    assert balancer.optimizer_status()["backed_off"] == []
    [entry] = balancer.vram_report()
    [row] = [m for m in entry["models"] if m["name"] == PINNED]
    assert row["unmovable"] == "pinned_by_modelfile" and "num_gpu 0" in row["unmovable_message"]


def test_a_modelfile_num_gpu_that_agrees_with_the_move_is_sent_as_it_is(quick_sim_node, controller) -> None:
    node = quick_sim_node(models=[PINNED])
    client_loads(node, PINNED, num_gpu=33)  # a client forced it onto the GPU
    assert on_gpu(node, PINNED)
    start = len(node.request_log)

    result = controller.force_cpu_load(node.url, PINNED)

    assert result["success"] is True and on_cpu(node, PINNED)
    [request] = [body for _, path, body in list(node.request_log)[start:] if path == "/api/generate"]
    assert request["options"] == {"num_gpu": 0}
    loads = node.counts(PINNED)["loads"]
    client_loads(node, PINNED)  # the Modelfile's num_gpu 0 again: no reload
    assert node.counts(PINNED)["loads"] == loads


def test_a_modelfile_context_is_left_to_the_modelfile(quick_sim_node, controller) -> None:
    node = quick_sim_node(models=["codellama-16k"], external_vram_gb=24)
    client_loads(node, "codellama-16k")  # all VRAM held elsewhere: it lands in RAM
    node.external_vram_gb = 0
    start = len(node.request_log)

    assert controller.force_gpu_load(node.url, "codellama-16k")["success"] is True

    [request] = [body for _, path, body in list(node.request_log)[start:] if path == "/api/generate"]
    assert "num_ctx" not in request["options"]
    loads = node.counts("codellama-16k")["loads"]
    client_loads(node, "codellama-16k")
    assert node.counts("codellama-16k")["loads"] == loads and on_gpu(node, "codellama-16k:latest")


def test_an_mlx_model_is_not_controllable_and_never_reloaded(sim_node, make_balancer) -> None:
    """Ollama ignores num_gpu for safetensors models (sched.go:1425) and reports them 100% GPU."""
    node = sim_node(models=["llama3.1", MLX])
    balancer = make_balancer([node.url], gpu_priority_models=["*"])
    wait_until(lambda: balancer.node_state(node.url).online, "node checked")
    client_loads(node, MLX)
    loads = node.counts(MLX)["loads"]

    [result] = balancer.force_cpu_all_nodes(MLX)
    passes = [a for _ in range(3) for a in balancer.optimizer.run_pass()]

    assert (result["result"]["success"], result["result"]["reason"]) == (False, "not_controllable")
    assert "safetensors" in result["result"]["message"]
    assert passes == [] and node.counts(MLX)["loads"] == loads
    [entry] = balancer.vram_report()
    [row] = [m for m in entry["models"] if m["name"] == MLX]
    assert (row["format"], row["controllable"], row["unmovable"]) == (
        "safetensors",
        False,
        "not_controllable",
    )


# ------------------------------------------------------------------------------- older Ollama
def test_on_ollama_before_0_30_one_landing_in_ram_proves_nothing(sim_node, make_balancer) -> None:
    """Era A (<= 0.12.10) puts a forced load silently on the CPU when its estimate fits no layer
    (v0.12.10 llm/server.go:501-503): a full GPU looks like no GPU, so one landing is not a verdict."""
    node = sim_node(version="0.12.10", vram_gb=24, external_vram_gb=24)
    balancer = make_balancer([node.url])
    wait_until(lambda: balancer.node_state(node.url).ollama_version == "0.12.10", "version read")
    client_loads(node, "llama3.1")
    assert on_cpu(node, LLAMA)

    [first] = balancer.force_gpu_all_nodes("llama3.1")

    assert first["result"]["reason"] == "no_gpu"
    state = balancer.node_state(node.url)
    assert state.gpu == "unknown" and state.reports_estimates and "not conclusive" in state.gpu_evidence
    [second] = balancer.force_gpu_all_nodes("llama3.1")
    assert second["result"]["reason"] == "no_gpu" and balancer.node_state(node.url).gpu == "no"


def test_a_lost_gpu_fixed_by_a_restart_no_check_saw_ends_with_the_first_new_model_in_vram(
    sim_node, make_balancer
) -> None:
    """After the fix and a restart between two checks, a model a client loads lands in VRAM: that new
    runner proves the GPU (the runners from before a loss are the only VRAM that proves nothing)."""
    node = sim_node(preload=[("llama3.1", "gpu")])
    balancer = make_balancer([node.url], health_interval=300)  # only the reads below see the node
    events = Recorder(balancer)
    wait_until(lambda: balancer.node_state(node.url).gpu == "yes", "GPU seen")
    node.restart(gpu_found=False)
    balancer.vram_report()
    balancer.force_gpu_all_nodes("codellama")
    assert balancer.node_state(node.url).gpu == "lost"
    node.restart(gpu_found=True)  # nothing was loaded: no check can tell this restart apart
    client_loads(node, "llama3.2:3b")

    balancer.vram_report()

    assert balancer.node_state(node.url).gpu == "yes" and len(events.of("gpu_back")) == 1
    [result] = balancer.force_gpu_all_nodes("codellama")
    assert result["result"]["success"] is True and on_gpu(node, "codellama:latest")


def test_nodes_json_shows_the_gpu_verdict_version_and_estimates(sim_node, make_balancer) -> None:
    from flockparse.console.commands import cmd_nodes

    old = sim_node(version="0.12.10")
    balancer = make_balancer([old.url])
    wait_until(lambda: balancer.node_state(old.url).ollama_version, "version read")

    [node] = cmd_nodes(type("Ctx", (), {"balancer": balancer})(), []).data

    assert (node["gpu"], node["ollama_version"], node["estimates"]) == ("unknown", "0.12.10", True)
    assert "gpu_evidence" in node and "vram_when_lost" not in node and "installed_checked_at" not in node
