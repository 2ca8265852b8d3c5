"""Room on the GPU (issue 12): ranked priorities, evictions, `cleanup` and the fit check.

The rules are tested as plain data (flockparse/room.py); the scenarios run on simulated nodes over real
sockets, whose scheduler makes room as Ollama's does (sched.go:547-562 the 80% pre-flight, one victim at a
time by keep_alive then blob name, an idle runner before a busy one: ollama_sim/scheduler.py `victims`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import requests
from helpers import LLAMA, Recorder, loaded, on_cpu, on_gpu, posts, wait_until
from serve_support import ServeThread

from flockparse.room import (
    BUSY,
    EVICT,
    FITS,
    MOVE,
    NO_FIT,
    NO_ROOM,
    UNKNOWN,
    Resident,
    VramBounds,
    fit,
    plan_room,
)
from flockparse.rules import outranks, priority_rank
from ollama_sim import SimNode
from ollama_sim.exporter import SimExporter

CODE = "codellama:latest"
SMALL = "llama3.2:3b"
TWENTY_PASSES = 20


# --------------------------------------------------------------------------------------------- rules
def test_the_list_order_is_the_ranking() -> None:
    patterns = ["llama3.1", "code*", "*:70b"]
    assert [priority_rank(n, patterns) for n in ("llama3.1", CODE, "llama3.1:70b", SMALL)] == [0, 1, 2, None]
    assert outranks(0, 1) and outranks(1, None) and not outranks(1, 0) and not outranks(1, 1)
    assert not outranks(None, None)


def test_fit_is_known_only_between_what_was_seen_held_and_what_was_learned() -> None:
    bounds = VramBounds(floor_mb=8000, ceiling_mb=10000)
    assert fit(2000, 5000, bounds).verdict == FITS  # 2000 <= 0.8 x 3000
    assert fit(4000, 5000, bounds).verdict == NO_FIT  # 4000 >= 0.8 x 5000
    assert fit(3000, 5000, bounds).verdict == UNKNOWN
    assert fit(None, 0, bounds).verdict == UNKNOWN
    assert fit(9000, 0, VramBounds(floor_mb=8000)).verdict == UNKNOWN  # no ceiling: never "does not fit"


def test_a_ceiling_is_learned_from_ollamas_evictions_and_dropped_when_more_is_seen_held() -> None:
    # 6000 held by two models; loading a 4000 one made Ollama unload the 2000 one: 6000 + 4000 / 0.8 is more
    # than the GPU has
    learned = VramBounds(floor_mb=6000).evicted(6000, 4000, [2000])
    assert learned.ceiling_mb == pytest.approx(6000 + 4000 / 0.8)
    assert fit(4000, 6000, learned).verdict == NO_FIT
    assert learned.seen(11500).ceiling_mb is None  # the GPU held more than the ceiling: it was wrong
    assert VramBounds(floor_mb=6000).evicted(6000, 4000, []).ceiling_mb is None


def test_models_seen_not_fitting_together_never_fit_together_again_whatever_the_sizes() -> None:
    learned = VramBounds(floor_mb=6000).evicted(5500, 5900, [5500], together=["code", "llama"])
    verdict = fit(5400, 5900, learned, "llama", ["code"])
    assert (verdict.verdict, verdict.seen_not_fitting) == (NO_FIT, ("code",))
    assert fit(5400, 2000, learned, "llama", ["small"]).verdict != NO_FIT  # not with the others
    assert learned.seen(11500, ["code", "llama"]).too_big == frozenset()  # seen together after all


def resident(name: str, gb: float, rank: int | None, busy: bool = False, expires: str = "") -> Resident:
    return Resident(name, gb * 1024, rank, busy, expires)


def test_victims_are_lower_ranked_idle_ones_non_priority_first_then_the_lowest_then_the_longest_idle() -> (
    None
):
    bounds = VramBounds(floor_mb=24 * 1024, ceiling_mb=24 * 1024)
    residents = [
        resident("high", 6, 0),
        resident("low", 4, 2),
        resident("other-new", 4, None, expires="2026-11-30T10:00:00Z"),
        resident("other-old", 4, None, expires="2026-11-30T09:00:00Z"),
        resident("streaming", 4, None, busy=True),
    ]
    plan = plan_room("wanted", 1, 8 * 1024, residents, bounds)  # 2 GB free: needs two 4 GB models out
    assert plan.action == EVICT
    assert [v.name for v in plan.victims] == ["other-old", "other-new"]
    plan = plan_room("wanted", 1, 11 * 1024, residents, bounds)  # the lower priority goes too
    assert [v.name for v in plan.victims] == ["other-old", "other-new", "low"]


def test_a_victim_the_others_made_unnecessary_is_spared() -> None:
    """The longest idle goes first, but when the next one alone makes room, the first is not needed."""
    bounds = VramBounds(floor_mb=8 * 1024, ceiling_mb=8 * 1024)
    residents = [
        resident("tiny", 0.1, None, expires="2026-11-30T09:00:00Z"),
        resident("small", 2.6, None, expires="2026-11-30T10:00:00Z"),
    ]
    plan = plan_room("wanted", 0, 5.3 * 1024, residents, bounds)  # 5.3 GB fits in 0.8 x 7.9, not 0.8 x 5.3
    assert (plan.action, [v.name for v in plan.victims]) == (EVICT, ["small"])


def test_nothing_is_unloaded_when_that_would_not_make_room() -> None:
    bounds = VramBounds(floor_mb=16 * 1024, ceiling_mb=16 * 1024)
    residents = [resident("high", 10, 0), resident("other", 4, None)]
    plan = plan_room("wanted", 1, 8 * 1024, residents, bounds)
    assert (plan.action, plan.victims) == (NO_ROOM, ())
    assert plan.message.startswith("does not fit: needs ~8.0 GB, at most ~2.0 GB seen free")
    assert plan.message.endswith("; held by high 10.0 GB, not of lower priority")


def test_a_busy_model_is_waited_for_never_evicted() -> None:
    bounds = VramBounds(floor_mb=16 * 1024, ceiling_mb=16 * 1024)
    plan = plan_room("wanted", 0, 8 * 1024, [resident("streaming", 10, None, busy=True)], bounds)
    assert (plan.action, plan.victims) == (BUSY, ())
    assert "streaming is serving requests" in plan.message
    unknown = plan_room("wanted", 0, 8 * 1024, [resident("streaming", 10, None, busy=True)], VramBounds())
    assert unknown.action == BUSY  # a load could make Ollama wait for it, then unload it
    assert plan_room("wanted", 0, 8 * 1024, [resident("idle", 10, None)], VramBounds()).action == MOVE


# --------------------------------------------------------------------------------------------- scenarios
@pytest.fixture
def exporter() -> Iterator[Callable[..., SimExporter]]:
    started: list[SimExporter] = []

    def start(node: SimNode) -> SimExporter:
        started.append(SimExporter(node, format="dcgm").start())
        return started[-1]

    yield start
    for item in started:
        item.stop()


def loads(node: SimNode) -> int:
    return sum(path in ("/api/generate", "/api/embed") for _, path, _ in posts(node))


def settled(balancer: Any, node: SimNode, passes: int) -> list[list[dict]]:
    """`passes` interval passes; none may send a load."""
    before, results = loads(node), []
    for _ in range(passes):
        results.append(balancer.optimizer.run_pass())
    assert loads(node) == before, "a settled node got a load"
    return results


def test_a_lower_priority_never_displaces_a_higher_one_and_the_pair_settles(sim_node, make_balancer) -> None:
    """llama3.1 ranks above codellama and the two do not fit together in 8 GB: codellama's move makes Ollama
    unload llama3.1, so it is undone at once (codellama to RAM, llama3.1 back on the GPU) and the VRAM
    learned then keeps every later pass from trying again."""
    node = sim_node(vram_gb=8, preload=[("llama3.1", "gpu"), ("codellama", "forced-cpu")])
    balancer = make_balancer([node.url], gpu_priority_models=["llama3.1", "codellama"])

    [first] = balancer.optimizer.run_pass()

    assert (first["model"], first["action"], first["reason"]) == (CODE, "undone", "no_room")
    assert "Ollama unloaded llama3.1:latest (higher priority)" in first["message"]
    assert on_gpu(node, LLAMA) and on_cpu(node, CODE)
    for actions in settled(balancer, node, TWENTY_PASSES):
        assert [(a["model"], a["reason"]) for a in actions] == [(CODE, "no_room")]
    assert on_gpu(node, LLAMA) and on_cpu(node, CODE)
    assert balancer.optimizer_status()["backed_off"] == []  # settled by what is known, not by waiting


def test_a_warm_up_loads_the_higher_priority_and_leaves_the_lower_one_away(sim_node, make_balancer) -> None:
    """A restarted node holds nothing: the warm-up loads both priority models in rank order; the second one
    makes Ollama unload the first, so it is unloaded again and the first put back."""
    node = sim_node(vram_gb=8)
    balancer = make_balancer([node.url], gpu_priority_models=["llama3.1", "codellama"])
    wait_until(lambda: balancer.node_state(node.url).installed, "the node's models listed")

    actions = balancer.optimizer.run_pass([node.url], load_absent=True)

    assert [(a["model"], a["action"]) for a in actions] == [(LLAMA, "moved"), (CODE, "undone")]
    assert "codellama:latest is unloaded again; llama3.1:latest back on GPU" in actions[1]["message"]
    assert on_gpu(node, LLAMA) and loaded(node, CODE) is None
    for later in settled(balancer, node, TWENTY_PASSES):
        assert later == []


@pytest.mark.parametrize("evict_to", ["unload", "cpu"])
def test_a_higher_priority_takes_the_gpu_from_a_lower_one_once(sim_node, make_balancer, evict_to) -> None:
    node = sim_node(vram_gb=8, preload=[("llama3.1", "gpu"), ("codellama", "forced-cpu")])
    balancer = make_balancer([node.url], gpu_priority_models=["codellama", "llama3.1"], evict_to=evict_to)

    first = balancer.optimizer.run_pass()

    assert [(a["model"], a["action"]) for a in first] == [(CODE, "moved")]
    assert first[0]["message"].endswith("it displaced llama3.1:latest (lower priority)")
    assert on_gpu(node, CODE) and balancer.optimizer_status()["backed_off"] == []
    if evict_to == "cpu":  # what Ollama unloaded for it goes to RAM instead of away
        assert on_cpu(node, LLAMA)
    else:
        assert loaded(node, LLAMA) is None
    later = settled(balancer, node, TWENTY_PASSES)
    expected = [(LLAMA, "no_room")] if evict_to == "cpu" else []
    assert all([(a["model"], a["reason"]) for a in actions] == expected for actions in later)
    assert on_gpu(node, CODE)


def exporter_node(sim_node, exporter, make_balancer, **options: Any) -> tuple[SimNode, Any]:
    """14 GB: a non-priority llama3.2:3b and the second priority codellama on the GPU, the first priority
    llama3.1 in RAM (a client asked num_gpu 0); the node's exporter says how much VRAM is free."""
    node = sim_node(vram_gb=14, preload=[(SMALL, "gpu"), ("codellama", "gpu"), ("llama3.1", "forced-cpu")])
    page = exporter(node)
    balancer = make_balancer(
        [node.url], gpu_priority_models=["llama3.1", "codellama"], gpu_metrics={node.url: page.url}, **options
    )
    wait_until(lambda: balancer.gpu_memory(node.url).known, "the exporter scraped")
    wait_until(lambda: balancer.node_state(node.url).online, "the node checked")
    return node, balancer


def test_the_optimizer_unloads_what_it_must_and_no_more(sim_node, exporter, make_balancer) -> None:
    node, balancer = exporter_node(sim_node, exporter, make_balancer)
    events = Recorder(balancer)

    actions = balancer.optimizer.run_pass()

    assert [(a["model"], a["action"]) for a in actions] == [(SMALL, "evicted"), (LLAMA, "moved")]
    assert actions[0]["message"].endswith(
        ", 2.6 GB of VRAM, idle, not a priority, to make room for llama3.1:latest"
    )
    assert loaded(node, SMALL) is None and on_gpu(node, LLAMA) and on_gpu(node, CODE)
    [evicted] = events.of("model_evicted")
    assert (evicted.model, evicted.data["for"]) == (SMALL, LLAMA)
    assert balancer.optimizer_status()["last_pass"]["evicted"] == 1


def test_evict_to_cpu_keeps_the_model_in_ram(sim_node, exporter, make_balancer) -> None:
    node, balancer = exporter_node(sim_node, exporter, make_balancer, evict_to="cpu")
    actions = balancer.optimizer.run_pass()
    assert [(a["model"], a["action"]) for a in actions] == [(SMALL, "evicted"), (LLAMA, "moved")]
    assert on_cpu(node, SMALL) and on_gpu(node, LLAMA) and on_gpu(node, CODE)


def test_a_dry_run_shows_the_evictions_and_sends_nothing(sim_node, exporter, make_balancer) -> None:
    node, balancer = exporter_node(sim_node, exporter, make_balancer)
    sent = len(posts(node))

    plan = balancer.optimize_gpu_once(dry_run=True)

    assert [(a["model"], a["action"]) for a in plan] == [(SMALL, "would_evict"), (LLAMA, "would_move")]
    assert plan[0]["message"].startswith("would unload llama3.2:3b, 2.6 GB of VRAM, idle, not a priority")
    assert len(posts(node)) == sent and on_gpu(node, SMALL) and on_cpu(node, LLAMA)


def test_a_warm_up_dry_run_plans_each_move_on_what_the_ones_before_it_leave(
    sim_node, exporter, make_balancer
) -> None:
    """An empty 8 GB node, priority llama3.1 then codellama: with its exporter the dry run knows that once
    llama3.1 is planned on the GPU codellama has no room, as the real pass will find."""
    node = sim_node(vram_gb=8)
    page = exporter(node)
    balancer = make_balancer(
        [node.url], gpu_priority_models=["llama3.1", "codellama"], gpu_metrics={node.url: page.url}
    )
    wait_until(lambda: balancer.node_state(node.url).installed, "the node's models listed")

    plan = balancer.optimize_gpu_once(dry_run=True)

    assert [(a["model"], a["action"], a["reason"]) for a in plan] == [
        (None, "would_probe", "would_probe"),  # nothing shows its GPU to Ollama yet
        (LLAMA, "would_move", "would_move"),
        (CODE, "skipped", "no_room"),
    ]
    assert "held by llama3.1:latest" in plan[2]["message"] and node.loaded() == []


def test_a_model_serving_a_stream_is_never_evicted(sim_node, make_balancer) -> None:
    """codellama (no priority) streams to a client through serve while llama3.1 (priority) sits in RAM
    for want of room: the pass waits; once the stream ends, the next pass makes room."""
    node = sim_node(
        vram_gb=8, inference_time_scale=20.0, preload=[("codellama", "gpu"), ("llama3.1", "forced-cpu")]
    )
    balancer = make_balancer([node.url], gpu_priority_models=["llama3.1"])
    wait_until(lambda: balancer.node_state(node.url).online, "the node checked")
    with ServeThread(balancer) as server:
        body = {"model": "codellama", "prompt": "tell me a long story"}
        with requests.post(server.url + "/api/generate", json=body, stream=True, timeout=60) as reply:
            lines = reply.iter_lines()
            next(lines)  # the stream is under way
            unloads = node.counts(CODE)["unloads"]

            [waiting] = balancer.optimizer.run_pass()

            assert (waiting["model"], waiting["action"], waiting["reason"]) == (LLAMA, "skipped", "busy")
            assert "codellama:latest is serving requests" in waiting["message"]
            assert on_gpu(node, CODE) and node.counts(CODE)["unloads"] == unloads
            assert balancer.cleanup()[0]["result"]["reason"] == "busy"  # cleanup leaves it too
            rest = list(lines)
        assert rest and b'"done":true' in rest[-1]
        wait_until(lambda: not balancer.node_state(node.url).in_flight_models, "the stream counted as ended")
        [moved] = balancer.optimizer.run_pass()
    assert (moved["model"], moved["action"]) == (LLAMA, "moved") and on_gpu(node, LLAMA)


def test_the_move_that_waited_for_a_stream_runs_when_it_ends(sim_node, make_balancer) -> None:
    """With the background optimizer on a long interval, the pass that found codellama streaming is not
    left to the next interval: the stream's end triggers a pass over that node."""
    node = sim_node(
        vram_gb=8, inference_time_scale=20.0, preload=[("codellama", "gpu"), ("llama3.1", "forced-cpu")]
    )
    balancer = make_balancer([node.url], gpu_priority_models=["llama3.1"], check_interval=3600)
    wait_until(lambda: balancer.node_state(node.url).online, "the node checked")
    with ServeThread(balancer) as server:
        body = {"model": "codellama", "prompt": "tell me a long story"}
        with requests.post(server.url + "/api/generate", json=body, stream=True, timeout=60) as reply:
            lines = reply.iter_lines()
            next(lines)
            balancer._start_gpu_optimization()  # its first pass runs at once and meets the stream
            wait_until(lambda: balancer.optimizer_status()["last_pass"], "the first pass")
            assert balancer.optimizer_status()["last_pass"]["skipped"] == 1 and on_cpu(node, LLAMA)
            list(lines)
        wait_until(lambda: on_gpu(node, LLAMA), "llama3.1 moved once the stream ended", timeout=20)


# --------------------------------------------------------------------------------------------- cleanup
def test_cleanup_unloads_every_non_priority_model_from_vram(sim_node, make_balancer) -> None:
    node = sim_node(vram_gb=24, preload=[("llama3.1", "gpu"), (SMALL, "gpu"), ("all-minilm", "forced-cpu")])
    balancer = make_balancer([node.url], gpu_priority_models=["llama3.1"])
    wait_until(lambda: balancer.node_state(node.url).online, "the node checked")
    sent = len(posts(node))

    dry = balancer.cleanup(dry_run=True)

    assert [(r["model"], r["result"]["reason"]) for r in dry] == [(SMALL, "would_unload")]
    assert len(posts(node)) == sent
    done = balancer.cleanup()
    assert [(r["node"], r["model"], r["result"]["reason"]) for r in done] == [(node.url, SMALL, "unloaded")]
    assert loaded(node, SMALL) is None and on_gpu(node, LLAMA) and on_cpu(node, "all-minilm:latest")
    assert balancer.cleanup() == []  # nothing left to do


# --------------------------------------------------------------------------------------------- fit check
def test_force_gpu_refuses_a_model_that_cannot_fit_unless_forced(sim_node, exporter, make_balancer) -> None:
    node = sim_node(vram_gb=8, preload=[("llama3.1", "gpu")])
    page = exporter(node)
    balancer = make_balancer([node.url], gpu_metrics={node.url: page.url})
    wait_until(lambda: balancer.gpu_memory(node.url).known, "the exporter scraped")
    wait_until(lambda: balancer.node_state(node.url).online, "the node checked")
    sent = loads(node)

    [entry] = balancer.force_gpu_all_nodes("llama3.1:70b")

    result = entry["result"]
    assert (result["success"], result["reason"]) == (False, "does_not_fit")
    assert result["message"].endswith(
        "does not fit: needs ~41.1 GB, at most ~7.6 GB seen free; --force tries anyway"
    )
    assert loads(node) == sent and on_gpu(node, LLAMA)  # no blind out-of-memory round trip
    [forced] = balancer.force_gpu_all_nodes("llama3.1:70b", force=True)
    assert forced["result"]["reason"] == "out_of_memory" and loads(node) > sent
    wait_until(lambda: on_gpu(node, LLAMA), "llama3.1 restored after the forced attempt")


def test_force_gpu_lets_ollama_make_room_and_says_what_it_cost(sim_node, exporter, make_balancer) -> None:
    """codellama fits the 8 GB GPU once llama3.1 is unloaded: a forced load is not refused for that (Ollama
    unloads by itself), and the result names what it cost."""
    node = sim_node(vram_gb=8, preload=[("llama3.1", "gpu")])
    page = exporter(node)
    balancer = make_balancer([node.url], gpu_metrics={node.url: page.url})
    wait_until(lambda: balancer.gpu_memory(node.url).known, "the exporter scraped")
    wait_until(lambda: balancer.node_state(node.url).online, "the node checked")

    [entry] = balancer.force_gpu_all_nodes("codellama")

    assert entry["result"]["reason"] == "moved" and entry["result"]["evicted"] == [LLAMA]
    assert on_gpu(node, CODE) and loaded(node, LLAMA) is None


def test_a_model_that_fits_is_moved_without_a_word(sim_node, exporter, make_balancer) -> None:
    node = sim_node(vram_gb=24, preload=[("llama3.1", "forced-cpu")])
    page = exporter(node)
    balancer = make_balancer([node.url], gpu_metrics={node.url: page.url})
    wait_until(lambda: balancer.gpu_memory(node.url).known, "the exporter scraped")
    [entry] = balancer.force_gpu_all_nodes("llama3.1")
    assert entry["result"]["reason"] == "moved" and on_gpu(node, LLAMA)


def test_the_estimate_of_a_model_never_loaded_follows_ollamas_prediction(sim_node) -> None:
    """PredictServerVRAM (llama_server.go:2681-2701): the file, an f16 KV cache for the context, plus
    compute buffers. The simulator's own loaded size for a 4096 context is what it should come to."""
    from gpu_controller import GPUController

    node = sim_node(vram_gb=8)
    estimate = GPUController(timeout=3.0).estimate_vram_mb(node.url, "llama3.1")
    body = {"model": "llama3.1", "prompt": "", "stream": False}  # a load at Ollama's default context
    requests.post(f"{node.url}/api/generate", json=body, timeout=10).raise_for_status()
    [row] = node.loaded()
    assert row["context_length"] == 4096
    assert estimate == pytest.approx(row["size"] / 2**20, rel=0.01)


def test_room_is_judged_on_figures_read_now_not_at_the_last_scrape(sim_node, exporter, make_balancer) -> None:
    """A training job held 20 of 24 GB, so llama3.1 loaded split; the job ends just after a scrape: the
    fit check reads the exporter again rather than refuse on the old figures."""
    node = sim_node(vram_gb=24, external_vram_gb=20, preload=[("llama3.1", "auto")])
    page = exporter(node)
    balancer = make_balancer([node.url], gpu_metrics={node.url: page.url}, gpu_metrics_interval=3600)
    wait_until(lambda: balancer.gpu_memory(node.url).known, "the exporter scraped")
    wait_until(lambda: balancer.node_state(node.url).online, "the node checked")
    assert balancer.fit_check(node.url, "llama3.1").verdict == NO_FIT

    node.external_vram_gb = 0  # the job ended

    [entry] = balancer.force_gpu_all_nodes("llama3.1")
    assert entry["result"]["reason"] == "moved" and on_gpu(node, LLAMA)


def test_a_load_that_ran_out_of_memory_alone_is_not_tried_blindly_again(sim_node, make_balancer) -> None:
    """No exporter: the first force_gpu of a model too big for the GPU is the blind attempt (Ollama unloads
    llama3.1, runs out of memory, llama3.1 is put back); the next one says why instead of repeating it."""
    node = sim_node(vram_gb=8, preload=[("llama3.1", "gpu")])
    balancer = make_balancer([node.url])
    wait_until(lambda: balancer.node_state(node.url).online, "the node checked")
    [first] = balancer.force_gpu_all_nodes("llama3.1:70b")
    assert first["result"]["reason"] == "out_of_memory" and on_gpu(node, LLAMA)
    sent = loads(node)

    [second] = balancer.force_gpu_all_nodes("llama3.1:70b")

    assert second["result"]["reason"] == "does_not_fit" and loads(node) == sent
    assert (
        "ran out of memory with every other model unloaded; --force tries again"
        in second["result"]["message"]
    )
    [forced] = balancer.force_gpu_all_nodes("llama3.1:70b", force=True)
    assert forced["result"]["reason"] == "out_of_memory" and loads(node) > sent
