"""A node's GPU verdict (yes / no / unknown / lost), moves that do no harm, and the lost-GPU remedy.

Real Ollama discovers GPUs once, when it starts (discover/runner.go:45,265): a GPU that is gone cannot come
back through any API call, so the core raises an alert instead of quietly calling the node CPU-only.
"""

from __future__ import annotations

import shlex

from helpers import LLAMA, Recorder, on_gpu, posts, wait_until

from flockparse import gpu_state as gs
from gpu_controller import parse_parameters

SMALLEST = "all-minilm:latest"  # the catalogue's smallest model: what a probe loads


# --------------------------------------------------------------------------------------------- pure rules
def test_parameters_text_of_ollama_show_is_read_as_options() -> None:
    text = 'num_gpu                        0\nstop                           "<|eot_id|>"\nstop     "x"'
    assert parse_parameters(text) == {"num_gpu": "0", "stop": "<|eot_id|>"}
    assert parse_parameters("") == {} and parse_parameters(None) == {}


def test_versions_before_0_30_report_estimates() -> None:
    assert gs.reports_estimates("0.12.10") and gs.reports_estimates("0.24.0")
    assert not gs.reports_estimates("0.30.0") and not gs.reports_estimates("0.33.0-rc2")
    assert not gs.reports_estimates(None) and not gs.reports_estimates("garbage")


def test_a_ram_landing_is_conclusive_at_once_where_the_exporter_lists_a_gpu() -> None:
    verdict = gs.landing_verdict
    # without an exporter (None) or with one listing no GPU (0): the evidence rules of Ollama's eras
    for exporter in (None, 0):
        assert verdict(gpu_seen=False, landings=1, estimates=False, exporter_gpus=exporter) == gs.GPU_NO
        assert verdict(gpu_seen=True, landings=1, estimates=False, exporter_gpus=exporter) == gs.GPU_LOST
        assert verdict(gpu_seen=True, landings=1, estimates=True, exporter_gpus=exporter) is None
        assert verdict(gpu_seen=False, landings=2, estimates=True, exporter_gpus=exporter) == gs.GPU_NO
    # the exporter lists a GPU: lost, never seen with one or not, estimates or not, first landing
    for seen in (False, True):
        for estimates in (False, True):
            assert verdict(gpu_seen=seen, landings=1, estimates=estimates, exporter_gpus=2) == gs.GPU_LOST


def test_what_an_exporters_gpu_list_changes_in_a_verdict() -> None:
    verdict = gs.exporter_verdict
    no_gpu = (gs.GPU_NO, gs.EVIDENCE_EXPORTER_NO_GPU)
    assert verdict(gs.GPU_UNKNOWN, "", gpu_seen=False, exporter_gpus=0) == no_gpu
    assert verdict(gs.GPU_UNKNOWN, gs.EVIDENCE_RESTARTED, gpu_seen=True, exporter_gpus=0) is None
    assert verdict(gs.GPU_YES, gs.EVIDENCE_VRAM, gpu_seen=True, exporter_gpus=0) is None
    assert verdict(gs.GPU_NO, gs.EVIDENCE_DECLARED, gpu_seen=False, exporter_gpus=1) is None  # the operator's
    assert verdict(gs.GPU_NO, gs.EVIDENCE_RAM, gpu_seen=False, exporter_gpus=1) == (
        gs.GPU_LOST,
        gs.EVIDENCE_LOST_EXPORTER,
    )
    assert verdict(gs.GPU_NO, gs.EVIDENCE_EXPORTER_NO_GPU, gpu_seen=False, exporter_gpus=1) == (
        gs.GPU_UNKNOWN,
        gs.EVIDENCE_EXPORTER_GPU,
    )
    for state in gs.GPU_STATES:  # a GPU listed never makes a verdict `yes`: Ollama may not use it
        assert verdict(state, "", gpu_seen=False, exporter_gpus=1) in (
            None,
            (gs.GPU_UNKNOWN, gs.EVIDENCE_EXPORTER_GPU),
        )
        assert verdict(state, "", gpu_seen=False, exporter_gpus=None) is None


def test_remedy_runs_with_the_node_as_quoted_placeholders_and_environment(tmp_path) -> None:
    out = tmp_path / "out"
    template = f'echo "{{host}} {{url}} $FLOCKPARSE_NODE_HOST" > {shlex.quote(str(out))}; exit 3'
    outcome = gs.run_remedy(template, "http://gpu-box:11434")
    assert outcome.exit_code == 3 and not outcome.timed_out
    assert out.read_text().split() == ["gpu-box", "http://gpu-box:11434", "gpu-box"]


def test_a_remedy_that_hangs_is_stopped_at_its_timeout() -> None:
    outcome = gs.run_remedy("echo started; sleep 30", "http://h:1", timeout=0.5)
    assert outcome.timed_out and outcome.exit_code is None and outcome.output.strip() == "started"


# --------------------------------------------------------------------------------------------- do no harm
def test_force_gpu_on_a_cpu_only_node_leaves_no_70b_in_its_ram(quick_sim_node, controller) -> None:
    node = quick_sim_node(vram_gb=0, ram_gb=64)

    result = controller.force_gpu_load(node.url, "llama3.1:70b")

    assert (result["success"], result["reason"]) == (False, "no_gpu")
    assert "unloaded it again" in result["message"]
    wait_until(lambda: node.loaded() == [], "the probe-like load to be gone")
    assert node.counts("llama3.1:70b") == {"loads": 1, "unloads": 1}


def test_force_gpu_without_load_if_absent_sends_nothing_for_a_model_not_loaded(quick_sim_node, controller):
    node = quick_sim_node()
    result = controller.force_gpu_load(node.url, "llama3.1", load_if_absent=False)
    assert (result["success"], result["reason"]) == (False, "not_loaded")
    assert posts(node) == []


def test_probe_of_a_gpu_node_loads_the_smallest_model_and_unloads_it(quick_sim_node, controller) -> None:
    node = quick_sim_node()
    probe = controller.probe_gpu(node.url)
    assert (probe["gpu"], probe["model"]) == (True, SMALLEST)
    assert node.loaded() == [] and node.counts(SMALLEST) == {"loads": 1, "unloads": 1}


def test_force_gpu_on_an_unknown_cpu_node_probes_instead_of_loading_the_model(sim_node, make_balancer):
    cpu = sim_node(vram_gb=0)
    balancer = make_balancer([cpu.url])
    wait_until(lambda: balancer.node_state(cpu.url).online, "the node checked")
    assert balancer.node_state(cpu.url).gpu == "unknown"

    [entry] = balancer.force_gpu_all_nodes("llama3.1:70b")

    assert (entry["result"]["skipped"], entry["result"]["reason"]) == (True, "no_gpu")
    assert cpu.counts("llama3.1:70b")["loads"] == 0 and cpu.loaded() == []
    state = balancer.node_state(cpu.url)
    assert (state.gpu, state.has_gpu) == ("no", False)


def test_force_gpu_on_an_unknown_gpu_node_probes_then_moves(sim_node, make_balancer) -> None:
    node = sim_node()
    balancer = make_balancer([node.url])
    wait_until(lambda: balancer.node_state(node.url).online, "the node checked")

    [entry] = balancer.force_gpu_all_nodes("llama3.1")

    assert entry["result"]["success"] is True and on_gpu(node, LLAMA)
    assert balancer.node_state(node.url).gpu == "yes"
    assert node.counts(SMALLEST) == {"loads": 1, "unloads": 1}


# --------------------------------------------------------------------------------------------- a lost GPU
def test_a_gpu_that_disappears_is_lost_with_one_alert_and_one_remedy(sim_node, make_balancer, tmp_path):
    node = sim_node(preload=[("llama3.1", "gpu")])
    runs = tmp_path / "runs"
    balancer = make_balancer(
        [node.url], on_gpu_lost=f"echo fixing {{host}} | tee -a {shlex.quote(str(runs))}"
    )
    events = Recorder(balancer)
    wait_until(lambda: balancer.node_state(node.url).gpu == "yes", "GPU seen (llama3.1 in VRAM)")
    node.vram_gb = 0  # the GPU is gone; llama3.1's runner still reports what it held

    first = balancer.force_gpu_all_nodes("codellama")[0]["result"]
    second = balancer.force_gpu_all_nodes("codellama")[0]["result"]

    assert first["reason"] == "no_gpu" and node.counts("codellama") == {"loads": 1, "unloads": 1}
    assert (second["skipped"], second["reason"]) == (True, "gpu_lost")
    assert "restart the Ollama service on 127.0.0.1" in second["message"]
    state = balancer.node_state(node.url)
    assert (state.gpu, state.has_gpu, state.gpu_lost_since is not None) == ("lost", False, True)
    [lost] = events.wait("gpu_lost")
    assert "Ollama finds GPUs only when it starts" in lost.message
    [finished] = events.wait("remedy_finished")
    assert finished.data["exit_code"] == 0 and "fixing 127.0.0.1" in finished.data["output"]
    # health checks keep seeing llama3.1's old VRAM: that does not end the loss, nor repeat the alert
    checks = len([e for e in node.request_log if e[1] == "/api/ps"])
    wait_until(lambda: len([e for e in node.request_log if e[1] == "/api/ps"]) >= checks + 3, "3 more checks")
    assert balancer.node_state(node.url).gpu == "lost"
    assert len(events.of("gpu_lost")) == 1 and runs.read_text().splitlines() == ["fixing 127.0.0.1"]


def test_the_optimizer_tries_no_move_on_a_lost_gpu(sim_node, make_balancer) -> None:
    node = sim_node(preload=[("llama3.1", "gpu")])
    balancer = make_balancer([node.url], gpu_priority_models=["codellama", "llama3.1"])
    wait_until(lambda: balancer.node_state(node.url).gpu == "yes", "GPU seen")
    node.vram_gb = 0
    balancer.force_gpu_all_nodes("codellama")
    assert balancer.node_state(node.url).gpu == "lost"
    # a client loads codellama now: automatic placement puts it in RAM
    done = posts(node)
    reply = balancer.controller.call(
        node.url, "POST", "/api/generate", {"model": "codellama", "stream": False}
    )
    assert reply.status == 200 and len(posts(node)) == len(done) + 1
    loads, llama_loads = node.counts("codellama")["loads"], node.counts(LLAMA)["loads"]

    for _ in range(3):
        actions = balancer.optimize_gpu_once()
        assert [(a["action"], a["reason"]) for a in actions] == [("skipped", "gpu_lost")]

    assert node.counts("codellama")["loads"] == loads  # no reload storm
    assert node.counts(LLAMA)["loads"] == llama_loads  # llama3.1 on the lost GPU was never touched


def test_ollama_version_is_read_when_a_node_comes_up(sim_node, make_balancer) -> None:
    node = sim_node()
    balancer = make_balancer([node.url])
    wait_until(lambda: balancer.node_state(node.url).ollama_version, "the version read")
    [stats] = balancer.get_stats()["nodes"]
    assert stats["ollama_version"] == "0.33.0-rc2" and stats["estimates"] is False
    assert stats["gpu"] in gs.GPU_STATES


def test_models_the_core_itself_unloaded_are_not_taken_for_a_restart(sim_node, make_balancer) -> None:
    """A restarted Ollama has nothing loaded, but so has a node whose last model we just unloaded."""
    node = sim_node(preload=[("llama3.1", "gpu")])
    balancer = make_balancer([node.url], health_interval=300)  # only the reports below read the node
    events = Recorder(balancer)
    balancer.vram_report()

    assert balancer.controller.unload(node.url, "llama3.1")["success"] is True
    balancer.vram_report()

    assert events.of("node_restarted") == []
    body = {"model": "llama3.1", "prompt": "", "stream": False}
    assert balancer.controller.call(node.url, "POST", "/api/generate", body).status == 200
    balancer.vram_report()
    node.restart()
    balancer.vram_report()
    assert [e.node for e in events.of("node_restarted")] == [node.url]


def test_the_remedys_output_is_shown_as_text() -> None:
    import io

    from rich.console import Console

    from flockparse.console import render
    from flockparse.events import Event

    event = Event("remedy_finished", node="http://h:1", message="the GPU remedy exited with 0",
                  data={"output": "start\x1b[2J\x1b]0;hijack\x07 h\n"})  # fmt: skip
    out = io.StringIO()
    Console(file=out, width=200, force_terminal=True, color_system=None).print(render.event_line(event))
    assert "\x1b[2J" not in out.getvalue() and "\x07" not in out.getvalue() and "hijack" in out.getvalue()
