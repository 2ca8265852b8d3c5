"""One owner per node (flockparse/agent.py): the races and faults issue 8 found, each as a test.

Reproductions of the review (shared/review/code-review.md, section 1) turned into assertions: a late reply
never overwrites a newer one, a failed /api/tags does not disable warm-up, one pass at a time holds after a
cancel, a report is never queued behind hung nodes, a user's move never waits behind other nodes' moves,
a caller's own 4xx is not a node error, and close() really stops everything.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading

import pytest
from helpers import EMBED, LLAMA, Recorder, on_gpu, wait_until

from flockparse.balancer import RequestRejectedError
from gpu_controller import GPUController


def test_a_late_reply_never_overwrites_a_newer_one(sim_node, make_balancer) -> None:
    """A reply taken while the node was up, recorded after a newer reply saw it down: dropped."""
    node = sim_node()
    balancer = make_balancer([node.url], health_interval=300)
    wait_until(lambda: balancer.node_state(node.url).online, "node up")
    events = Recorder(balancer)
    agent = balancer._agent(node.url)
    early = agent.read_status()  # taken while the node is up ...
    node.set_fault("down")
    balancer.read_status(node.url)  # ... a newer read sees it down and is recorded first

    folded = agent.record(*early, patterns=[])

    assert folded.events == () and balancer.node_state(node.url).online is False
    assert [e.kind for e in events.events] == ["node_down"]  # no false node_up


def test_a_failed_tags_read_at_node_up_does_not_disable_warm_up(sim_node, make_balancer) -> None:
    node = sim_node()
    node.set_fault("error500", paths=("/api/tags",))
    balancer = make_balancer(
        [node.url], gpu_priority_models=["mxbai-embed-large"], gpu_capability={node.url: True}
    )
    wait_until(lambda: balancer.node_state(node.url).online, "node up")
    assert balancer.known_models() == []

    node.clear_fault()

    wait_until(lambda: EMBED in balancer.known_models(), "the installed list read again at the next check")
    assert [a["action"] for a in balancer.optimize_gpu_once()] == ["moved"] and on_gpu(node, EMBED)


def test_one_pass_at_a_time_holds_after_a_cancel(sim_node, make_balancer) -> None:
    """The cancelled pass keeps the pass until its move ends: the next pass cannot start a second move on
    the node meanwhile, and the cancelled pass's summary counts its move and comes after it."""
    node = sim_node(
        load_seconds_per_gb=0.5, preload=[("llama3.1", "forced-cpu"), ("mxbai-embed-large", "cpu")]
    )
    balancer = make_balancer([node.url])
    events = Recorder(balancer)
    cancel = threading.Event()
    first = threading.Thread(target=balancer.optimize_gpu_once, args=(cancel,))
    first.start()
    events.wait("move_started")
    cancel.set()
    first.join(10)

    second = balancer.optimize_gpu_once()

    kinds = [(e.kind, e.model) for e in events.events if e.kind != "pass_started"]
    finished = [i for i, (kind, _) in enumerate(kinds) if kind == "pass_finished"]
    moves = [i for i, (kind, _) in enumerate(kinds) if kind in ("move_finished", "move_failed")]
    assert moves[0] < finished[0] < moves[-1]  # the cancelled pass ended after its own move, before the next
    summary = events.of("pass_finished")[0].data
    assert summary["cancelled"] is True and summary["moved"] + summary["failed"] == 1
    # the second pass moves what the first did not (one model, or both if the cancel came before the load)
    assert (
        second and {a["action"] for a in second} == {"moved"} and on_gpu(node, LLAMA) and on_gpu(node, EMBED)
    )


def test_a_report_is_never_queued_behind_hung_nodes(sim_cluster, make_balancer) -> None:
    cluster = sim_cluster([{} for _ in range(100)] + [{"preload": [("llama3.1", "gpu")]}])
    *hung, healthy = cluster.nodes
    for node in hung:
        node.set_fault("hang")
    balancer = make_balancer(cluster.urls, controller=GPUController(timeout=1.0), health_interval=0.2)

    report = {entry["node"]: entry for entry in balancer.vram_report()}

    assert report[healthy.url]["stale"] is False and report[healthy.url]["online"] is True
    assert [m["name"] for m in report[healthy.url]["models"]] == [LLAMA]
    assert all(report[node.url]["stale"] or report[node.url]["online"] is False for node in hung)


def test_a_users_move_never_waits_behind_moves_on_other_nodes(sim_node, make_balancer) -> None:
    busy = sim_node(preload=[("llama3.1", "forced-cpu")])
    free = sim_node(preload=[("mxbai-embed-large", "forced-cpu")])
    busy.set_fault("hang", paths=("/api/generate",))  # the optimizer's load there does not end
    balancer = make_balancer([busy.url, free.url], gpu_priority_models=["llama3.1"])
    events = Recorder(balancer)
    threading.Thread(target=balancer.optimize_gpu_once, daemon=True).start()
    events.wait("move_started")

    threading.Thread(target=balancer.force_gpu_all_nodes, args=("mxbai-embed-large",), daemon=True).start()

    wait_until(lambda: [e for e in events.of("move_finished") if e.node == free.url], "the user's move")
    assert on_gpu(free, EMBED)
    ended = [e for e in events.events if e.kind in ("move_finished", "move_failed")]
    assert [(e.node, e.model) for e in ended] == [(free.url, EMBED)]  # the busy node's load still hangs
    busy.clear_fault()


def test_a_callers_own_bad_request_is_not_a_node_error(sim_node, make_balancer) -> None:
    node = sim_node(preload=[("llama3.1", "gpu")])
    balancer = make_balancer([node.url])
    wait_until(lambda: balancer.node_state(node.url).online, "node up")

    with pytest.raises(RequestRejectedError):
        balancer.generate("llama3.1", "hi", think=True)  # llama3.1 cannot think: Ollama's 400

    state = balancer.node_state(node.url)
    assert (state.requests, state.errors, state.last_error) == (1, 0, None)


def test_after_close_no_event_and_no_request_while_a_load_finishes(sim_node, make_balancer) -> None:
    node = sim_node(load_seconds_per_gb=0.2, preload=[("llama3.1", "forced-cpu")])
    balancer = make_balancer([node.url])
    events = Recorder(balancer)
    threading.Thread(target=balancer.force_gpu_all_nodes, args=("llama3.1",), daemon=True).start()
    events.wait("move_started")
    wait_until(lambda: node.loading == LLAMA, "the load under way on the node")
    seen = len(events.events)

    balancer.close()
    sent = len(node.request_log)
    wait_until(lambda: node.loading is None, "the node finished the load it had been sent")
    wait_until(lambda: not balancer._agent(node.url).lane.busy, "the move's thread ended")

    assert len(events.events) == seen  # nothing delivered after close()
    assert len(node.request_log) == sent  # no verification, no restore: nothing sent after close()


def test_a_script_using_the_balancer_exits_at_once_with_a_load_in_flight(sim_node) -> None:
    node = sim_node(load_seconds_per_gb=30, preload=[("llama3.1", "forced-cpu")])  # a load of minutes
    script = textwrap.dedent(
        f"""
        import threading
        from flockparse import OllamaLoadBalancer
        started = threading.Event()
        with OllamaLoadBalancer(["{node.url}"], auto_optimize_gpu=False) as lb:
            lb.subscribe(lambda e: e.kind == "move_started" and started.set())
            threading.Thread(target=lb.force_gpu_all_nodes, args=("llama3.1",), daemon=True).start()
            assert started.wait(20)
        print("closed")
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0 and done.stdout.strip() == "closed", done.stderr
    assert not on_gpu(node, LLAMA)  # gone long before a load of minutes could have ended


def test_a_model_a_failed_move_could_not_put_back_is_listed_and_restored_at_the_next_check(
    sim_node, make_balancer
) -> None:
    """Ollama evicts every other model before a big load fails (sched.go:649-671); if one cannot be loaded
    back at once (the node blips), the result says so and the node's next check loads it back."""
    node = sim_node(
        vram_gb=24, ram_gb=128, preload=[("mxbai-embed-large", "gpu"), ("llama3.1:70b", "forced-cpu")]
    )
    balancer = make_balancer([node.url], gpu_capability={node.url: True})
    events = Recorder(balancer)
    node.set_fault("error500", paths=("/api/embed",))  # mxbai cannot be loaded back for now

    [entry] = balancer.force_gpu_all_nodes("llama3.1:70b")

    result = entry["result"]
    assert result["reason"] == "out_of_memory" and result["restored"] is True  # the 70b is back in RAM
    assert result["not_restored"] == [EMBED] and "retried at the next check" in result["message"]
    assert not on_gpu(node, EMBED)
    node.clear_fault()
    [restored] = events.wait("models_restored")
    assert restored.data["restored"] == [EMBED] and on_gpu(node, EMBED)


def test_placement_changes_are_events_and_an_unchanged_reply_is_not(sim_node, make_balancer) -> None:
    """History (issue 11) learns every change of what a node holds where, and nothing on quiet checks."""
    node = sim_node(preload=[("llama3.1", "forced-cpu")])
    balancer = make_balancer([node.url], health_interval=300, auto_optimize_gpu=False)
    wait_until(lambda: balancer.node_state(node.url).online, "node up")
    events = Recorder(balancer)

    balancer.read_status(node.url)  # nothing changed since the node came up
    assert [e for e in events.events if e.kind == "placements_changed"] == []

    assert balancer.move(node.url, LLAMA, "GPU").success
    balancer.read_status(node.url)

    changes = [e for e in events.events if e.kind == "placements_changed"]
    assert len(changes) == 1 and changes[0].data["changed"] == [LLAMA]
    assert changes[0].data["previous"][LLAMA]["location"] == "CPU (RAM)"
    assert changes[0].data["models"][LLAMA]["location"] == "GPU (VRAM)"
