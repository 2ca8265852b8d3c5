"""The placement history's arithmetic (flockparse/timeline.py) over hand-made rows: no sockets, no clock."""

from __future__ import annotations

import pytest

from flockparse.timeline import (
    CPU,
    GPU,
    NOT_LOADED,
    OFFLINE,
    SPLIT,
    UNKNOWN,
    MoveRow,
    NodeRow,
    PlacementRow,
    Rows,
    Span,
    coverage,
    placement_of,
    summarize,
)

N = "http://10.0.0.1:11434"
M = "llama3.1:latest"


def place(t: float, placement: str, cause: str = "", model: str = M, node: str = N) -> PlacementRow:
    return PlacementRow(t, node, model, placement, cause)


def test_locations_map_to_placements_as_ollama_ps_words() -> None:
    assert placement_of("GPU (VRAM)") == GPU
    assert placement_of("CPU (RAM)") == CPU
    assert placement_of("Split (38% GPU)") == SPLIT
    assert placement_of("Unknown") == UNKNOWN
    assert placement_of(None) == UNKNOWN


def test_overlapping_sessions_merge_into_one_coverage() -> None:
    spans = coverage([Span(10, 20), Span(0, 5), Span(15, 30), Span(40, 50)])
    assert spans == [Span(0, 5), Span(10, 30), Span(40, 50)]


def test_fallback_move_and_recovery_give_exact_shares_and_counts() -> None:
    """0-1000 recorded; up at 0; GPU at 0, CPU at 400 (fell off), GPU at 700 by a move: 70% GPU, 30% CPU."""
    rows = Rows(
        sessions=[Span(0, 1000)],
        nodes=[NodeRow(0, N, "node_up")],
        placements=[place(0, GPU), place(400, CPU), place(700, GPU, cause="move")],
        moves=[MoveRow(700, N, M, "GPU", "optimizer", True, "moved")],
    )
    summary = summarize(rows, since=0, until=1000, buckets=10)
    [pair] = summary.pairs
    assert pair.seconds[GPU] == pytest.approx(700)
    assert pair.seconds[CPU] == pytest.approx(300)
    assert pair.shares[GPU] == pytest.approx(0.7)
    assert pair.shares[CPU] == pytest.approx(0.3)
    assert pair.fallbacks == 1
    assert pair.moves == 1
    assert pair.failed_moves == 0
    assert pair.timeline == (GPU,) * 4 + (CPU,) * 3 + (GPU,) * 3
    assert pair.now == GPU


def test_a_users_move_to_cpu_is_not_a_fallback_but_unload_and_reload_on_cpu_is() -> None:
    rows = Rows(
        sessions=[Span(0, 100)],
        nodes=[NodeRow(0, N, "node_up")],
        placements=[
            place(0, GPU),
            place(10, CPU, cause="move"),  # force_cpu: not a fallback
            place(20, GPU, cause="move"),
            place(30, NOT_LOADED),  # expired
            place(40, CPU),  # loaded again while another program held the VRAM: a fallback
        ],
    )
    [pair] = summarize(rows, 0, 100).pairs
    assert pair.fallbacks == 1
    assert pair.seconds[NOT_LOADED] == pytest.approx(10)
    assert pair.seconds[CPU] == pytest.approx(70)


def test_a_split_then_cpu_is_one_fallback() -> None:
    rows = Rows(
        sessions=[Span(0, 100)],
        nodes=[NodeRow(0, N, "node_up")],
        placements=[place(0, GPU), place(50, SPLIT), place(60, CPU)],
    )
    [pair] = summarize(rows, 0, 100).pairs
    assert pair.fallbacks == 1
    assert pair.shares[SPLIT] == pytest.approx(0.1)


def test_a_down_node_makes_its_models_offline_and_they_resume_their_placement() -> None:
    rows = Rows(
        sessions=[Span(0, 100)],
        nodes=[NodeRow(0, N, "node_up"), NodeRow(20, N, "node_down"), NodeRow(50, N, "node_up")],
        placements=[place(0, GPU)],
    )
    summary = summarize(rows, 0, 100)
    [pair] = summary.pairs
    assert pair.seconds[OFFLINE] == pytest.approx(30)
    assert pair.seconds[GPU] == pytest.approx(70)
    [node] = summary.nodes
    assert node.downs == 1
    assert node.seconds["down"] == pytest.approx(30)


def test_time_nobody_recorded_is_unknown_and_left_out_of_the_shares() -> None:
    """Recording stops at 40 and starts again at 60: the model is forgotten, then seen again on CPU."""
    rows = Rows(
        sessions=[Span(0, 40), Span(60, 100)],
        nodes=[NodeRow(0, N, "node_up"), NodeRow(61, N, "node_up")],
        placements=[place(0, GPU), place(61, CPU)],
    )
    [pair] = summarize(rows, 0, 100).pairs
    assert pair.seconds[UNKNOWN] == pytest.approx(21)  # 40-60 unrecorded, 60-61 before the first check
    assert pair.shares[GPU] == pytest.approx(40 / 79)
    assert pair.shares[CPU] == pytest.approx(39 / 79)
    assert pair.fallbacks == 0  # what happened in the gap is not known: no fallback claimed


def test_rows_before_the_window_set_the_state_at_its_start() -> None:
    rows = Rows(
        sessions=[Span(0, 1000)],
        nodes=[NodeRow(0, N, "node_up")],
        placements=[place(100, SPLIT)],
    )
    [pair] = summarize(rows, since=500, until=1000).pairs
    assert pair.shares[SPLIT] == pytest.approx(1.0)
    assert pair.fallbacks == 0  # the fall happened before the window


def test_a_model_never_loaded_in_the_window_is_left_out() -> None:
    rows = Rows(
        sessions=[Span(0, 100)],
        nodes=[NodeRow(0, N, "node_up")],
        placements=[place(0, GPU), place(10, NOT_LOADED)],
    )
    assert summarize(rows, 50, 100).pairs == []


def test_a_short_fall_shows_in_its_sparkline_bucket() -> None:
    """5 s on CPU in a 100 s bucket otherwise on GPU still marks the bucket (at least a tenth of it)."""
    rows = Rows(
        sessions=[Span(0, 200)],
        nodes=[NodeRow(0, N, "node_up")],
        placements=[place(0, GPU), place(40, CPU), place(52, GPU)],
    )
    [pair] = summarize(rows, 0, 200, buckets=2).pairs
    assert pair.timeline == (CPU, GPU)


def test_gpu_lost_and_restarts_are_counted_per_node() -> None:
    rows = Rows(
        sessions=[Span(0, 100)],
        nodes=[
            NodeRow(0, N, "node_up"),
            NodeRow(10, N, "gpu_lost"),
            NodeRow(30, N, "node_restarted"),
            NodeRow(40, N, "node_down"),
            NodeRow(41, N, "node_down"),  # a second console recording the same down: one down
        ],
    )
    [node] = summarize(rows, 0, 100).nodes
    assert (node.gpu_losses, node.restarts, node.downs) == (1, 1, 1)
    assert node.seconds["gpu_lost"] == pytest.approx(20)
    assert node.now == "down"


def test_failed_and_cancelled_moves() -> None:
    rows = Rows(
        sessions=[Span(0, 100)],
        nodes=[NodeRow(0, N, "node_up")],
        placements=[place(0, CPU)],
        moves=[
            MoveRow(10, N, M, "GPU", "optimizer", False, "out_of_memory"),
            MoveRow(20, N, M, "GPU", "user", False, "cancelled"),
            MoveRow(200, N, M, "GPU", "user", True, "moved"),  # after the window
        ],
    )
    [pair] = summarize(rows, 0, 100).pairs
    assert (pair.moves, pair.failed_moves) == (0, 1)
    assert pair.as_dict()["shares"]["cpu"] == 1.0
