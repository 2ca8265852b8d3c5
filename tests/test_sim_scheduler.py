"""One test per scheduler rule of shared/spec/ollama-api.md (era C), asserted on /api/ps and load counts."""

from __future__ import annotations

import re
import threading
from datetime import UTC, datetime, timedelta

import pytest
import requests
from helpers import wait_until

from ollama_sim import CATALOG

GiB = 1024**3


def post(node, path: str, timeout: float = 10, **body) -> requests.Response:
    return requests.post(node.url + path, json=body, timeout=timeout)


def generate(node, model: str, **body) -> requests.Response:
    return post(node, "/api/generate", model=model, **body)


def generate_into(outcomes: list, node, model: str) -> None:
    """One generation; appends its status code, or the error when the node's stop cuts the connection."""
    try:
        outcomes.append(generate(node, model, prompt="hi", stream=False).status_code)
    except requests.RequestException as err:
        outcomes.append(err)


def load(node, model: str, **body) -> dict:
    """Load (generate with no prompt; /api/embed with empty input for embedding models): its /api/ps entry."""
    if CATALOG[canonical(model)].embedding_only:
        reply = post(node, "/api/embed", model=model, input="", **body)
        assert reply.status_code == 200, reply.text
        assert reply.json() == {"model": model, "embeddings": []}
    else:
        reply = generate(node, model, **body)
        assert reply.status_code == 200, reply.text
        assert reply.json()["done_reason"] == "load"
    return ps(node)[canonical(model)]


def canonical(model: str) -> str:
    return model if ":" in model else f"{model}:latest"


def ps(node) -> dict[str, dict]:
    reply = requests.get(node.url + "/api/ps", timeout=5)
    reply.raise_for_status()
    return {m["name"]: m for m in reply.json()["models"]}


def on_gpu(entry: dict) -> bool:
    return entry["size_vram"] == entry["size"] > 0


def expires_at(entry: dict) -> datetime:
    """Parse Go's RFC3339Nano (nanoseconds, 'Z' or an offset) into an aware datetime."""
    match = re.fullmatch(r"([^.]+)(?:\.(\d+))?(Z|[+-]\d\d:\d\d)", entry["expires_at"])
    whole, fraction, zone = match.groups()
    micro = (fraction or "").ljust(6, "0")[:6]
    return datetime.fromisoformat(f"{whole}.{micro}{'+00:00' if zone == 'Z' else zone}")


def expiry_year(entry: dict) -> int:
    return expires_at(entry).year


# ----------------------------------------------------------------------------------- num_gpu and reloads


def test_num_gpu_999_reloads_an_automatic_load_even_when_already_fully_on_gpu(sim_node):
    node = sim_node(vram_gb=24)
    assert on_gpu(load(node, "llama3.1"))
    entry = load(node, "llama3.1", options={"num_gpu": 999})
    assert on_gpu(entry)
    assert node.counts("llama3.1") == {"loads": 2, "unloads": 1}
    assert node.loaded()[0]["num_gpu"] == 999


def test_request_without_num_gpu_never_moves_a_model_that_fell_to_cpu(sim_node):
    node = sim_node(vram_gb=24, preload=[("llama3.1", "cpu")])
    reply = generate(node, "llama3.1", prompt="hello", stream=False)
    assert reply.status_code == 200
    load(node, "llama3.1", options={"num_gpu": -1, "temperature": 0.1})
    assert ps(node)["llama3.1:latest"]["size_vram"] == 0
    assert node.counts("llama3.1") == {"loads": 0, "unloads": 0}


def test_forced_cpu_model_stays_on_cpu_for_requests_without_num_gpu(sim_node):
    node = sim_node(vram_gb=24)
    assert load(node, "llama3.1", options={"num_gpu": 0})["size_vram"] == 0
    assert load(node, "llama3.1")["size_vram"] == 0
    assert node.counts("llama3.1") == {"loads": 1, "unloads": 0}


def test_explicit_num_gpu_moves_a_cpu_model_to_gpu(sim_node):
    node = sim_node(vram_gb=24, preload=[("llama3.1", "cpu")])
    assert on_gpu(load(node, "llama3.1", options={"num_gpu": 999}))
    assert node.counts("llama3.1") == {"loads": 1, "unloads": 1}


def test_num_ctx_change_reloads_with_the_new_context(sim_node):
    node = sim_node(vram_gb=24)
    assert load(node, "llama3.1")["context_length"] == 32768
    assert load(node, "llama3.1", options={"num_ctx": 8192})["context_length"] == 8192
    assert load(node, "llama3.1", options={"num_ctx": 8192})["context_length"] == 8192
    assert node.counts("llama3.1") == {"loads": 2, "unloads": 1}


def test_other_runner_fields_reload(sim_node):
    node = sim_node(vram_gb=24)
    load(node, "llama3.2:3b")
    for options in ({"num_batch": 1024}, {"num_thread": 4}, {"use_mmap": False}, {"main_gpu": 0}):
        load(node, "llama3.2:3b", options=options)
    assert node.counts("llama3.2:3b") == {"loads": 5, "unloads": 4}


def test_sampling_options_never_reload(sim_node):
    node = sim_node(vram_gb=24)
    load(node, "llama3.1")
    options = {"temperature": 0.1, "top_p": 0.5, "seed": 7, "num_predict": 3}
    assert generate(node, "llama3.1", prompt="hi", stream=False, options=options).status_code == 200
    assert node.counts("llama3.1") == {"loads": 1, "unloads": 0}


def test_wrong_option_type_is_a_500_with_go_text(sim_node):
    node = sim_node(vram_gb=24)
    reply = generate(node, "llama3.1", options={"num_gpu": "x"})
    assert reply.status_code == 500
    assert reply.json() == {"error": 'option "num_gpu" must be of type integer'}
    assert ps(node) == {}


# ----------------------------------------------------------------------------------- placement


def test_size_equals_size_vram_when_fully_on_gpu_and_context_follows_vram_bracket(sim_node):
    entry = load(sim_node(vram_gb=24), "llama3.1")
    assert entry["size"] == entry["size_vram"] and entry["context_length"] == 32768
    assert load(sim_node(vram_gb=8), "llama3.1")["context_length"] == 4096
    assert load(sim_node(vram_gb=48), "llama3.1")["context_length"] == 131072  # 262144 clamped to trained
    assert load(sim_node(vram_gb=48), "all-minilm")["context_length"] == 512


def test_batch_surcharge_only_for_completion_models(sim_node):
    node = sim_node(vram_gb=24)
    default = load(node, "llama3.1")["size"]
    assert load(node, "llama3.1", options={"num_batch": 2048})["size"] - default == 2 * GiB
    embedding = load(node, "nomic-embed-text")  # its automatic batch is 2048 (= its context)
    assert embedding["size"] < 1 * GiB


def test_split_when_alone_on_the_node(sim_node):
    entry = load(sim_node(vram_gb=24), "llama3.1:70b")
    assert 0 < entry["size_vram"] < entry["size"]
    assert entry["size_vram"] <= 23 * GiB  # llama.cpp's fit leaves 1 GiB free


def test_no_split_next_to_a_resident_model_it_evicts_instead(sim_node):
    node = sim_node(vram_gb=24)
    load(node, "llama3.2:3b")
    entry = load(node, "llama3.1:70b")
    assert list(ps(node)) == ["llama3.1:70b"]
    assert 0 < entry["size_vram"] < entry["size"]
    assert node.counts("llama3.2:3b")["unloads"] == 1


def test_a_model_alone_fills_the_gpu_beyond_the_eviction_threshold(sim_node):
    node = sim_node(vram_gb=24)  # llama3.1 at 128k ctx: 20.8 GiB, more than 80% of 24 GiB
    entry = load(node, "llama3.1", options={"num_ctx": 131072})
    assert on_gpu(entry) and entry["size"] > 0.8 * 24 * GiB


def test_models_that_fit_share_the_gpu(sim_node):
    node = sim_node(vram_gb=24)
    load(node, "llama3.1")
    load(node, "llama3.2:3b")
    models = ps(node)
    assert sorted(models) == ["llama3.1:latest", "llama3.2:3b"]
    assert all(on_gpu(entry) for entry in models.values())


def test_explicit_partial_num_gpu_splits_next_to_others(sim_node):
    node = sim_node(vram_gb=24)
    load(node, "llama3.2:3b")
    entry = load(node, "llama3.1:70b", options={"num_gpu": 10})
    assert 0 < entry["size_vram"] < entry["size"]
    assert "llama3.2:3b" in ps(node)


def test_explicit_partial_num_gpu_alone_offloads_that_many_layers_and_keeps_them(sim_node):
    node = sim_node(vram_gb=24)
    entry = load(node, "llama3.1", options={"num_gpu": 11})  # 11 of 33 layers
    assert entry["size_vram"] == pytest.approx(entry["size"] * 11 / 33, rel=1e-6)
    load(node, "llama3.1", options={"num_gpu": 11})
    load(node, "llama3.1")
    assert node.counts("llama3.1") == {"loads": 1, "unloads": 0}


def test_eval_rate_reflects_the_placement(sim_node):
    gpu, cpu = sim_node(vram_gb=24), sim_node(vram_gb=0)
    body = {"prompt": "Why is the sky blue?", "stream": False}
    on_gpu_reply = generate(gpu, "llama3.1", **body).json()
    on_cpu_reply = generate(cpu, "llama3.1", **body).json()
    assert on_gpu_reply["eval_count"] == on_cpu_reply["eval_count"]
    assert on_cpu_reply["eval_duration"] > 4 * on_gpu_reply["eval_duration"]


def test_cpu_only_node_puts_everything_in_ram_even_when_forced(sim_node):
    node = sim_node(vram_gb=0)
    assert load(node, "llama3.1")["size_vram"] == 0
    assert load(node, "llama3.2:3b", options={"num_gpu": 999})["size_vram"] == 0


def test_gpu_lost_later_loads_land_on_cpu(sim_node):
    node = sim_node(vram_gb=24)
    node.vram_gb = 0
    assert load(node, "llama3.2:3b")["size_vram"] == 0


def test_forced_load_that_does_not_fit_is_a_500_oom_and_leaves_the_model_unloaded(sim_node):
    node = sim_node(vram_gb=24, preload=[("llama3.1:70b", "auto")])
    assert ps(node)["llama3.1:70b"]["size_vram"] > 0
    reply = generate(node, "llama3.1:70b", options={"num_gpu": 999})
    assert reply.status_code == 500
    error = reply.json()["error"]
    assert error.startswith("llama-server process has terminated: ") and "out of memory" in error
    assert ps(node) == {}  # the old (split) instance is gone too
    assert node.counts("llama3.1:70b") == {"loads": 0, "unloads": 1}


def test_forced_full_load_next_to_others_evicts_one_victim_at_a_time(sim_node):
    node = sim_node(vram_gb=24)
    load(node, "llama3.1", keep_alive="1h")
    load(node, "llama3.2:3b", keep_alive="10m")
    entry = load(node, "codellama", options={"num_gpu": 999})  # 11.8 GiB: fits once 3b (shortest) is gone
    assert sorted(ps(node)) == ["codellama:latest", "llama3.1:latest"] and on_gpu(entry)


def test_forced_partial_load_that_runs_out_of_memory_evicts_all_and_retries_once(sim_node):
    node = sim_node(vram_gb=24)
    load(node, "llama3.2:3b")
    entry = load(node, "llama3.1:70b", options={"num_gpu": 30})  # 30 layers: 18.5 GiB, 18.4 GiB free
    assert list(ps(node)) == ["llama3.1:70b"]
    assert 0 < entry["size_vram"] < entry["size"]


def test_forced_load_out_of_memory_retries_once_with_a_smaller_automatic_context(sim_node):
    node = sim_node(vram_gb=72)  # automatic ctx 131072: 70b needs 79.9 GiB; at 32768 it needs 49.9 GiB
    entry = load(node, "llama3.1:70b", options={"num_gpu": 999})
    assert on_gpu(entry) and entry["context_length"] == 32768
    reply = generate(node, "llama3.1:70b", options={"num_gpu": 999, "num_ctx": 131072})  # explicit: no retry
    assert reply.status_code == 500 and "out of memory" in reply.json()["error"]


def test_cpu_load_larger_than_ram_is_killed_by_the_kernel(sim_node):
    """sched.go:547: the only memory pre-flight needs GPUs; sched.go:1162: CPU loads read the whole file
    into RAM (mmap off), so the kernel OOM-kills llama-server: 500 'signal: killed'
    (llama_server.go:1303-1372 WaitUntilRunning reports the exit)."""
    node = sim_node(vram_gb=0, ram_gb=4)
    reply = generate(node, "llama3.1")
    assert reply.status_code == 500
    assert reply.json()["error"] == "llama-server process has terminated: signal: killed"
    assert ps(node) == {}


# ----------------------------------------------------------------------------------- eviction


@pytest.mark.parametrize(("first_keep", "second_keep"), [("1h", "2m"), (-1, "1h")])
def test_eviction_takes_the_shortest_keep_alive_not_the_oldest(sim_node, first_keep, second_keep):
    node = sim_node(vram_gb=14, unload_seconds=0.05)  # default ctx 4096: 5.3 + 5.8 GiB fit, +2.6 does not
    load(node, "llama3.1", keep_alive=first_keep)
    load(node, "codellama", keep_alive=second_keep)
    load(node, "llama3.2:3b")
    assert sorted(ps(node)) == ["llama3.1:latest", "llama3.2:3b"]
    assert node.counts("codellama")["unloads"] == 1
    assert node.counts("llama3.1")["unloads"] == 0


def test_eviction_prefers_an_idle_model_over_a_busy_shorter_one(sim_node):
    node = sim_node(vram_gb=14)
    load(node, "codellama", keep_alive="2m")  # shortest keep_alive, but busy below
    load(node, "llama3.1", keep_alive="1h")
    node.inference_time_scale = 10_000.0  # the next generation runs until the node stops
    outcome: list = []
    busy = threading.Thread(target=generate_into, args=(outcome, node, "codellama"))
    busy.start()
    wait_until(
        lambda: any(m["name"] == "codellama:latest" and m["in_flight"] for m in node.loaded()), timeout=5
    )
    node.inference_time_scale = 0.0
    reply = generate(node, "llama3.2:3b")  # needs one victim: the idle llama3.1, not the busy codellama
    assert reply.status_code == 200
    assert sorted(ps(node)) == ["codellama:latest", "llama3.2:3b"]
    node.stop()
    busy.join(timeout=5)
    assert len(outcome) == 1  # the busy request ended (cut off by the stop) instead of being evicted


def test_a_runner_computes_one_request_at_a_time(sim_node):
    node = sim_node(vram_gb=24, inference_time_scale=10_000.0, preload=[("llama3.2:3b", "auto")])
    outcomes: list = []
    askers = [threading.Thread(target=generate_into, args=(outcomes, node, "llama3.2:3b")) for _ in range(2)]
    for asker in askers:
        asker.start()
    wait_until(lambda: node.loaded()[0]["computing"] + node.loaded()[0]["waiting"] == 2, timeout=5)
    runner = node.loaded()[0]
    assert (runner["computing"], runner["waiting"]) == (1, 1)  # OLLAMA_NUM_PARALLEL=1: one waits its turn
    node.stop()
    for asker in askers:
        asker.join(timeout=5)
    assert len(outcomes) == 2


def test_eviction_finishes_before_the_new_model_is_listed(sim_node):
    node = sim_node(vram_gb=14, unload_seconds=0.3)
    load(node, "llama3.1", keep_alive=-1)
    load(node, "codellama", keep_alive="1h")
    load(node, "llama3.2:3b")
    assert "codellama:latest" not in ps(node)


def test_cap_on_loaded_models_evicts_one(sim_node):
    node = sim_node(vram_gb=24, max_loaded=2)
    load(node, "all-minilm", keep_alive="10m")
    load(node, "llama3.2:3b", keep_alive="5m")
    load(node, "llama3.1", keep_alive="10m")
    assert sorted(ps(node)) == ["all-minilm:latest", "llama3.1:latest"]


def test_automatic_cap_is_three_models(sim_node):
    node = sim_node(vram_gb=0)
    for model in ("all-minilm", "nomic-embed-text", "mxbai-embed-large", "llama3.2:3b"):
        load(node, model)
    assert len(ps(node)) == 3


# ----------------------------------------------------------------------------------- keep_alive


@pytest.mark.parametrize(
    ("keep_alive", "error"),
    [
        ("-1", 'time: missing unit in duration "-1"'),
        ("300", 'time: missing unit in duration "300"'),
        (True, "Unsupported type: 'bool'"),
        ("5x", 'time: unknown unit "x" in duration "5x"'),
    ],
)
def test_bad_keep_alive_is_a_400_with_go_text(sim_node, keep_alive, error):
    node = sim_node(vram_gb=24)
    reply = generate(node, "llama3.1", keep_alive=keep_alive)
    assert reply.status_code == 400 and reply.json() == {"error": error}
    assert ps(node) == {}


@pytest.mark.parametrize("keep_alive", [-1, "-1m", "-2h"])
def test_negative_keep_alive_means_forever(sim_node, keep_alive):
    node = sim_node(vram_gb=24)
    assert expiry_year(load(node, "llama3.2:3b", keep_alive=keep_alive)) > 2300


def test_request_without_keep_alive_keeps_the_loaded_duration(sim_node):
    node = sim_node(vram_gb=24)
    load(node, "llama3.2:3b", keep_alive=-1)
    assert generate(node, "llama3.2:3b", prompt="hi", stream=False).status_code == 200
    assert expiry_year(ps(node)["llama3.2:3b"]) > 2300
    assert expiry_year(load(node, "llama3.2:3b", keep_alive="1h")) < 2300


def test_default_keep_alive_applies_to_a_load(sim_node):
    node = sim_node(vram_gb=24, keep_alive_default="-1")  # the env var accepts a bare integer
    assert expiry_year(load(node, "llama3.2:3b")) > 2300


@pytest.mark.parametrize("keep_alive", ["1s", 0.3])
def test_models_expire_after_keep_alive(sim_node, keep_alive):
    node = sim_node(vram_gb=24)
    load(node, "all-minilm", keep_alive=keep_alive)
    wait_until(lambda: "all-minilm:latest" not in ps(node), timeout=5)
    assert node.counts("all-minilm") == {"loads": 1, "unloads": 1}


def test_keep_alive_zero_with_a_prompt_generates_then_unloads(sim_node):
    node = sim_node(vram_gb=24)
    reply = generate(node, "llama3.2:3b", prompt="hi", keep_alive=0, stream=False)
    assert reply.status_code == 200 and reply.json()["done_reason"] == "stop"
    wait_until(lambda: "llama3.2:3b" not in ps(node), timeout=5)


def test_fractional_keep_alive_is_a_load_not_an_unload(sim_node):
    node = sim_node(vram_gb=24)
    assert generate(node, "llama3.2:3b", keep_alive=0.4).json()["done_reason"] == "load"


# ----------------------------------------------------------------------------------- unload


def test_unload_is_asynchronous(sim_node):
    node = sim_node(vram_gb=24, unload_seconds=0.5, preload=[("llama3.1", "auto")])
    reply = generate(node, "llama3.1", keep_alive=0, stream=True)
    assert reply.status_code == 200 and reply.json()["done_reason"] == "unload"
    stopping = ps(node)["llama3.1:latest"]  # still listed, expiring now ("Stopping...")
    assert expires_at(stopping) <= datetime.now(UTC) + timedelta(seconds=1)
    assert node.loaded()[0]["stopping"]
    wait_until(lambda: "llama3.1:latest" not in ps(node), timeout=5)
    assert node.counts("llama3.1") == {"loads": 0, "unloads": 1}


def test_unload_of_an_unknown_model_is_a_404_and_of_an_embedding_model_works(sim_node):
    node = sim_node(vram_gb=24, preload=[("all-minilm", "auto")])
    reply = generate(node, "nope", keep_alive=0)
    assert reply.status_code == 404 and reply.json() == {"error": "model 'nope' not found"}
    assert generate(node, "all-minilm", keep_alive=0).json()["done_reason"] == "unload"
    wait_until(lambda: ps(node) == {}, timeout=5)


def test_unload_of_a_model_not_loaded_is_a_200_no_op(sim_node):
    node = sim_node(vram_gb=24)
    assert generate(node, "llama3.1", keep_alive=0).json()["done_reason"] == "unload"
    assert node.counts("llama3.1") == {"loads": 0, "unloads": 0}


def test_a_model_is_listed_only_after_its_load_finished(sim_node):
    node = sim_node(vram_gb=24, load_seconds_per_gb=600.0)  # a load that waits until we let it finish
    result: dict = {}
    worker = threading.Thread(
        target=lambda: result.update(reply=post(node, "/api/embed", model="mxbai-embed-large", input=""))
    )
    worker.start()
    wait_until(lambda: node.loading == "mxbai-embed-large:latest", timeout=5)
    assert ps(node) == {}
    node.load_seconds_per_gb = 0.0
    worker.join(timeout=10)
    assert result["reply"].status_code == 200
    assert "mxbai-embed-large:latest" in ps(node)


def test_ps_is_sorted_by_expiry_descending(sim_node):
    node = sim_node(vram_gb=24)
    load(node, "all-minilm", keep_alive="1m")
    load(node, "llama3.2:3b", keep_alive=-1)
    load(node, "nomic-embed-text", keep_alive="1h")
    assert list(ps(node)) == ["llama3.2:3b", "nomic-embed-text:latest", "all-minilm:latest"]


def test_full_pending_queue_is_a_503_but_loaded_models_bypass_it(sim_node):
    node = sim_node(vram_gb=24, max_queue=1, load_seconds_per_gb=600.0, preload=[("llama3.2:3b", "auto")])
    replies: dict[str, requests.Response] = {}

    def embed(model: str) -> None:
        replies[model] = post(node, "/api/embed", model=model, input="")

    first = threading.Thread(target=embed, args=("mxbai-embed-large",))  # holds the load slot
    first.start()
    wait_until(lambda: node.loading == "mxbai-embed-large:latest", timeout=5)
    second = threading.Thread(target=embed, args=("all-minilm",))
    second.start()
    wait_until(lambda: node.queued == 1, timeout=5)
    busy = post(node, "/api/embed", model="nomic-embed-text", input="")
    assert busy.status_code == 503
    assert busy.json() == {"error": "server busy, please try again.  maximum pending requests exceeded"}
    assert generate(node, "llama3.2:3b", prompt="hi", stream=False).status_code == 200  # fast path
    node.load_seconds_per_gb = 0.0
    first.join(timeout=10)
    second.join(timeout=10)
    assert [replies[m].status_code for m in ("mxbai-embed-large", "all-minilm")] == [200, 200]
