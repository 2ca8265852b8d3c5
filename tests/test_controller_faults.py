"""GPUController under faults: dead, hanging and lying nodes, OOM, restarts, concurrent moves."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
from helpers import loaded

from gpu_controller import LOCATION_CPU, LOCATION_GPU, GPUController


@pytest.fixture
def fast() -> Iterator[GPUController]:
    """Short timeouts, so a hang costs half a second."""
    ctl = GPUController(timeout=0.5, load_timeout=0.5, verify_timeout=2.0)
    yield ctl
    ctl.close()


# ------------------------------------------------------------------------------------- status faults


@pytest.mark.parametrize(
    ("fault", "reason", "words"),
    [
        ("down", "unreachable", "unreachable"),
        ("drop", "unreachable", "unreachable"),
        ("hang", "timeout", "did not answer"),
        ("garbage", "error", "malformed /api/ps reply"),
        ("error500", "error", "500"),
        ("busy", "error", "busy (503)"),
    ],
)
def test_status_of_a_faulty_node_is_an_error_dict(quick_sim_node, fast, fault, reason, words) -> None:
    node = quick_sim_node(vram_gb=24, preload=[("llama3.1", "auto")])
    node.set_fault(fault)

    status = fast.get_model_status(node.url)

    assert words in status["error"]
    assert status["reason"] == reason
    assert status["models"] == [] and status["node_url"] == node.url
    assert (status["gpu_count"], status["cpu_count"], status["split_count"]) == (0, 0, 0)


@pytest.mark.parametrize("fault", ["down", "hang", "garbage", "error500", "busy"])
def test_force_on_a_faulty_node_fails_cleanly(quick_sim_node, fast, fault) -> None:
    node = quick_sim_node(vram_gb=24, preload=[("llama3.1", "cpu")])
    node.set_fault(fault)

    result = fast.force_gpu_load(node.url, "llama3.1")

    assert result["success"] is False
    assert result["reason"] in {"unreachable", "timeout", "error"}
    assert node.url in result["message"]
    node.clear_fault()
    assert loaded(node, "llama3.1") is not None  # nothing was lost


def test_status_recovers_after_the_fault_clears(quick_sim_node, fast) -> None:
    node = quick_sim_node(vram_gb=24, preload=[("llama3.1", "auto")])
    node.set_fault("hang")
    assert "error" in fast.get_model_status(node.url)
    node.clear_fault()
    status = fast.get_model_status(node.url)
    assert "error" not in status and status["gpu_count"] == 1


def test_hanging_load_times_out_without_losing_the_model(quick_sim_node, fast) -> None:
    node = quick_sim_node(vram_gb=24, preload=[("llama3.1", "cpu")])
    node.set_fault("hang", paths=("/api/generate",))

    result = fast.force_gpu_load(node.url, "llama3.1")

    assert result["success"] is False and result["reason"] == "timeout"
    node.clear_fault()
    assert loaded(node, "llama3.1") is not None


def test_garbage_show_reply_is_an_error(quick_sim_node, fast) -> None:
    node = quick_sim_node(vram_gb=24, preload=[("llama3.1", "cpu")])
    node.set_fault("garbage", paths=("/api/show",))
    result = fast.force_gpu_load(node.url, "llama3.1")
    assert result["success"] is False and result["reason"] == "error"
    assert loaded(node, "llama3.1")["size_vram"] == 0


def test_refused_load_leaves_the_model_where_it_was(quick_sim_node, fast) -> None:
    node = quick_sim_node(vram_gb=24, preload=[("llama3.1", "cpu")])
    node.set_fault("error500", paths=("/api/generate",))

    result = fast.force_gpu_load(node.url, "llama3.1")

    assert result["success"] is False and result["reason"] in {"error", "out_of_memory"}
    assert result["location"] == LOCATION_CPU
    assert loaded(node, "llama3.1") is not None


def test_a_hanging_node_does_not_block_another(quick_sim_node) -> None:
    hanging = quick_sim_node(vram_gb=24, preload=[("llama3.1", "cpu")])
    healthy = quick_sim_node(vram_gb=24, preload=[("llama3.1", "cpu")])
    hanging.set_fault("hang")
    ctl = GPUController(timeout=20.0, load_timeout=20.0, verify_timeout=5.0)
    stuck = threading.Thread(target=ctl.force_gpu_load, args=(hanging.url, "llama3.1"), daemon=True)
    try:
        stuck.start()
        result = ctl.force_gpu_load(healthy.url, "llama3.1")
        status = ctl.get_model_status(healthy.url)
        assert stuck.is_alive()  # the other node is still stuck while this one finished
        assert result["success"] is True and status["gpu_count"] == 1
    finally:
        hanging.clear_fault()
        stuck.join(timeout=25)
        ctl.close()


# ------------------------------------------------------------------------------------- memory


def test_split_model_that_cannot_go_fully_to_gpu_is_put_back_as_split(quick_sim_node, controller) -> None:
    node = quick_sim_node(vram_gb=24, preload=[("llama3.1:70b", "auto")])
    before = controller.get_model_status(node.url)["models"][0]["location"]
    result = controller.force_gpu_load(node.url, "llama3.1:70b")
    assert before.startswith("Split (")
    assert result["success"] is False and result["reason"] == "out_of_memory"
    assert result["restored"] is True and result["location"] == before
    truth = loaded(node, "llama3.1:70b")
    assert 0 < truth["size_vram"] < truth["size"]


def test_split_model_forced_to_cpu_frees_its_vram(quick_sim_node, controller) -> None:
    node = quick_sim_node(vram_gb=24, preload=[("llama3.1:70b", "auto")])
    result = controller.force_cpu_load(node.url, "llama3.1:70b")
    assert result["success"] is True and result["location"] == LOCATION_CPU
    assert loaded(node, "llama3.1:70b")["size_vram"] == 0


def test_oom_restores_the_model_and_the_models_it_evicted(quick_sim_node, controller) -> None:
    node = quick_sim_node(
        vram_gb=24,
        ram_gb=128,
        preload=[("mxbai-embed-large", "gpu"), ("llama3.1", "gpu"), ("llama3.1:70b", "forced-cpu")],
    )
    result = controller.force_gpu_load(node.url, "llama3.1:70b")

    assert result["success"] is False and result["reason"] == "out_of_memory"
    assert result["restored"] is True and result["location"] == LOCATION_CPU
    assert loaded(node, "llama3.1:70b")["size_vram"] == 0
    for other in ("mxbai-embed-large", "llama3.1"):
        truth = loaded(node, other)
        assert truth is not None, f"{other} was lost: {result['message']}"
        assert truth["size_vram"] == truth["size"] > 0


def test_gpu_lost_after_resume_gives_no_gpu(quick_sim_node, controller) -> None:
    node = quick_sim_node(vram_gb=24, preload=[("llama3.1", "cpu")])
    node.vram_gb = 0
    result = controller.force_gpu_load(node.url, "llama3.1")
    assert result["success"] is False and result["reason"] == "no_gpu"
    assert loaded(node, "llama3.1")["size_vram"] == 0


# ------------------------------------------------------------------------------------- restart, races


def test_a_gpu_missing_at_start_is_no_gpu_and_a_later_restart_finds_it(quick_sim_node, controller) -> None:
    """GPUs are discovered once per process (discover/runner.go:45,265): no API call brings one back."""
    node = quick_sim_node(vram_gb=24, preload=[("mxbai-embed-large", "gpu"), ("llama3.1", "gpu")])
    assert controller.get_model_status(node.url)["gpu_count"] == 2  # a pooled connection to the old process
    node.restart(downtime=0.1, gpu_found=False)
    assert controller.get_model_status(node.url)["models"] == []  # a restarted Ollama has nothing loaded

    missing = controller.force_gpu_load(node.url, "llama3.1")

    assert (missing["success"], missing["reason"]) == (False, "no_gpu")
    assert controller.get_model_status(node.url)["models"] == []  # not left in RAM: it was not loaded
    node.restart(gpu_found=True)
    results = [controller.force_gpu_load(node.url, name) for name in ("mxbai-embed-large", "llama3.1")]
    assert [r["reason"] for r in results] == ["moved", "moved"], results
    assert controller.get_model_status(node.url)["gpu_count"] == 2


def test_two_threads_forcing_the_same_model_reload_it_once(quick_sim_node, controller) -> None:
    node = quick_sim_node(vram_gb=24, preload=[("llama3.1", "cpu")], load_seconds_per_gb=0.05)
    loads_before = node.counts("llama3.1")["loads"]
    barrier = threading.Barrier(2)
    results: list[dict] = []

    def force() -> None:
        barrier.wait()
        results.append(controller.force_gpu_load(node.url, "LLaMA3.1:latest" if results else "llama3.1"))

    threads = [threading.Thread(target=force) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=20)

    assert sorted(r["reason"] for r in results) == ["already", "moved"], results
    assert all(r["success"] for r in results)
    assert node.counts("llama3.1")["loads"] == loads_before + 1
    assert loaded(node, "llama3.1")["size_vram"] > 0


def test_cancel_while_waiting_for_another_move(quick_sim_node, wait_until) -> None:
    node = quick_sim_node(vram_gb=24, preload=[("llama3.1", "cpu")])
    node.set_fault("hang", paths=("/api/generate",))
    ctl = GPUController(timeout=2.0, load_timeout=20.0, verify_timeout=5.0)
    first = threading.Thread(target=ctl.force_gpu_load, args=(node.url, "llama3.1"), daemon=True)
    cancel = threading.Event()
    try:
        first.start()
        # once the first move has sent its load, a second one has to wait for its lock
        wait_until(lambda: any(path == "/api/generate" for _, path, _ in node.request_log), timeout=5)
        cancel.set()
        result = ctl.force_gpu_load(node.url, "llama3.1", cancel=cancel)
        assert result["reason"] == "cancelled" and result["success"] is False
        assert first.is_alive()
    finally:
        node.clear_fault()
        first.join(timeout=25)
        ctl.close()


def test_controller_still_works_after_close(quick_sim_node) -> None:
    node = quick_sim_node(vram_gb=24, preload=[("llama3.1", "auto")])
    ctl = GPUController(timeout=2.0)
    assert ctl.get_model_status(node.url)["gpu_count"] == 1
    ctl.close()
    assert ctl.get_model_status(node.url)["gpu_count"] == 1
    ctl.close()


def test_cpu_move_that_does_not_fit_in_ram_goes_back_to_gpu(quick_sim_node, controller) -> None:
    # eras A/B refuse a CPU load larger than free RAM ("model requires more system memory")
    node = quick_sim_node(vram_gb=24, ram_gb=4, preload=[("llama3.1", "gpu")])
    result = controller.force_cpu_load(node.url, "llama3.1")
    assert result["success"] is False and result["reason"] == "out_of_memory"
    assert "does not fit in RAM" in result["message"]
    assert result["restored"] is True and result["location"] == LOCATION_GPU
    truth = loaded(node, "llama3.1")
    assert truth["size_vram"] == truth["size"] > 0
