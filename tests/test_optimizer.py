"""GPUOptimizer against simulated nodes over real sockets: what moves, what never moves, and when.

Nodes come from conftest's `sim_node` factory and balancers from its `make_balancer`; `Recorder`,
`wait_until` and the placement checks are in helpers.py, shared with test_balancer.py.
"""

from __future__ import annotations

import threading

import pytest
import requests
from helpers import EMBED, LLAMA, Recorder, loaded, on_cpu, on_gpu, posts, wait_until

from flockparse.rules import explicit_priority_names, matches_priority, model_key, priority_patterns
from gpu_controller import GPUController


# --------------------------------------------------------------------------------------------- names
@pytest.mark.parametrize(
    ("model", "patterns", "expected"),
    [
        ("llama3.1:latest", ["llama3.1"], True),
        ("llama3.1:70b", ["llama3.1"], False),  # a bare name means :latest, never a substring
        ("LLaMA3.1:Latest", ["llama3.1"], True),  # case-insensitive
        ("llama3.1:latest", ["LLAMA3.1"], True),
        ("llama3.1:70b", ["llama3*"], True),  # shell glob
        ("llama3.2:3b", ["llama3*"], True),
        ("codellama:latest", ["llama3*"], False),
        ("llama3.1:70b", ["*:70b"], True),
        ("llama3.1:latest", ["*:70b"], False),
        ("all-minilm:latest", ["*"], True),  # "*" = every model
        ("mxbai-embed-large:latest", ["mxbai-embed-large"], True),
        ("mxbai-embed-large:latest", ["nomic-embed-text", "mxbai*"], True),
        ("llama3:latest", ["llama3.1"], False),
        ("hf.co/org/model:q4_k_m", ["hf.co/org/*"], True),
        ("codellama:latest", [], False),
    ],
)
def test_priority_names_match_like_the_issue_says(model: str, patterns: list[str], expected: bool) -> None:
    assert matches_priority(model, patterns) is expected


def test_a_lone_string_is_one_pattern_not_a_list_of_letters() -> None:
    assert priority_patterns("llama3.1") == ["llama3.1"]
    assert priority_patterns(("a", "b")) == ["a", "b"]


def test_canonical_names_and_explicit_priority_names() -> None:
    assert model_key(" Llama3.1 ") == "llama3.1:latest"
    assert model_key("localhost:5000/lib/model") == "localhost:5000/lib/model:latest"
    assert explicit_priority_names(["llama3.1", "llama3*", "*", "LLAMA3.1:latest", "codellama:7b"]) == [
        "llama3.1:latest",
        "codellama:7b",
    ]


# --------------------------------------------------------------------------------------------- passes
def test_a_pass_moves_priority_models_off_cpu_and_leaves_the_others(sim_node, make_balancer) -> None:
    # llama3.1 fell to RAM while another program held the VRAM; clients asked for the others on CPU
    node = sim_node(
        preload=[("mxbai-embed-large", "forced-cpu"), ("llama3.1", "cpu"), ("codellama", "forced-cpu")]
    )
    balancer = make_balancer([node.url])

    actions = balancer.optimize_gpu_once()

    moved = sorted(a["model"] for a in actions if a["action"] == "moved")
    assert moved == [LLAMA, EMBED]
    assert on_gpu(node, EMBED) and on_gpu(node, LLAMA)
    assert on_cpu(node, "codellama:latest")
    assert node.counts("codellama") == {"loads": 0, "unloads": 0}  # preloads are not counted


def test_steady_state_sends_only_status_reads_and_no_reloads(sim_node, make_balancer) -> None:
    node = sim_node(preload=[("mxbai-embed-large", "gpu"), ("llama3.1", "gpu"), ("codellama", "cpu")])
    balancer = make_balancer([node.url])
    counts_before = {m: node.counts(m) for m in (EMBED, LLAMA, "codellama:latest")}
    log_start = len(node.request_log)

    for _ in range(3):
        assert balancer.optimize_gpu_once() == []

    assert {m: node.counts(m) for m in counts_before} == counts_before
    sent = [(method, path) for method, path, _ in list(node.request_log)[log_start:]]
    assert set(sent) <= {("GET", "/api/ps"), ("GET", "/api/tags"), ("GET", "/api/version")}
    assert sent.count(("GET", "/api/version")) <= 1  # read once, when the node comes up
    assert ("GET", "/api/ps") in sent


def test_bare_name_does_not_move_the_70b_and_star_moves_everything(sim_node, make_balancer) -> None:
    node = sim_node(vram_gb=80, ram_gb=128, preload=[("llama3.1:70b", "forced-cpu"), ("llama3.1", "cpu")])
    balancer = make_balancer([node.url], gpu_priority_models=["llama3.1"])

    balancer.optimize_gpu_once()
    assert on_gpu(node, LLAMA)
    assert on_cpu(node, "llama3.1:70b")
    assert node.counts("llama3.1:70b")["loads"] == 0

    balancer.gpu_priority_models = ["*"]
    actions = balancer.optimize_gpu_once()
    assert [(a["model"], a["action"]) for a in actions] == [("llama3.1:70b", "moved")]
    assert on_gpu(node, "llama3.1:70b")


def test_forced_cpu_stays_pinned_until_forced_back(sim_node, make_balancer) -> None:
    node = sim_node(preload=[("llama3.1", "gpu")])
    balancer = make_balancer([node.url], gpu_priority_models=["llama3.1"])

    [forced] = balancer.force_cpu_all_nodes("llama3.1")
    assert forced["result"]["success"] and on_cpu(node, LLAMA)
    loads = node.counts(LLAMA)["loads"]

    actions = balancer.optimize_gpu_once()
    assert [(a["action"], a["reason"]) for a in actions] == [("skipped", "pinned_cpu")]
    assert on_cpu(node, LLAMA) and node.counts(LLAMA)["loads"] == loads
    assert balancer.optimizer_status()["pinned_cpu"] == [{"node": node.url, "model": LLAMA}]

    [back] = balancer.force_gpu_all_nodes("LLaMA3.1")
    assert back["result"]["success"] and on_gpu(node, LLAMA)
    assert balancer.optimizer_status()["pinned_cpu"] == []


def test_force_cpu_pins_only_where_it_moved_the_model(sim_node, make_balancer) -> None:
    """A node where the model was not loaded was skipped: nothing to pin there (a new user saw a pin on
    a node where `force_cpu` had done nothing)."""
    holding, empty = sim_node(preload=[("llama3.1", "gpu")]), sim_node()
    balancer = make_balancer([holding.url, empty.url], gpu_priority_models=["llama3.1"])

    results = {r["node"]: r["result"] for r in balancer.force_cpu_all_nodes("llama3.1")}

    assert results[holding.url]["success"] and results[empty.url]["reason"] == "not_loaded"
    assert balancer.optimizer_status()["pinned_cpu"] == [{"node": holding.url, "model": LLAMA}]


def test_out_of_memory_is_backed_off_instead_of_retried_every_pass(sim_node, make_balancer) -> None:
    node = sim_node(vram_gb=8, ram_gb=64, preload=[("llama3.1:70b", "cpu")])
    balancer = make_balancer([node.url], gpu_priority_models=["llama3.1:70b"])
    interval_pass = balancer.optimizer.run_pass  # over all nodes, as the background thread runs it

    [first] = interval_pass()
    assert (first["action"], first["reason"]) == ("failed", "out_of_memory")
    assert on_cpu(node, "llama3.1:70b")  # the controller put it back
    [triggered] = balancer.optimizer.run_pass([node.url])  # a monitor-triggered node pass never retries
    assert triggered["reason"] == "backed_off"
    # the next interval pass retries once (VRAM another program held may be free by now) ...
    assert [a["reason"] for a in interval_pass()] == ["out_of_memory"]
    posts_after_second = len(posts(node))
    # ... then the retries come after 1, then 3 skipped passes
    assert [a["reason"] for a in interval_pass()] == ["backed_off"]
    assert len(posts(node)) == posts_after_second  # no load was sent
    [entry] = balancer.optimizer_status()["backed_off"]
    assert entry["reason"] == "out_of_memory"
    assert [a["reason"] for a in interval_pass()] == ["out_of_memory"]
    assert [a["reason"] for _ in range(3) for a in interval_pass()] == ["backed_off"] * 3
    # a pass the user asks for is not held back
    [asked] = balancer.optimize_gpu_once()
    assert (asked["action"], asked["reason"]) == ("failed", "out_of_memory")


def test_an_asked_pass_loads_named_priority_models_onto_an_idle_gpu_node(sim_node, make_balancer) -> None:
    node = sim_node()
    balancer = make_balancer(
        [node.url],
        gpu_priority_models=["llama3.1", "mxbai-embed-large", "nomic*"],
        gpu_capability={node.url: True},
    )
    wait_until(lambda: EMBED in balancer.node_state(node.url).installed, "installed models known")

    actions = balancer.optimize_gpu_once()

    assert sorted((a["model"], a["action"]) for a in actions) == [(LLAMA, "moved"), (EMBED, "moved")]
    assert on_gpu(node, EMBED) and on_gpu(node, LLAMA)
    assert node.counts("nomic-embed-text")["loads"] == 0  # a glob never loads what is not loaded


def test_a_warm_up_never_loads_next_to_models_clients_loaded(sim_node, make_balancer) -> None:
    """Loading more next to them could make Ollama evict them (sched.go:547-575 pre-flight)."""
    node = sim_node(vram_gb=8, preload=[("codellama", "gpu")])
    balancer = make_balancer([node.url], gpu_priority_models=["llama3.1"])
    wait_until(lambda: balancer.node_state(node.url).gpu == "yes", "codellama seen in VRAM")

    assert balancer.optimize_gpu_once() == []

    assert on_gpu(node, "codellama:latest") and posts(node) == []


def test_dead_and_hung_nodes_do_not_hold_up_the_others(sim_node, make_balancer) -> None:
    good = sim_node(preload=[("llama3.1", "cpu")])
    hung = sim_node(preload=[("llama3.1", "cpu")])
    dead = sim_node()
    balancer = make_balancer(
        [hung.url, dead.url, good.url],
        gpu_priority_models=["llama3.1"],
        controller=GPUController(timeout=1.0),
    )
    wait_until(lambda: all(s.online for s in balancer.node_states()), "all nodes online")
    hung.set_fault("hang")
    dead.set_fault("down")

    actions = balancer.optimize_gpu_once()

    by_node = {a["node"]: a for a in actions}
    assert by_node[good.url]["action"] == "moved" and on_gpu(good, LLAMA)
    assert by_node[hung.url]["action"] == "skipped" and by_node[dead.url]["action"] == "skipped"
    assert balancer.node_state(dead.url).online is False
    hung.clear_fault()


def test_concurrent_optimizer_and_console_moves_send_one_load(sim_node, make_balancer) -> None:
    node = sim_node(load_seconds_per_gb=0.1, preload=[("llama3.1", "cpu")])
    balancer = make_balancer([node.url], gpu_priority_models=["llama3.1"])
    loads = node.counts(LLAMA)["loads"]
    results: list[object] = []
    threads = [
        threading.Thread(target=lambda: results.append(balancer.optimize_gpu_once())),
        threading.Thread(target=lambda: results.append(balancer.force_gpu_all_nodes("llama3.1"))),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)

    assert len(results) == 2
    assert on_gpu(node, LLAMA)
    assert node.counts(LLAMA)["loads"] == loads + 1


# --------------------------------------------------------------------------------------------- thread
def test_restarted_node_gets_its_models_back_on_gpu_without_a_manual_pass(sim_node, make_balancer) -> None:
    node = sim_node(preload=[("mxbai-embed-large", "gpu"), ("llama3.1", "gpu")])
    balancer = make_balancer([node.url], auto_optimize_gpu=True, start=False)
    events = Recorder(balancer)  # before start(): sees the start-up node_up too
    balancer.start()
    events.wait("node_up")

    node.set_fault("down")
    events.wait("node_down")
    node.restart()  # comes back with both models on CPU (stored num_gpu -1): the restart bug
    node.clear_fault()

    events.wait("node_up", count=2)
    wait_until(lambda: on_gpu(node, EMBED) and on_gpu(node, LLAMA), "models back on GPU")

    def moved_by_optimizer() -> set[str | None]:
        return {e.model for e in events.of("move_finished") if e.data["source"] == "optimizer"}

    wait_until(
        lambda: moved_by_optimizer() == {EMBED, LLAMA}, "both moves reported"
    )  # verified after the sim


def test_a_restart_no_check_saw_is_still_warmed_up(sim_node, make_balancer) -> None:
    """A restarted Ollama has nothing loaded (sched.go:97): models gone before their expiry mean a restart,
    even when no health check caught the node down."""
    node = sim_node(preload=[("llama3.1", "gpu")])
    balancer = make_balancer(  # no health check between the start-up one and the report below
        [node.url], gpu_priority_models=["llama3*"], health_interval=300
    )
    events = Recorder(balancer)
    wait_until(lambda: balancer.node_state(node.url).has_gpu, "GPU evidence")
    balancer.auto_optimize_gpu = True  # started after node-up: nothing else reads the node meanwhile
    wait_until(lambda: balancer.optimizer_status()["last_pass"], "the start-up pass over")

    node.restart()
    balancer.vram_report()

    events.wait("node_restarted")
    # a glob priority brings back what was on this node's GPU before (and nothing else it matches)
    wait_until(lambda: on_gpu(node, LLAMA), "llama3.1 back on GPU")
    assert node.counts("llama3.2:3b")["loads"] == 0 and node.counts("llama3.1:70b")["loads"] == 0
    assert events.of("node_down") == []


def test_with_the_optimizer_off_nothing_moves(sim_node, make_balancer) -> None:
    node = sim_node(preload=[("llama3.1", "gpu")])
    balancer = make_balancer([node.url], gpu_priority_models=["llama3.1"])
    wait_until(lambda: balancer.node_state(node.url).models, "llama3.1 seen")

    node.restart()
    wait_until(lambda: not balancer.node_state(node.url).models, "the restart seen: nothing loaded")
    checks = sum(path == "/api/ps" for _, path, _ in node.request_log)
    wait_until(lambda: sum(p == "/api/ps" for _, p, _ in node.request_log) >= checks + 3, "three more checks")

    assert node.loaded() == [] and posts(node) == []
    assert balancer.optimization_running is False


def test_an_added_node_gets_a_pass_at_once(sim_node, make_balancer) -> None:
    first = sim_node(preload=[("llama3.1", "gpu")])
    balancer = make_balancer([first.url], auto_optimize_gpu=True, gpu_priority_models=["llama3.1"])
    events = Recorder(balancer)
    added = sim_node(preload=[("llama3.1", "cpu")])

    balancer.add_node(added.url)

    wait_until(lambda: on_gpu(added, LLAMA), "the added node's model on GPU")
    assert [e.node for e in events.of("node_added")] == [added.url]
    assert posts(first) == []


def test_a_node_coming_up_gets_absent_priority_models_warmed_onto_gpu(sim_node, make_balancer) -> None:
    """After a real restart Ollama has nothing loaded: the node-up pass loads the named priority models,
    once a small probe showed a GPU."""
    node = sim_node()
    make_balancer(
        [node.url], auto_optimize_gpu=True, gpu_priority_models=["llama3.1", "mxbai-embed-large", "nomic*"]
    )

    wait_until(lambda: on_gpu(node, EMBED) and on_gpu(node, LLAMA), "the node-up warm-up onto the GPU")
    assert node.counts("nomic-embed-text")["loads"] == 0  # a glob never loads what is not loaded
    assert node.counts("all-minilm")["loads"] == 1 and loaded(node, "all-minilm") is None  # the probe


def test_interval_passes_do_not_reload_a_priority_model_that_expired(sim_node, make_balancer) -> None:
    """Reloading an unused model every interval would be a reload storm of its own."""
    node = sim_node(keep_alive_default="1s", preload=[("llama3.1", "gpu")])
    balancer = make_balancer(
        [node.url], auto_optimize_gpu=True, gpu_priority_models=["llama3.1"], check_interval=300
    )
    events = Recorder(balancer)
    wait_until(lambda: balancer.optimizer_status()["last_pass"] is not None, "the start-up pass")
    wait_until(lambda: not node.loaded(), "llama3.1 expired (OLLAMA_KEEP_ALIVE=1s)")
    passes, loads = len(events.of("pass_finished")), node.counts(LLAMA)["loads"]

    balancer.check_interval = 0.1
    wait_until(lambda: len(events.of("pass_finished")) >= passes + 3, "three interval passes")

    assert node.loaded() == []
    assert node.counts(LLAMA)["loads"] == loads


def test_interval_change_at_run_time_wakes_the_optimizer(sim_node, make_balancer) -> None:
    node = sim_node(preload=[("llama3.1", "gpu")])
    balancer = make_balancer(
        [node.url], auto_optimize_gpu=True, check_interval=300, gpu_priority_models=["llama3.1"]
    )
    events = Recorder(balancer)
    wait_until(lambda: balancer.optimizer_status()["last_pass"] is not None, "the start-up pass")
    full_passes = len([e for e in events.of("pass_finished") if e.data["scope"] == "all"])

    balancer.check_interval = 0.1

    wait_until(
        lambda: len([e for e in events.of("pass_finished") if e.data["scope"] == "all"]) >= full_passes + 2,
        "two more interval passes",
    )
    assert balancer.optimizer_status()["interval"] == 0.1
    assert posts(node) == []  # passes over a model already on GPU send no load


def test_the_spec_loop_name_blocks_until_stopped(sim_node, make_balancer) -> None:
    node = sim_node()
    balancer = make_balancer([node.url])
    loop = threading.Thread(target=balancer._gpu_optimization_loop)
    loop.start()
    wait_until(lambda: balancer.optimization_running, "optimizer running")
    assert loop.is_alive()

    balancer.stop_gpu_optimization()

    loop.join(5)
    assert not loop.is_alive()


def test_stop_mid_wait_ends_the_thread(sim_node, make_balancer) -> None:
    node = sim_node()
    balancer = make_balancer([node.url], auto_optimize_gpu=True)
    events = Recorder(balancer)
    assert balancer.optimization_running and balancer.auto_optimize_gpu
    thread = balancer.optimizer._thread
    wait_until(lambda: balancer.optimizer_status()["last_pass"] is not None, "the start-up pass")

    assert balancer.stop_gpu_optimization() is True

    assert thread is not None and not thread.is_alive()
    assert balancer.optimization_running is False
    assert [e.kind for e in events.of("optimizer_stopped")] == ["optimizer_stopped"]
    assert balancer._start_gpu_optimization() is True and balancer.optimization_running


def test_stop_mid_pass_ends_the_thread_while_a_load_is_running(sim_node, make_balancer) -> None:
    node = sim_node(load_seconds_per_gb=2.0, preload=[("llama3.1", "cpu")])
    balancer = make_balancer([node.url], gpu_priority_models=["llama3.1"])
    wait_until(lambda: balancer.node_state(node.url).online, "node online")
    events = Recorder(balancer)
    balancer._start_gpu_optimization()
    events.wait("move_started")
    thread = balancer.optimizer._thread

    assert balancer.stop_gpu_optimization() is True

    assert thread is not None and not thread.is_alive()


def test_pass_events_carry_a_summary(sim_node, make_balancer) -> None:
    node = sim_node(preload=[("llama3.1", "cpu")])
    balancer = make_balancer([node.url], gpu_priority_models=["llama3.1"])
    events = Recorder(balancer)

    balancer.optimize_gpu_once()

    assert [e.kind for e in events.events if e.kind.startswith(("pass", "move"))] == [
        "pass_started",
        "move_started",
        "move_finished",
        "pass_finished",
    ]
    summary = events.of("pass_finished")[0].data
    assert (summary["moved"], summary["failed"], summary["skipped"], summary["checked_nodes"]) == (1, 0, 0, 1)
    assert balancer.optimizer_status()["last_pass"]["moved"] == 1


def test_two_priority_models_of_the_same_rank_that_do_not_fit_together_are_backed_off(
    sim_node, make_balancer
) -> None:
    """Two models matched by one glob rank alike: neither may count on displacing the other, and they must
    not ping-pong every pass."""
    node = sim_node(vram_gb=8, preload=[("llama3.1", "gpu"), ("codellama", "forced-cpu")])
    balancer = make_balancer([node.url], gpu_priority_models=["*lla*"])
    interval_pass = balancer.optimizer.run_pass

    [first] = interval_pass()  # codellama to GPU: Ollama evicts llama3.1 to make room

    assert (first["model"], first["action"]) == ("codellama:latest", "moved")
    assert "displaced llama3.1:latest" in first["message"] and loaded(node, LLAMA) is None
    assert {b["reason"] for b in balancer.optimizer_status()["backed_off"]} == {"displaced"}
    body = {"model": "codellama", "prompt": "", "stream": False, "options": {"num_gpu": 0}}
    requests.post(f"{node.url}/api/generate", json=body, timeout=10).raise_for_status()  # a client: CPU
    loads = node.counts("codellama")["loads"]
    [second] = interval_pass()
    assert (second["model"], second["reason"]) == ("codellama:latest", "backed_off")
    assert node.counts("codellama")["loads"] == loads


def test_a_cpu_only_node_is_probed_once_then_skipped(sim_node, make_balancer) -> None:
    node = sim_node(vram_gb=0, preload=[("mxbai-embed-large", "cpu"), ("llama3.1", "cpu")])
    balancer = make_balancer([node.url])

    first = balancer.optimize_gpu_once()  # unknown GPU: one all-layers load proves there is none

    assert [(a["action"], a["reason"]) for a in first] == [("failed", "no_gpu")]
    assert balancer.node_state(node.url).has_gpu is False
    loads = node.counts(LLAMA)["loads"] + node.counts(EMBED)["loads"]
    assert loads == 1
    second = balancer.optimize_gpu_once()
    assert [(a["model"], a["action"], a["reason"]) for a in second] == [(None, "skipped", "no_gpu")]
    assert node.counts(LLAMA)["loads"] + node.counts(EMBED)["loads"] == loads
    assert on_cpu(node, LLAMA) and on_cpu(node, EMBED)
