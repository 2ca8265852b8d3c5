"""GPUController against ollama_sim over real sockets: status, names, verified moves."""

from __future__ import annotations

import re
import threading
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import pytest
import requests
from helpers import loaded

from gpu_controller import (
    LOCATION_CPU,
    LOCATION_GPU,
    GPUController,
    _clock_offset,
    _parse_ps,
    canonical_name,
    normalize_url,
    placement,
    same_model,
)
from ollama_sim import SimNode

# ------------------------------------------------------------------------------------- helpers


def posts_since(node: SimNode, start: int, path: str) -> list[dict]:
    return [body for method, p, body in node.request_log[start:] if method == "POST" and p == path]


def all_layers(node: SimNode, model: str) -> int:
    """block_count + 1 for a model, read from the node's /api/show (what the controller must send)."""
    info = requests.post(f"{node.url}/api/show", json={"model": model}, timeout=5).json()["model_info"]
    return info[f"{info['general.architecture']}.block_count"] + 1


def load_directly(node: SimNode, model: str, keep_alive: str | int | None = None, **options) -> None:
    """Load a model as some other Ollama client would, bypassing the controller."""
    body = {"model": model, "prompt": "", "stream": False, "options": options}
    if keep_alive is not None:
        body["keep_alive"] = keep_alive
    requests.post(f"{node.url}/api/generate", json=body, timeout=5).raise_for_status()


def row(status: dict, model: str) -> dict:
    rows = [m for m in status["models"] if same_model(m["name"], model)]
    assert len(rows) == 1, status
    return rows[0]


# ------------------------------------------------------------------------------------- pure helpers


@pytest.mark.parametrize(
    ("size", "size_vram", "expected"),
    [
        (10_000_000_000, 0, (LOCATION_CPU, 0, "100% CPU")),
        (10_000_000_000, 10_000_000_000, (LOCATION_GPU, 100, "100% GPU")),
        (10_000_000_000, 5_200_000_000, ("Split (52% GPU)", 52, "48%/52% CPU/GPU")),
        # 98.5% CPU: Go's math.Round gives 99 (Python's round() would give 98)
        (200, 3, ("Split (1% GPU)", 1, "99%/1% CPU/GPU")),
        (200, 5, ("Split (2% GPU)", 2, "98%/2% CPU/GPU")),
        (100, 150, ("Unknown", 0, "Unknown")),
        (0, 5, ("Unknown", 0, "Unknown")),
        (0, 0, (LOCATION_CPU, 0, "100% CPU")),
    ],
)
def test_placement_follows_ollama_ps_rule(size: int, size_vram: int, expected: tuple) -> None:
    assert placement(size, size_vram) == expected


def test_canonical_names_and_matching() -> None:
    assert canonical_name("llama3.1") == "llama3.1:latest"
    assert canonical_name(" llama3.1:70b ") == "llama3.1:70b"
    assert canonical_name("hf.co/bartowski/X-GGUF:Q4_K_M") == "hf.co/bartowski/X-GGUF:Q4_K_M"
    assert canonical_name("localhost:5000/team/model") == "localhost:5000/team/model:latest"
    assert canonical_name("registry.ollama.ai/library/llama3.1") == "llama3.1:latest"
    assert same_model("LLaMA3.1", "llama3.1:latest")
    assert not same_model("llama3", "llama3.1:70b")
    assert not same_model("llama3.1", "llama3.1:70b")
    assert normalize_url("127.0.0.1:11434/") == "http://127.0.0.1:11434"
    assert normalize_url("GPU1") == "http://gpu1:11434"  # as OLLAMA_HOST: no scheme -> port 11434
    assert normalize_url("https://gpu1/ollama/") == "https://gpu1/ollama"  # a scheme keeps its own port
    for bad in ("ftp://gpu1", "http://", "gpu1:99999", "http://gpu1/?x=1"):
        with pytest.raises(ValueError, match="invalid node URL"):
            normalize_url(bad)


def test_expiry_is_judged_by_the_nodes_clock() -> None:
    """A node whose clock is 10 minutes behind ours: its 5-minute model is alive, not stopping."""
    node_now = datetime.now(UTC) - timedelta(minutes=10)
    offset = _clock_offset(format_datetime(node_now, usegmt=True))
    assert abs(offset + timedelta(minutes=10)) < timedelta(seconds=2)
    assert _clock_offset(format_datetime(datetime.now(UTC), usegmt=True)) == timedelta(0)
    assert _clock_offset("not a date") == timedelta(0)

    entry = {"name": "llama3.1:latest", "size": 10, "size_vram": 10}
    alive = {**entry, "expires_at": (node_now + timedelta(minutes=5)).isoformat()}
    [model] = _parse_ps({"models": [alive]}, offset)
    assert not model.stopping and timedelta(minutes=4) < model.remaining() <= timedelta(minutes=5, seconds=2)
    unloading = {**entry, "expires_at": (node_now - timedelta(seconds=1)).isoformat()}
    assert _parse_ps({"models": [unloading]}, offset)[0].stopping


@pytest.mark.parametrize(
    "body",
    [
        [],
        {"models": "x"},
        {"models": [{"name": "a"}]},
        {"models": [{"name": "a", "size": "1", "size_vram": 0}]},
        {"models": [{"size": 1, "size_vram": 0}]},
        {"models": [7]},
    ],
)
def test_malformed_ps_bodies_are_rejected(body) -> None:
    with pytest.raises(ValueError):
        _parse_ps(body)


# ------------------------------------------------------------------------------------- status


def test_status_reports_gpu_cpu_and_split_like_ollama_ps(quick_sim_node, controller) -> None:
    node = quick_sim_node(vram_gb=24, preload=[("mxbai-embed-large", "cpu"), ("llama3.1", "auto")])
    big = quick_sim_node(vram_gb=24, preload=[("llama3.1:70b", "auto")])  # alone and too big: split

    status = controller.get_model_status(node.url)
    assert "error" not in status
    assert row(status, "mxbai-embed-large")["location"] == LOCATION_CPU
    assert row(status, "mxbai-embed-large")["processor"] == "100% CPU"
    assert row(status, "llama3.1")["location"] == LOCATION_GPU
    assert row(status, "llama3.1")["vram_mb"] == row(status, "llama3.1")["size_mb"] > 0
    assert (status["gpu_count"], status["cpu_count"], status["split_count"]) == (1, 1, 0)
    assert status["node_url"] == node.url and status["latency_ms"] is not None

    split = row(controller.get_model_status(big.url), "llama3.1:70b")
    truth = loaded(big, "llama3.1:70b")
    assert 0 < truth["size_vram"] < truth["size"]
    cpu = int((truth["size"] - truth["size_vram"]) / truth["size"] * 100 + 0.5)
    assert split["location"] == f"Split ({100 - cpu}% GPU)"
    assert split["processor"] == f"{cpu}%/{100 - cpu}% CPU/GPU"
    assert split["gpu_percent"] == 100 - cpu
    assert split["ram_mb"] > 0 and split["vram_mb"] > 0
    assert re.fullmatch(r"Split \(\d{1,2}% GPU\)", split["location"])


def test_status_lists_every_expected_field(quick_sim_node, controller) -> None:
    node = quick_sim_node(vram_gb=24, preload=[("llama3.1", "auto")])
    model = row(controller.get_model_status(node.url), "llama3.1")
    for key in ("name", "location", "processor", "gpu_percent", "size_mb", "vram_mb", "ram_mb"):
        assert model[key] is not None, key
    assert model["name"] == "llama3.1:latest"
    assert model["context_length"] > 0
    assert re.fullmatch(r"[0-9a-f]{64}", model["digest"])
    assert datetime.fromisoformat(model["expires_at"]) > datetime.now(UTC)
    assert model["keep_forever"] is False


def test_list_installed_gives_canonical_names(quick_sim_node, controller) -> None:
    node = quick_sim_node(vram_gb=24, models=["llama3.1", "mxbai-embed-large"])
    assert sorted(controller.list_installed(node.url)["models"]) == [
        "llama3.1:latest",
        "mxbai-embed-large:latest",
    ]


# ------------------------------------------------------------------------------------- force_gpu


def test_cpu_model_forced_to_gpu_with_all_layers_and_empty_prompt(quick_sim_node, controller) -> None:
    node = quick_sim_node(vram_gb=24, preload=[("llama3.1", "cpu")])
    layers = all_layers(node, "llama3.1")
    loads_before = node.counts("llama3.1")["loads"]
    start = len(node.request_log)

    result = controller.force_gpu_load(node.url, "llama3.1")

    assert result["success"] is True, result
    assert result["reason"] == "moved"
    assert result["location"] == LOCATION_GPU and result["vram_mb"] > 0
    truth = loaded(node, "llama3.1")
    assert truth["size_vram"] == truth["size"] > 0
    [request] = posts_since(node, start, "/api/generate")
    assert request["prompt"] == "" and request["stream"] is False
    assert request["options"]["num_gpu"] == layers
    assert node.counts("llama3.1")["loads"] == loads_before + 1


def test_model_already_on_gpu_is_left_alone(quick_sim_node, controller) -> None:
    node = quick_sim_node(vram_gb=24, preload=[("llama3.1", "gpu")])
    loads_before = node.counts("llama3.1")["loads"]
    start = len(node.request_log)

    result = controller.force_gpu_load(node.url, "llama3.1")

    assert result["success"] is True and result["reason"] == "already"
    assert result["location"] == LOCATION_GPU
    assert posts_since(node, start, "/api/generate") == []
    assert posts_since(node, start, "/api/embed") == []
    assert node.counts("llama3.1")["loads"] == loads_before


def test_embedding_only_model_is_loaded_through_embed(quick_sim_node, controller) -> None:
    node = quick_sim_node(vram_gb=24, preload=[("mxbai-embed-large", "cpu")])
    start = len(node.request_log)

    result = controller.force_gpu_load(node.url, "mxbai-embed-large")

    assert result["success"] is True, result
    assert posts_since(node, start, "/api/generate") == []
    [request] = posts_since(node, start, "/api/embed")
    assert request["input"] == "" and request["options"]["num_gpu"] == all_layers(node, "mxbai-embed-large")
    truth = loaded(node, "mxbai-embed-large")
    assert truth["size_vram"] == truth["size"] > 0


def test_model_not_loaded_is_loaded_on_gpu(quick_sim_node, controller) -> None:
    node = quick_sim_node(vram_gb=24)
    result = controller.force_gpu_load(node.url, "llama3.1")
    assert result["success"] is True and result["reason"] == "moved"
    assert loaded(node, "llama3.1")["size_vram"] > 0


def test_too_big_for_vram_fails_and_model_goes_back_to_cpu(quick_sim_node, controller) -> None:
    node = quick_sim_node(vram_gb=24, ram_gb=128, preload=[("llama3.1:70b", "forced-cpu")])

    result = controller.force_gpu_load(node.url, "llama3.1:70b")

    assert result["success"] is False
    assert result["reason"] == "out_of_memory"
    assert "does not fit in VRAM" in result["message"]
    assert result["restored"] is True and result["location"] == LOCATION_CPU
    truth = loaded(node, "llama3.1:70b")
    assert truth is not None and truth["size_vram"] == 0


def test_cpu_only_node_reports_no_gpu(quick_sim_node, controller) -> None:
    node = quick_sim_node(vram_gb=0, preload=[("llama3.1", "auto")])
    result = controller.force_gpu_load(node.url, "llama3.1")
    assert result["success"] is False and result["reason"] == "no_gpu"
    assert "no usable GPU" in result["message"]
    assert result["location"] == LOCATION_CPU
    assert loaded(node, "llama3.1") is not None


def test_model_not_installed(quick_sim_node, controller) -> None:
    node = quick_sim_node(vram_gb=24, models=["llama3.1:70b"], preload=[("llama3.1:70b", "forced-cpu")])
    start = len(node.request_log)

    result = controller.force_gpu_load(node.url, "llama3")

    assert result["success"] is False and result["reason"] == "not_found"
    assert result["message"] == f"llama3:latest is not installed on {node.url}"
    assert posts_since(node, start, "/api/generate") == []
    assert loaded(node, "llama3.1:70b")["size_vram"] == 0  # never matched by substring


def test_forever_keep_alive_survives_a_move(quick_sim_node, controller) -> None:
    node = quick_sim_node(vram_gb=24)
    load_directly(node, "llama3.1", keep_alive=-1, num_gpu=0)
    assert loaded(node, "llama3.1")["size_vram"] == 0

    result = controller.force_gpu_load(node.url, "llama3.1")

    assert result["success"] is True, result
    model = row(controller.get_model_status(node.url), "llama3.1")
    assert model["keep_forever"] is True
    assert datetime.fromisoformat(model["expires_at"]).year > 2300


def test_finite_keep_alive_is_sent_as_a_go_duration(quick_sim_node, controller) -> None:
    node = quick_sim_node(vram_gb=24)
    load_directly(node, "llama3.1", keep_alive="10m", num_gpu=0)
    start = len(node.request_log)

    assert controller.force_gpu_load(node.url, "llama3.1")["success"] is True

    [request] = posts_since(node, start, "/api/generate")
    assert re.fullmatch(r"\d+s", request["keep_alive"])
    assert 500 <= int(request["keep_alive"][:-1]) <= 600
    assert row(controller.get_model_status(node.url), "llama3.1")["keep_forever"] is False


def test_configured_keep_alive_never_sent_as_a_bare_string_number(quick_sim_node) -> None:
    node = quick_sim_node(vram_gb=24, preload=[("llama3.1", "cpu")])
    ctl = GPUController(timeout=2.0, load_timeout=10.0, verify_timeout=5.0, keep_alive="300")
    start = len(node.request_log)
    try:
        assert ctl.force_gpu_load(node.url, "llama3.1")["success"] is True
    finally:
        ctl.close()
    [request] = posts_since(node, start, "/api/generate")
    assert request["keep_alive"] == 300


def test_move_keeps_the_context_length(quick_sim_node, controller) -> None:
    node = quick_sim_node(vram_gb=24)
    load_directly(node, "llama3.1", num_gpu=0, num_ctx=8192)
    start = len(node.request_log)

    assert controller.force_gpu_load(node.url, "llama3.1")["success"] is True

    [request] = posts_since(node, start, "/api/generate")
    assert request["options"]["num_ctx"] == 8192
    assert row(controller.get_model_status(node.url), "llama3.1")["context_length"] == 8192


def test_cancel_before_the_load_sends_nothing(quick_sim_node, controller) -> None:
    node = quick_sim_node(vram_gb=24, preload=[("llama3.1", "cpu")])
    cancel = threading.Event()
    cancel.set()
    start = len(node.request_log)

    result = controller.force_gpu_load(node.url, "llama3.1", cancel=cancel)

    assert result["success"] is False and result["reason"] == "cancelled"
    assert posts_since(node, start, "/api/generate") == []
    assert loaded(node, "llama3.1")["size_vram"] == 0


# ------------------------------------------------------------------------------------- force_cpu


def test_gpu_model_forced_to_cpu(quick_sim_node, controller) -> None:
    node = quick_sim_node(vram_gb=24, preload=[("llama3.1", "gpu")])
    start = len(node.request_log)

    result = controller.force_cpu_load(node.url, "llama3.1")

    assert result["success"] is True and result["reason"] == "moved"
    assert result["location"] == LOCATION_CPU and result["vram_mb"] == 0
    assert loaded(node, "llama3.1")["size_vram"] == 0
    [request] = posts_since(node, start, "/api/generate")
    assert request["options"]["num_gpu"] == 0 and request["prompt"] == ""


def test_model_already_on_cpu_is_left_alone(quick_sim_node, controller) -> None:
    node = quick_sim_node(vram_gb=24, preload=[("llama3.1", "forced-cpu")])
    loads_before = node.counts("llama3.1")["loads"]
    result = controller.force_cpu_load(node.url, "llama3.1")
    assert result["success"] is True and result["reason"] == "already"
    assert node.counts("llama3.1")["loads"] == loads_before


def test_forced_cpu_then_back_to_gpu(quick_sim_node, controller) -> None:
    node = quick_sim_node(vram_gb=24, preload=[("mxbai-embed-large", "gpu")])
    assert controller.force_cpu_load(node.url, "mxbai-embed-large")["success"] is True
    assert loaded(node, "mxbai-embed-large")["size_vram"] == 0
    result = controller.force_gpu_load(node.url, "mxbai-embed-large")
    assert result["success"] is True and result["location"] == LOCATION_GPU


# ------------------------------------------------------------------------ the next ordinary request
def ordinary_request(node: SimNode, model: str) -> None:
    """What an application sends after a move: no options at all."""
    if "embed" in model:
        reply = requests.post(f"{node.url}/api/embed", json={"model": model, "input": "hello"}, timeout=10)
    else:
        body = {"model": model, "prompt": "hi", "stream": False}
        reply = requests.post(f"{node.url}/api/generate", json=body, timeout=10)
    reply.raise_for_status()


@pytest.mark.parametrize(
    ("model", "preload", "move"),
    [
        ("llama3.1", "cpu", "gpu"),  # a completion model that fell to RAM, back on GPU
        ("llama3.1", "gpu", "cpu"),  # pinned on CPU by the user
        ("mxbai-embed-large", "cpu", "gpu"),  # an embedding model: its batch follows the requested num_ctx
        ("mxbai-embed-large", "gpu", "cpu"),
    ],
)
def test_no_move_is_undone_by_the_next_ordinary_request(quick_sim_node, controller, model, preload, move):
    """sched.go:1398-1425 reloads on any differing runner option; routes.go:151,217 make an embedding
    model's num_batch follow the requested num_ctx, compared literally."""
    node = quick_sim_node(vram_gb=24, preload=[(model, preload)])
    start = len(node.request_log)
    mover = controller.force_gpu_load if move == "gpu" else controller.force_cpu_load
    assert mover(node.url, model)["success"] is True
    loads_sent = ("/api/generate", "/api/embed")
    [request] = [body for _, path, body in list(node.request_log)[start:] if path in loads_sent]
    assert "num_ctx" not in request["options"]  # Ollama chose this context: it chooses it again
    loads = node.counts(model)["loads"]

    ordinary_request(node, model)

    assert node.counts(model)["loads"] == loads
    entry = loaded(node, model)
    assert (entry["size_vram"] == entry["size"]) if move == "gpu" else entry["size_vram"] == 0


def test_a_move_says_which_models_ollama_unloaded_to_make_room(quick_sim_node, controller) -> None:
    """The 80% pre-flight evicts resident models for a load that does not fit next to them (sched.go:547)."""
    node = quick_sim_node(vram_gb=24, preload=[("llama3.1", "gpu"), ("mxbai-embed-large", "gpu")])

    result = controller.force_gpu_load(node.url, "codellama")

    assert result["success"] is True and result["evicted"] and "to make room" in result["message"]
    assert all(loaded(node, name) is None for name in result["evicted"])
    quiet = controller.force_gpu_load(node.url, "codellama")  # already there: nothing unloaded
    assert quiet["reason"] == "already" and "evicted" not in quiet
