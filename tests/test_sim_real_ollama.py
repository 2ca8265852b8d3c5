"""Issue 7: the simulator follows real Ollama (restart, missing GPU, VRAM of other programs, unreported VRAM,
embedding batches, Modelfile options, MLX models, CPU loads, /api/ps stalls and fallbacks, era A).

Each test names the Ollama source it follows (ollama/ollama at fb307609 = v0.33.0-rc2 unless a tag is given).
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests
from helpers import wait_until

from ollama_sim import CATALOG, DEFAULT_MODELS, RUNNER_VRAM_OVERHEAD, SimNode

GiB = 1024**3
ROOT = Path(__file__).resolve().parent.parent


def post(node, path: str, **body) -> requests.Response:
    return requests.post(node.url + path, json=body, timeout=10)


def load(node, model: str, **body) -> dict:
    """Load through /api/embed (embedding models) or /api/generate; return the /api/ps entry."""
    name = model if ":" in model else f"{model}:latest"
    path = "/api/embed" if CATALOG[name].embedding_only else "/api/generate"
    extra = {"input": ""} if path == "/api/embed" else {}
    reply = post(node, path, model=model, **extra, **body)
    assert reply.status_code == 200, reply.text
    return ps(node)[name]


def ps(node) -> dict[str, dict]:
    reply = requests.get(node.url + "/api/ps", timeout=10)
    reply.raise_for_status()
    return {m["name"]: m for m in reply.json()["models"]}


def on_gpu(entry: dict) -> bool:
    return entry["size_vram"] == entry["size"] > 0


def size_at_default_ctx(node: SimNode, model: str) -> int:
    """The loaded size of a completion model at the node's automatic context (batch 512)."""
    spec = CATALOG[model]
    return spec.loaded_size(min(node.default_num_ctx, spec.context_length))


# ----------------------------------------------------------------------------------- GPU missing at start


def test_gpu_missing_at_start_every_load_lands_on_cpu_until_a_restart_finds_it(sim_node):
    """discover/runner.go:45,265: GPUs are discovered once per process (bootstrapped); routes.go:2043-2057:
    the default context comes from the VRAM found at start (none -> 4096); an explicit num_gpu becomes -ngl
    for a CPU-only llama-server (llama_server.go:402-410, :488-522), so it lands on CPU too."""
    node = sim_node(vram_gb=24)
    node.restart(gpu_found=False)
    assert node.gpu_found is False and node.default_num_ctx == 4096
    assert load(node, "llama3.1")["size_vram"] == 0
    forced = load(node, "llama3.2:3b", options={"num_gpu": 29})
    assert forced["size_vram"] == 0 and forced["context_length"] == 4096
    node.restart()  # the GPU is found again by the next process
    assert node.gpu_found is True and node.default_num_ctx == 32768 and ps(node) == {}
    assert on_gpu(load(node, "llama3.2:3b", options={"num_gpu": 29}))


def test_gpu_missing_from_the_constructor(sim_node):
    """discover/runner.go:45,265 and routes.go:2043-2057, as above, for a node that started without it."""
    node = sim_node(vram_gb=24, gpu_found=False)
    assert node.gpu_found is False and node.default_num_ctx == 4096
    assert load(node, "llama3.2:3b")["size_vram"] == 0
    with pytest.raises(AttributeError):
        node.gpu_found = True  # read-only: only a restart discovers GPUs


# ----------------------------------------------------------------------------------- VRAM of other programs


def test_vram_held_by_another_program_makes_automatic_loads_split_or_land_on_cpu(sim_node):
    """llama_server.go:2600-2634 (the driver's free figure includes other programs) + llama.cpp --fit
    (common/fit.cpp: 1 GiB margin) for automatic loads; sched.go:1295-1336 updateFreeSpace."""
    node = sim_node(vram_gb=24, external_vram_gb=20)
    split = load(node, "llama3.1")
    assert 0 < split["size_vram"] < split["size"]
    assert split["size_vram"] <= 4 * GiB - RUNNER_VRAM_OVERHEAD - 1 * GiB
    post(node, "/api/generate", model="llama3.1", keep_alive=0)
    wait_until(lambda: ps(node) == {}, timeout=5)
    node.external_vram_gb = 24
    assert load(node, "llama3.1")["size_vram"] == 0
    assert list(ps(node)) == ["llama3.1:latest"]  # the other program is never listed


def test_released_vram_leaves_loaded_models_where_they_are(sim_node):
    """sched.go:1381-1432 needsReload: a request without num_gpu never reloads, so a model that fell to
    RAM stays there after the other program exits, until moved (explicit num_gpu) or expired."""
    node = sim_node(vram_gb=24, external_vram_gb=24)
    assert load(node, "llama3.1")["size_vram"] == 0
    node.external_vram_gb = 0
    assert load(node, "llama3.1")["size_vram"] == 0
    assert node.counts("llama3.1") == {"loads": 1, "unloads": 0}
    assert on_gpu(load(node, "llama3.1", options={"num_gpu": 33}))


def test_forced_load_that_does_not_fit_next_to_another_program_is_an_oom_500(sim_node):
    """llama_server.go:1303-1372: a user-set -ngl disables --fit, so llama-server runs out of memory;
    sched.go:649-671: the one retry (smaller automatic context) does not help: 500 out of memory."""
    node = sim_node(vram_gb=24, external_vram_gb=20)
    reply = post(node, "/api/generate", model="llama3.1", options={"num_gpu": 33, "num_ctx": 4096})
    assert reply.status_code == 500 and "out of memory" in reply.json()["error"]
    assert ps(node) == {}


# ----------------------------------------------------------------------------------- unreported VRAM


def test_each_gpu_runner_holds_an_overhead_size_vram_does_not_show(sim_node):
    """llama_server.go:2739-2760: size_vram is the sum of parsed buffer lines; the CUDA context is in none.
    llama_server.go:2600-2634 and sched.go:1295-1336: free memory is the smaller (driver) figure."""
    node = sim_node(vram_gb=24, preload=[("llama3.1", "forced-cpu")])
    entry = load(node, "llama3.2:3b")
    by_name = {m["name"]: m for m in node.loaded()}
    assert by_name["llama3.2:3b"]["held_vram"] == entry["size_vram"] + RUNNER_VRAM_OVERHEAD
    assert by_name["llama3.1:latest"]["held_vram"] == 0  # num_gpu 0: no GPU backend at all


def test_forced_load_fitting_by_size_vram_but_not_with_the_overhead_runs_out_of_memory(sim_node):
    """llama_server.go:2600-2634 (real free memory) + llama_server.go:1303-1372 (cudaMalloc OOM): the
    runner's unreported overhead must fit too."""
    node = sim_node(vram_gb=24)
    size = size_at_default_ctx(node, "llama3.2:3b")
    node.external_vram_gb = (24 * GiB - size - RUNNER_VRAM_OVERHEAD // 2) / GiB
    options = {"num_gpu": 29, "num_ctx": node.default_num_ctx}  # explicit context: no smaller retry
    reply = post(node, "/api/generate", model="llama3.2:3b", options=options)
    assert reply.status_code == 500 and "out of memory" in reply.json()["error"]
    node.external_vram_gb = (24 * GiB - size - RUNNER_VRAM_OVERHEAD - 64 * 1024**2) / GiB
    assert on_gpu(load(node, "llama3.2:3b", options=options))


def test_automatic_load_next_to_another_model_splits_when_the_gpu_is_nearly_full(sim_node):
    """sched.go:547-562: the pre-flight passes (PredictServerVRAM, llama_server.go:2681-2701, <= 80% of
    free), then llama.cpp --fit keeps 1 GiB free against real memory (common/fit.cpp) and splits."""
    node = sim_node(vram_gb=12)  # automatic context 4096: small KV caches
    load(node, "llama3.1")
    held = node.loaded()[0]["held_vram"]
    spec = CATALOG["llama3.2:3b"]
    ctx = min(node.default_num_ctx, spec.context_length)
    predicted, size = spec.predicted_vram(ctx), spec.loaded_size(ctx)
    free = size + RUNNER_VRAM_OVERHEAD + GiB // 2  # < size + overhead + 1 GiB margin, > predicted / 0.8
    assert predicted <= 0.8 * free
    node.external_vram_gb = (12 * GiB - held - free) / GiB
    entry = load(node, "llama3.2:3b")
    assert 0 < entry["size_vram"] < entry["size"]
    assert sorted(ps(node)) == ["llama3.1:latest", "llama3.2:3b"]  # nothing evicted


# ----------------------------------------------------------------------------------- embedding batch


def test_embedding_model_loaded_with_num_ctx_512_reloads_on_a_request_without_options(sim_node):
    """routes.go:132,151 + llama_server.go:92-103: batch = min(2048, requested num_ctx), here 512, then
    min(2048, 32768) = 2048; routes.go:217: never automatic for embedding models, so sched.go:1402 does not
    equate them and :1425 compares literally: reload."""
    node = sim_node(vram_gb=24)
    load(node, "mxbai-embed-large", options={"num_ctx": 512})
    load(node, "mxbai-embed-large", options={"num_ctx": 512})
    assert node.counts("mxbai-embed-large") == {"loads": 1, "unloads": 0}
    entry = load(node, "mxbai-embed-large")
    assert entry["context_length"] == 512
    assert node.counts("mxbai-embed-large") == {"loads": 2, "unloads": 1}


def test_embedding_batch_equal_after_the_cap_does_not_reload(sim_node):
    """llama_server.go:92-103: min(2048, 2048) == min(2048, 32768): the literal comparison finds no change."""
    node = sim_node(vram_gb=24)
    load(node, "nomic-embed-text", options={"num_ctx": 2048})
    load(node, "nomic-embed-text")
    assert node.counts("nomic-embed-text") == {"loads": 1, "unloads": 0}


# ----------------------------------------------------------------------------------- Modelfile options


def test_variants_are_not_installed_by_default():
    assert list(SimNode().installed) == list(DEFAULT_MODELS) and len(DEFAULT_MODELS) == 7


def test_modelfile_num_gpu_0_applies_to_every_request(sim_node):
    """routes.go:141-146: Modelfile options first, then the request's; sched.go:1408 keeps a stored
    num_gpu >= 0, so each ordinary request (num_gpu 0 from the Modelfile) moves it back to CPU."""
    node = sim_node(vram_gb=24, models=["llama3.1-cpu"])
    assert load(node, "llama3.1-cpu")["size_vram"] == 0
    assert on_gpu(load(node, "llama3.1-cpu", options={"num_gpu": 33}))
    assert load(node, "llama3.1-cpu")["size_vram"] == 0
    assert node.counts("llama3.1-cpu") == {"loads": 3, "unloads": 2}


def test_modelfile_parameters_text_is_ollamas_show_layout(sim_node):
    """routes.go:1497-1509: fmt.Sprintf("%-*s %#v", 30, key, value) per option, joined by newlines;
    images.go:586 String(): the Modelfile has one PARAMETER line per option."""
    node = sim_node(vram_gb=24, models=["llama3.1-cpu", "codellama-16k"])
    shown = post(node, "/api/show", model="llama3.1-cpu").json()
    lines = ["num_gpu                        0", 'stop                           "<|eot_id|>"']
    assert shown["parameters"] == "\n".join(lines)
    assert "PARAMETER num_gpu 0\n" in shown["modelfile"]
    shown = post(node, "/api/show", model="codellama-16k").json()
    assert shown["parameters"].splitlines()[0] == "num_ctx                        16384"


def test_modelfile_num_ctx_is_explicit_on_every_request(sim_node):
    """routes.go:141-146 (Modelfile num_ctx applied) and routes.go:176-186 usesAutomaticNumCtx (a Modelfile
    num_ctx is not automatic): 16384 even where the automatic context is 4096."""
    node = sim_node(vram_gb=8, models=["codellama", "codellama-16k"])
    assert load(node, "codellama")["context_length"] == 4096
    assert load(node, "codellama-16k")["context_length"] == 16384
    load(node, "codellama-16k", options={"temperature": 0.2})
    assert node.counts("codellama-16k") == {"loads": 1, "unloads": 0}


# ----------------------------------------------------------------------------------- MLX (safetensors)


def test_mlx_model_ignores_num_gpu_and_reports_size_equal_to_size_vram(sim_node):
    """images.go:88-90 IsMLX; sched.go:1425 skips the option comparison for MLX; x/mlxrunner/client.go:485-488
    MemorySize returns (mem, mem)."""
    node = sim_node(vram_gb=24, models=["qwen3.5:2b-nvfp4"])
    entry = load(node, "qwen3.5:2b-nvfp4")
    assert entry["details"]["format"] == "safetensors" and on_gpu(entry)
    assert on_gpu(load(node, "qwen3.5:2b-nvfp4", options={"num_gpu": 0}))
    assert on_gpu(load(node, "qwen3.5:2b-nvfp4", options={"num_gpu": 999}))
    assert node.counts("qwen3.5:2b-nvfp4") == {"loads": 1, "unloads": 0}
    tags = requests.get(node.url + "/api/tags", timeout=5).json()["models"]
    assert tags[0]["details"]["format"] == "safetensors"


# ----------------------------------------------------------------------------------- CPU loads


def test_cpu_loads_evict_nothing_and_have_no_ram_check(sim_node):
    """sched.go:547: the pre-flight requires len(loadGpus) > 0; sched.go:272-273: num_gpu 0 -> no GPUs.
    A CPU load larger than RAM is killed (500 signal: killed) and the other models stay."""
    node = sim_node(vram_gb=24, ram_gb=16, max_loaded=4)  # OLLAMA_MAX_LOADED_MODELS would evict otherwise
    load(node, "llama3.1")
    load(node, "codellama", options={"num_gpu": 0})
    load(node, "llama3.2:3b", options={"num_gpu": 0})  # 10 GiB in RAM with codellama: no check at all
    reply = post(node, "/api/generate", model="llama3.1:70b", options={"num_gpu": 0})
    assert reply.status_code == 500
    assert reply.json() == {"error": "llama-server process has terminated: signal: killed"}
    assert sorted(ps(node)) == ["codellama:latest", "llama3.1:latest", "llama3.2:3b"]
    assert node.counts("llama3.1") == {"loads": 1, "unloads": 0}


# ----------------------------------------------------------------------------------- /api/ps


def test_ps_stalls_while_a_runner_unloads(sim_node):
    """sched.go:416-463: processCompleted holds the runner's refMu through unload + VRAM recovery
    (waitForRecovery up to 5 s); sched.go:1757 loadedModels takes every refMu: /api/ps waits."""
    node = sim_node(vram_gb=24, ps_stall_seconds=0.5, preload=[("llama3.2:3b", "auto")])
    assert "llama3.2:3b" in ps(node)
    post(node, "/api/generate", model="llama3.2:3b", keep_alive=0)
    started = time.monotonic()
    assert ps(node) == {}
    assert time.monotonic() - started >= 0.4
    node.ps_stall_seconds = 0.0
    load(node, "all-minilm")
    started = time.monotonic()
    ps(node)
    assert time.monotonic() - started < 0.3


def test_size_fallback_reports_the_file_size_for_both_figures(sim_node):
    """llama_server.go:2669-2675: no buffer line parsed -> size = size_vram = the model file size,
    which reads as 100% GPU even for a model in RAM."""
    node = sim_node(vram_gb=24, preload=[("llama3.1", "forced-cpu")])
    node.set_fault("size_fallback")
    entry = ps(node)["llama3.1:latest"]
    assert entry["size"] == entry["size_vram"] == CATALOG["llama3.1:latest"].file_size
    assert node.loaded()[0]["size_vram"] == 0  # the truth is unchanged
    node.clear_fault()
    assert ps(node)["llama3.1:latest"]["size_vram"] == 0


# ----------------------------------------------------------------------------------- older Ollama (era A)


def test_era_a_forced_load_on_a_nearly_full_gpu_lands_on_cpu_silently(sim_node):
    """v0.12.10 llm/memory.go:285 (a GPU needs graph + minimum memory + 2 layers) and :323 (the estimate);
    v0.12.10 llm/server.go:501-503: estimate.Layers == 0 -> gpus = [] -> CPU, no error. Era C instead
    fails (llama_server.go:1303-1372)."""
    old = sim_node(vram_gb=24, external_vram_gb=23, version="0.12.10")
    assert requests.get(old.url + "/api/version", timeout=5).json() == {"version": "0.12.10"}
    entry = load(old, "llama3.1", options={"num_gpu": 33})
    assert entry["size_vram"] == 0 and old.loaded()[0]["num_gpu"] == 33
    new = sim_node(vram_gb=24, external_vram_gb=23)
    reply = post(new, "/api/generate", model="llama3.1", options={"num_gpu": 33})
    assert reply.status_code == 500 and "out of memory" in reply.json()["error"]


def test_era_b_versions_are_refused():
    with pytest.raises(ValueError, match="era B"):
        SimNode(version="0.20.0")


# ----------------------------------------------------------------------------------- preload


def test_preload_cpu_is_an_automatic_load_while_another_program_held_the_vram(sim_node):
    """sched.go:1381-1432 (automatic load, num_gpu -1 stored) + common/fit.cpp (nothing fits): the model
    is in RAM, and the other program's VRAM is back to the configured amount."""
    node = sim_node(vram_gb=24, external_vram_gb=2, preload=[("llama3.1", "cpu"), ("llama3.2:3b", "auto")])
    by_name = {m["name"]: m for m in node.loaded()}
    assert by_name["llama3.1:latest"]["size_vram"] == 0 and by_name["llama3.1:latest"]["num_gpu"] == -1
    assert on_gpu(ps(node)["llama3.2:3b"])
    assert node.external_vram_gb == 2


def test_two_automatic_cpu_fallbacks_cannot_coexist_on_a_gpu_node():
    """sched.go:547-562: with the GPU full the second automatic load's pre-flight evicts the first."""
    with pytest.raises(ValueError, match="forced-cpu"):
        SimNode(vram_gb=24, preload=[("llama3.1", "cpu"), ("codellama", "cpu")]).start()
    node = SimNode(vram_gb=0, preload=[("llama3.1", "cpu"), ("codellama", "cpu")]).start()
    try:
        assert len(node.loaded()) == 2  # no GPU: no pre-flight, nothing evicted
    finally:
        node.stop()


# ----------------------------------------------------------------------------------- streaming


def test_a_stream_sends_each_token_as_the_runner_produces_it(sim_node):
    """routes.go:727 (`ch <- res` in the runner's completion callback, once per token) and routes.go:2097
    streamResponse (gin's c.Stream flushes after every chunk): a client reads the first tokens while the
    runner is still generating the rest, and the last chunk carries done and the metrics."""
    node = sim_node(inference_time_scale=20.0, preload=[("llama3.2:3b", "gpu")])
    body = {"model": "llama3.2:3b", "prompt": "why is the sky blue"}
    with requests.post(node.url + "/api/generate", json=body, stream=True, timeout=30) as reply:
        assert reply.headers["Content-Type"] == "application/x-ndjson"
        lines = reply.iter_lines()
        first, second = json.loads(next(lines)), json.loads(next(lines))
        assert not first["done"] and not second["done"] and first["response"]
        assert node.loaded()[0]["computing"] == 1  # the rest is still being generated
        rest = [json.loads(line) for line in lines]
    assert rest[-1]["done"] is True and rest[-1]["eval_count"] == len(rest) + 1


def test_a_node_stopped_mid_stream_drops_the_connection(sim_node):
    """A killed Ollama (routes.go:2023-2028 on SIGTERM) ends its streams without a final chunk: the client
    sees the connection end mid-body, never a done chunk."""
    node = sim_node(inference_time_scale=20.0, preload=[("llama3.2:3b", "gpu")])
    body = {"model": "llama3.2:3b", "prompt": "why is the sky blue"}
    with requests.post(node.url + "/api/generate", json=body, stream=True, timeout=30) as reply:
        lines = reply.iter_lines()
        assert json.loads(next(lines))["done"] is False
        node.stop()
        with pytest.raises(requests.exceptions.ChunkedEncodingError):
            for line in lines:
                assert json.loads(line)["done"] is False


# ----------------------------------------------------------------------------------- CLI


def test_command_line_flags_for_the_real_situations():
    command = [sys.executable, "-m", "ollama_sim", "--port", "0", "--gpu-missing",
               "--external-vram-gb", "3", "--version", "0.12.10",
               "--preload", "llama3.2:3b@auto"]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        url = process.stdout.readline().strip()
        assert requests.get(url + "/api/version", timeout=5).json() == {"version": "0.12.10"}
        (entry,) = requests.get(url + "/api/ps", timeout=5).json()["models"]
        assert entry["size_vram"] == 0 and entry["context_length"] == 4096
    finally:
        process.terminate()
        process.wait(timeout=10)


def test_restart_loses_a_load_in_progress(sim_node):
    """routes.go:2023-2028: the old process and its llama-servers are gone; the client gets an error."""
    node = sim_node(vram_gb=24, load_seconds_per_gb=600.0)
    outcome: list = []

    def ask() -> None:
        try:
            outcome.append(post(node, "/api/generate", model="llama3.2:3b").status_code)
        except requests.RequestException as err:
            outcome.append(err)

    asker = threading.Thread(target=ask)
    asker.start()
    wait_until(lambda: node.loading == "llama3.2:3b", timeout=5)
    node.restart()
    node.load_seconds_per_gb = 0.0
    asker.join(timeout=10)
    assert outcome and outcome[0] != 200
    assert ps(node) == {}
