"""Routing strategies and per-node request statistics as pure functions: no sockets, no clock, no sleeps."""

from __future__ import annotations

import pytest

from flockparse.agent import NodeState
from flockparse.request_stats import COOL_MAX_S, RequestStats, Sample, eval_metrics, percentile
from flockparse.routing import (
    STRATEGIES,
    Candidate,
    Tier,
    candidate,
    check_strategy,
    choose,
    rank,
    tier,
    view,
)
from flockparse.rules import LOCATION_CPU, LOCATION_GPU, model_key

MODEL = "llama3.1"
LLAMA_KEY = "llama3.1:latest"


def node(url: str, **facts) -> Candidate:
    facts.setdefault("online", True)
    facts.setdefault("installed", True)
    return Candidate(url=url, **facts)


def order(nodes: list[Candidate], strategy: str = "adaptive", model: str | None = MODEL, turn: int = 0):
    return [r.url for r in rank(nodes, model, strategy, turn) if not r.skipped]


# --------------------------------------------------------------------------------------------- adaptive
def test_adaptive_follows_the_issue_order_vram_gpu_node_installed_split_ram_cpu() -> None:
    nodes = [
        node("cpu-node", gpu="no"),
        node("in-ram", gpu="yes", placement=LOCATION_CPU),
        node("split", gpu="yes", placement="Split (40% GPU)", gpu_percent=40),
        node("installed-gpu", gpu="yes"),
        node("estimated", gpu="yes", placement=LOCATION_GPU, estimates=True),
        node("in-vram", gpu="yes", placement=LOCATION_GPU),
        node("gpu-unknown", gpu="unknown"),
        node("gpu-lost", gpu="lost"),
    ]
    assert order(nodes) == [
        "in-vram",
        "estimated",
        "installed-gpu",
        "split",
        "in-ram",
        "gpu-unknown",
        "cpu-node",
        "gpu-lost",
    ]
    assert [tier(n) for n in nodes[:4]] == [Tier.CPU_NODE, Tier.IN_RAM, Tier.SPLIT, Tier.INSTALLED_GPU_NODE]


def test_among_equals_fewest_in_flight_then_lowest_latency() -> None:
    busy = node("a", gpu="yes", placement=LOCATION_GPU, in_flight=3, latency_ms=1)
    idle_slow = node("b", gpu="yes", placement=LOCATION_GPU, in_flight=0, latency_ms=40)
    idle_fast = node("c", gpu="yes", placement=LOCATION_GPU, in_flight=0, latency_ms=2)
    assert order([busy, idle_slow, idle_fast]) == ["c", "b", "a"]
    # ... but a busy node with the model in VRAM still beats an idle one that must load it first
    assert order([busy, node("d", gpu="yes", in_flight=0)]) == ["a", "d"]


def test_offline_and_not_installed_nodes_are_skipped_with_why() -> None:
    ranked = rank(
        [node("up", gpu="yes"), node("down", online=False), node("lacks", gpu="yes", installed=False)], MODEL
    )
    assert [(r.url, r.skipped) for r in ranked] == [("up", False), ("down", True), ("lacks", True)]
    assert ranked[1].reason == "offline"
    assert ranked[2].reason == "llama3.1:latest is not installed there"


def test_a_model_no_node_has_goes_to_a_node_so_that_ollama_answers_404() -> None:
    nodes = [node("a", installed=False, in_flight=2), node("b", installed=False)]
    assert order(nodes) == ["b", "a"]
    assert rank(nodes, MODEL)[0].tier == Tier.NOT_INSTALLED


def test_cooling_nodes_are_skipped_unless_nothing_else_is_left() -> None:
    cool = node("cool", gpu="yes", placement=LOCATION_GPU, cooling_s=4)
    other = node("other", gpu="no")
    ranked = rank([cool, other], MODEL)
    assert [(r.url, r.skipped) for r in ranked] == [("other", False), ("cool", True)]
    assert ranked[1].reason == "cooling down 4s after errors"
    alone = rank([cool], MODEL)
    assert not alone[0].skipped and alone[0].last_resort and "no other node is left" in alone[0].reason


def test_unchecked_nodes_come_after_every_online_node() -> None:
    unchecked = node("unchecked", online=None, gpu="yes", placement=LOCATION_GPU)
    assert order([unchecked, node("online-cpu", gpu="no")]) == ["online-cpu", "unchecked"]


def test_exclude_gives_the_next_node_and_none_at_the_end() -> None:
    nodes = [node("a", gpu="yes", placement=LOCATION_GPU), node("b", gpu="no")]
    assert choose(nodes, MODEL) == "a"
    assert choose(nodes, MODEL, exclude=["a"]) == "b"
    assert choose(nodes, MODEL, exclude=["a", "b"]) is None


def test_without_a_model_any_node_least_busy_first() -> None:
    assert order([node("a", in_flight=1), node("b")], model=None) == ["b", "a"]


# ------------------------------------------------------------------------------------ other strategies
def test_round_robin_takes_the_usable_nodes_in_turn() -> None:
    nodes = [node("c"), node("a"), node("b"), node("down", online=False)]
    firsts = [choose(nodes, MODEL, "round_robin", turn) for turn in range(4)]
    assert firsts == ["a", "b", "c", "a"]


def test_least_loaded_ignores_placement() -> None:
    nodes = [node("vram", gpu="yes", placement=LOCATION_GPU, in_flight=2), node("cpu", gpu="no")]
    assert order(nodes, "least_loaded") == ["cpu", "vram"]


def test_lowest_latency_then_fewest_in_flight() -> None:
    nodes = [node("far", latency_ms=30), node("near-busy", latency_ms=2, in_flight=5), node("unknown")]
    assert order(nodes, "lowest_latency") == ["near-busy", "far", "unknown"]


def test_every_strategy_skips_offline_and_not_installed_nodes() -> None:
    nodes = [node("ok"), node("down", online=False), node("lacks", installed=False)]
    for strategy in STRATEGIES:
        assert order(nodes, strategy) == ["ok"], strategy


def test_strategy_names_are_checked() -> None:
    assert check_strategy("Round-Robin") == "round_robin"
    with pytest.raises(ValueError, match="unknown routing `fastest` \\(one of: adaptive, round_robin"):
        check_strategy("fastest")


def test_candidate_from_a_node_state() -> None:
    state = NodeState(
        url="http://n:11434",
        online=True,
        gpu="yes",
        in_flight=2,
        latency_ms=3.0,
        models=[{"name": "llama3.1:latest", "location": "Split (40% GPU)", "gpu_percent": 40}],
        installed=["llama3.1:latest"],
        installed_known=True,
    )
    made = candidate(view(state), model_key("LLaMA3.1"), in_flight=2, cooling_s=1.5)
    assert (made.placement, made.gpu_percent, made.installed) == ("Split (40% GPU)", 40, True)
    assert (made.in_flight, made.cooling_s, made.latency_ms) == (2, 1.5, 3.0)
    assert candidate(view(state), model_key("codellama")).installed is False
    stopping = NodeState(
        url="u", models=[{"name": "llama3.1:latest", "location": LOCATION_GPU, "stopping": True}]
    )
    assert candidate(view(stopping), LLAMA_KEY).placement is None  # a model on its way out is not loaded
    assert candidate(view(stopping), LLAMA_KEY).installed is None  # its model list was never read


def test_choose_is_ranks_first_for_every_strategy() -> None:
    nodes = [
        node("a", gpu="yes", placement=LOCATION_GPU, in_flight=4, latency_ms=9),
        node("b", gpu="no", latency_ms=1),
        node("c", gpu="yes", placement="Split (50% GPU)", gpu_percent=50, in_flight=1, latency_ms=5),
        node("d", online=None, gpu="yes", placement=LOCATION_GPU),
        node("e", online=False),
        node("f", gpu="yes", placement=LOCATION_GPU, in_flight=4, latency_ms=2, cooling_s=3),
    ]
    for strategy in STRATEGIES:
        for turn in range(3):
            first = next(r.url for r in rank(nodes, MODEL, strategy, turn) if not r.skipped)
            assert choose(nodes, MODEL, strategy, turn) == first, (strategy, turn)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_stats_keep_the_last_samples_only_and_give_percentiles() -> None:
    stats = RequestStats(keep=100)
    for ms in range(1, 201):  # 200 requests: only 101..200 are kept
        stats.record("n", Sample(ms / 1000, first_byte_s=ms / 2000, eval_count=10, eval_duration_ns=10**8))
    summary = stats.summary("n")
    assert summary["samples"] == 100
    assert (summary["latency_p50_ms"], summary["latency_p95_ms"]) == (150.0, 195.0)
    assert (summary["ttft_p50_ms"], summary["ttft_p95_ms"]) == (75.0, 97.5)
    assert summary["tokens_per_s"] == 100.0  # 10 tokens per 0.1 s, as Ollama's eval_count/eval_duration


def test_stats_of_a_node_without_samples_are_none() -> None:
    summary = RequestStats().summary("never")
    assert summary["samples"] == 0 and summary["latency_p50_ms"] is None and summary["tokens_per_s"] is None


def test_cool_down_doubles_per_failure_in_a_row_and_a_success_ends_it() -> None:
    clock = Clock()
    stats = RequestStats(clock=clock)
    assert [stats.failed("n") for _ in range(3)] == [1.0, 2.0, 4.0]
    assert stats.cooling() == {"n": 4.0}
    clock.now += 4.0
    assert stats.cooling() == {}
    for _ in range(20):
        seconds = stats.failed("n")
    assert seconds == COOL_MAX_S
    stats.succeeded("n")
    assert stats.cooling() == {} and stats.failed("n", "n: /api/chat failed (connection reset)") == 1.0
    assert stats.summary("n")["last_request_error"] == "n: /api/chat failed (connection reset)"


def test_eval_metrics_need_two_positive_integers() -> None:
    assert eval_metrics({"eval_count": 12, "eval_duration": 3_000_000}) == (12, 3_000_000)
    for bad in (
        {"eval_count": 0, "eval_duration": 5},
        {"eval_count": True, "eval_duration": 5},
        {},
        [1],
        None,
    ):
        assert eval_metrics(bad) == (None, None)
    assert percentile([], 0.5) is None and percentile([3.0, 1.0, 2.0], 0.5) == 2.0
