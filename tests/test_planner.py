"""The optimizer's decisions as plain data (flockparse/planner.py): no sockets, no threads, no clock."""

from __future__ import annotations

from flockparse import planner
from flockparse.planner import PASS_ASKED, PASS_INTERVAL, PASS_NODE, Backoff

URL = "http://gpu1:11434"
LLAMA, EMBED = "llama3.1:latest", "mxbai-embed-large:latest"


def row(name: str, location: str, **extra: object) -> dict:
    return {"name": name, "location": location, "stopping": False, **extra}


def test_offline_cpu_only_and_lost_nodes_are_gated() -> None:
    assert planner.gate(URL, False, "yes", "", PASS_INTERVAL).skip.reason == "offline"
    assert (
        planner.gate(URL, True, "no", "all-layers load landed in RAM", PASS_INTERVAL).skip.reason == "no_gpu"
    )
    # a lost GPU gets no move; interval and asked passes ask it again by a probe, node passes never
    assert planner.gate(URL, True, "lost", "", PASS_NODE).skip.reason == "gpu_lost"
    assert planner.gate(URL, True, "lost", "", PASS_INTERVAL).probe_lost_gpu
    assert planner.gate(URL, True, "lost", "", PASS_ASKED).probe_lost_gpu
    assert planner.gate(URL, None, "unknown", "", PASS_INTERVAL) == planner.Gate()


def test_candidates_are_priority_models_off_gpu_never_mlx_never_stopping() -> None:
    models = [
        row(LLAMA, "CPU (RAM)"),
        row(EMBED, "GPU (VRAM)"),
        row("codellama:latest", "Split (40% GPU)"),  # not a priority model
        row("llama3.2:3b", "CPU (RAM)", stopping=True),  # on its way out
        row("qwen3.5:2b-nvfp4", "CPU (RAM)", controllable=False),  # MLX: Ollama places it
    ]
    wanted = planner.candidates(models, ["llama3*", "mxbai-embed-large", "qwen*"], [], [], load_absent=True)
    assert wanted.off_gpu == (LLAMA,)
    assert wanted.on_gpu_priority == frozenset({EMBED})
    assert wanted.absent == ()  # a node holding models gets no warm-up: loading more could evict them


def test_warm_up_of_an_idle_node_named_models_and_glob_matches_it_held_before() -> None:
    installed = [LLAMA, EMBED, "llama3.2:3b", "llama3.1:70b", "nomic-embed-text:latest"]
    previous = ["llama3.2:3b", "codellama:latest"]
    wanted = planner.candidates([], ["mxbai-embed-large", "llama3*"], installed, previous, load_absent=True)
    assert wanted.absent == (EMBED, "llama3.2:3b")  # the 70b matches the glob but was never on this GPU
    assert planner.candidates([], ["mxbai-embed-large"], installed, [], load_absent=False).absent == ()
    assert planner.candidates([], ["not-installed"], installed, [], load_absent=True).absent == ()


def test_pins_and_modelfile_verdicts_always_hold() -> None:
    pinned = planner.decide(URL, LLAMA, True, None, None, PASS_ASKED)
    assert (pinned.action, pinned.reason) == ("skipped", "pinned_cpu")
    verdict = {"reason": "pinned_by_modelfile", "message": "its Modelfile sets num_gpu 0"}
    held = planner.decide(URL, LLAMA, False, verdict, None, PASS_ASKED)
    assert (held.reason, held.message) == ("pinned_by_modelfile", "its Modelfile sets num_gpu 0")
    assert planner.decide(URL, LLAMA, False, None, None, PASS_INTERVAL) is None


def test_back_offs_hold_node_passes_count_down_on_interval_passes_and_never_hold_asked_passes() -> None:
    backoff = Backoff(failures=2, passes_to_skip=1, reason="out_of_memory")
    assert planner.decide(URL, LLAMA, False, None, backoff, PASS_NODE).reason == "backed_off"
    assert planner.decide(URL, LLAMA, False, None, backoff, PASS_INTERVAL).reason == "backed_off"
    assert planner.decide(URL, LLAMA, False, None, backoff, PASS_ASKED) is None
    counted = planner.counted_down(backoff, PASS_INTERVAL)
    assert counted.passes_to_skip == 0 and planner.counted_down(backoff, PASS_NODE) == backoff
    assert planner.decide(URL, LLAMA, False, None, counted, PASS_INTERVAL) is None  # its turn to retry
    assert planner.decide(URL, LLAMA, False, None, counted, PASS_NODE).reason == "backed_off"


def test_failures_are_retried_at_the_next_interval_pass_then_after_1_3_7_skipped_ones() -> None:
    skips, backoff = [], None
    for _ in range(7):
        backoff = planner.after_failure(backoff, "out_of_memory")
        skips.append(backoff.passes_to_skip)
    assert skips == [0, 1, 3, 7, 15, 31, 32]
    assert planner.after_failure(None, "unreachable") is None  # the node's trouble, not the model's
    assert planner.after_failure(None, "pinned_by_modelfile") is None  # remembered, never retried


def test_a_move_that_displaced_another_priority_model_waits_1_2_4_passes() -> None:
    skips, backoff = [], None
    for _ in range(4):
        backoff = planner.after_failure(backoff, planner.DISPLACED)
        skips.append(backoff.passes_to_skip)
    assert skips == [1, 2, 4, 8]
    assert planner.ends_on_gpu(Backoff(1, 0, "out_of_memory")) and not planner.ends_on_gpu(backoff)


def test_actions_keep_the_spec_dict_shape_at_the_edge() -> None:
    action = planner.Action(URL, LLAMA, "moved", "moved", "llama3.1:latest now on GPU")
    assert action.as_dict() == {"node": URL, "model": LLAMA, "action": "moved", "reason": "moved",
                                "message": "llama3.1:latest now on GPU"}  # fmt: skip


def test_move_results_are_typed_inside_and_the_spec_dict_at_the_edge() -> None:
    import json

    from flockparse.results import MoveResult, Reason, skipped

    moved = MoveResult(True, "llama3.1:latest now on GPU", Reason.MOVED, "GPU (VRAM)", 9044.8)
    assert moved.as_dict() == {
        "success": True,
        "message": "llama3.1:latest now on GPU",
        "location": "GPU (VRAM)",
        "vram_mb": 9044.8,
        "reason": "moved",
        "restored": False,
    }
    assert json.loads(json.dumps(moved.as_dict()))["reason"] == "moved" and Reason.NO_GPU == "no_gpu"
    assert skipped(Reason.OFFLINE, "skipped").as_dict()["skipped"] is True
    failed = MoveResult(False, "does not fit", Reason.OUT_OF_MEMORY, restored=True, not_restored=["x:latest"])
    assert failed.as_dict()["not_restored"] == ["x:latest"] and "restored_others" not in failed.as_dict()
