"""The simulator's Scheduler driven directly, without sockets or HTTP: each test names the Ollama source
line it follows (shared/spec/real-ollama-gaps.md, shared/spec/ollama-api.md).

Tests that need an eviction or an unload to complete start the expiry thread (`with Scheduler(...)`);
the keep_alive test steps the clocks itself through `reap_once()` and runs no thread at all.
"""

from __future__ import annotations

import ast
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import wait_until

from ollama_sim import BUSY_TEXT, CATALOG, RUNNER_VRAM_OVERHEAD, ApiError, Runner, Scheduler
from ollama_sim.scheduler import KILLED

LLAMA, LLAMA_3B, CODELLAMA, LLAMA_70B = "llama3.1:latest", "llama3.2:3b", "codellama:latest", "llama3.1:70b"
MXBAI, MINILM = "mxbai-embed-large:latest", "all-minilm:latest"
TIMEOUT = 5.0


@pytest.fixture
def scheduler() -> Iterator:
    """scheduler(**kwargs): a started Scheduler (expiry thread running), stopped at teardown."""
    started: list[Scheduler] = []

    def make(**kwargs: object) -> Scheduler:
        kwargs.setdefault("unload_seconds", 0.0)
        started.append(Scheduler(**kwargs).start())  # type: ignore[arg-type]
        return started[-1]

    yield make
    for sched in started:
        sched.stop()


def load(sched: Scheduler, model: str, keep_alive_ns: int | None = None, **opts: object) -> Runner:
    """One request: schedule, then release (the keep_alive timer starts)."""
    runner = sched.schedule(CATALOG[model], dict(opts), keep_alive_ns)
    sched.release(runner)
    return runner


def names(sched: Scheduler) -> list[str]:
    return sorted(m["name"] for m in sched.loaded() if not m["stopping"])


def on_gpu(runner: Runner) -> bool:
    return runner.size_vram == runner.size > 0


# ----------------------------------------------------------------------------------- reloads


def test_needs_reload_only_for_runner_fields_never_for_sampling_or_absent_num_gpu(scheduler):
    """sched.go:1381-1432 needsReload: a new num_gpu < 0 or absent equals anything (:1408); sampling
    options are no runner field; num_ctx differing from the loaded one reloads (one unload + one load)."""
    sched = scheduler(vram_gb=24)
    first = load(sched, LLAMA)
    assert load(sched, LLAMA, temperature=0.1, top_k=5) is first
    assert load(sched, LLAMA, num_gpu=-1) is first
    reloaded = load(sched, LLAMA, num_ctx=8192)
    assert reloaded is not first and reloaded.num_ctx == 8192
    assert sched.counts(LLAMA) == {"loads": 2, "unloads": 1}


def test_embedding_batch_is_compared_literally(scheduler):
    """routes.go:151 + llama_server.go:92-103: an embedding model's batch is min(2048, requested num_ctx)
    and never automatic (routes.go:217), so sched.go:1402 compares it: num_ctx 512 then no options (ctx
    32768 on 24 GiB, batch 2048) reloads; the same request again does not."""
    sched = scheduler(vram_gb=24)
    small = load(sched, MXBAI, num_ctx=512)
    assert small.num_batch == 512
    default = load(sched, MXBAI)
    assert default is not small and default.num_batch == 2048
    assert load(sched, MXBAI) is default
    assert sched.counts(MXBAI) == {"loads": 2, "unloads": 1}


# ----------------------------------------------------------------------------------- eviction


def test_victims_by_keep_alive_then_blob_idle_first():
    """sched.go findRunnerToUnload / ByDurationAndName (ollama-api.md §7 "Victim order"): keep_alive
    ascending (forever last), ties by blob path, the first idle one; not LRU. No thread needed."""
    sched = Scheduler(vram_gb=80)
    hour, minutes = 3600 * 10**9, 120 * 10**9
    long = load(sched, LLAMA, keep_alive_ns=hour)
    short = load(sched, CODELLAMA, keep_alive_ns=minutes)
    tie = load(sched, LLAMA_3B, keep_alive_ns=minutes)
    tie_order = sorted([short, tie], key=lambda r: r.spec.blob)
    assert sched.victims(exclude="", evict_all=True) == [*tie_order, long]
    busy = sched.schedule(CATALOG[tie_order[0].spec.name], {}, None)  # in flight: skipped while one is idle
    assert sched.victims(exclude="", evict_all=False) == [tie_order[1]]
    sched.release(busy)


def test_preflight_evicts_the_shortest_keep_alive(scheduler):
    """sched.go:547-562: next to other models the prediction must fit in 80% of free VRAM, else one
    victim (ByDurationAndName) goes and the load tries again."""
    sched = scheduler(vram_gb=14)  # default ctx 4096: llama3.1 + codellama fit, + llama3.2:3b does not
    load(sched, LLAMA, keep_alive_ns=3600 * 10**9)
    load(sched, CODELLAMA, keep_alive_ns=120 * 10**9)
    load(sched, LLAMA_3B)
    assert names(sched) == [LLAMA, LLAMA_3B]
    assert sched.counts(CODELLAMA)["unloads"] == 1 and sched.counts(LLAMA)["unloads"] == 0


# ----------------------------------------------------------------------------------- out of memory


def test_oom_retries_once_with_a_smaller_automatic_context(scheduler):
    """sched.go:649-671, 757-783: a load that runs out of memory is retried once, with an automatic
    context stepped down (131072 -> 32768); an explicit context gets no retry: 500 cudaMalloc failed."""
    sched = scheduler(vram_gb=72)  # default ctx 131072: 70b needs 79.9 GiB; at 32768 it needs 49.9 GiB
    runner = load(sched, LLAMA_70B, num_gpu=999)
    assert on_gpu(runner) and runner.num_ctx == 32768
    with pytest.raises(ApiError) as error:
        load(sched, LLAMA_70B, num_gpu=999, num_ctx=131072)
    assert error.value.status == 500 and "cudaMalloc failed: out of memory" in error.value.message
    assert names(sched) == []  # the old instance went for the reload and nothing replaced it


def test_oom_with_others_loaded_evicts_them_all_then_retries(scheduler):
    """sched.go:790: an explicit partial num_gpu skips the pre-flight; sched.go:649-671: its OOM evicts
    every other model and retries once."""
    sched = scheduler(vram_gb=24)
    load(sched, LLAMA_3B)
    runner = load(sched, LLAMA_70B, num_gpu=30)  # 30 layers: 18.5 GiB, 18.4 GiB free next to the 3b
    assert names(sched) == [LLAMA_70B] and 0 < runner.size_vram < runner.size
    assert sched.counts(LLAMA_3B)["unloads"] == 1


def test_cpu_load_larger_than_ram_is_killed():
    """sched.go:547: the only memory pre-flight needs GPUs; sched.go:1162: a CPU load reads the whole
    file into RAM, so the kernel kills llama-server: 500 'signal: killed'."""
    sched = Scheduler(vram_gb=0, ram_gb=4)
    with pytest.raises(ApiError) as error:
        load(sched, LLAMA)
    assert (error.value.status, error.value.message) == (500, KILLED)
    assert sched.loaded() == []


# ----------------------------------------------------------------------------------- restart and discovery


def test_restart_leaves_nothing_loaded_and_keeps_counts():
    """routes.go:2023-2028 unloadAllRunners on SIGTERM; sched.go:97: the new process starts with an empty
    map, nothing reloads by itself. Counts are the simulator's and are kept."""
    sched = Scheduler(vram_gb=24)
    load(sched, LLAMA)
    load(sched, MINILM)
    sched.restart()
    assert sched.loaded() == []
    assert sched.counts(LLAMA) == {"loads": 1, "unloads": 0}


def test_restart_loses_a_load_in_progress(scheduler):
    """routes.go:2023-2028: the old process and its llama-servers are gone; the waiting client gets an
    error, and the model is not listed afterwards."""
    sched = scheduler(vram_gb=24, load_seconds_per_gb=10_000.0)
    outcome: list[BaseException | Runner] = []

    def request() -> None:
        try:
            outcome.append(sched.schedule(CATALOG[LLAMA_3B], {}, None))
        except ApiError as err:
            outcome.append(err)

    thread = threading.Thread(target=request)
    thread.start()
    wait_until(lambda: sched.loading == LLAMA_3B, "the load started", timeout=TIMEOUT)
    sched.restart()
    sched.load_seconds_per_gb = 0.0  # the load's wait ends now, in the new process's epoch
    thread.join(TIMEOUT)
    (error,) = outcome
    assert isinstance(error, ApiError) and (error.status, error.message) == (500, KILLED)
    assert sched.loaded() == []


def test_gpu_missing_at_start_every_load_lands_on_cpu_until_a_restart_finds_it():
    """discover/runner.go:45,265: GPUs are discovered once per process; routes.go:2043-2057: the default
    context follows the VRAM found (none: 4096); even an explicit num_gpu gets a CPU-only llama-server."""
    sched = Scheduler(vram_gb=24, gpu_found=False)
    assert sched.default_num_ctx == 4096
    runner = load(sched, LLAMA_3B, num_gpu=999)
    assert runner.size_vram == 0 and runner.num_ctx == 4096
    sched.restart(gpu_found=True)
    assert sched.default_num_ctx == 32768
    assert on_gpu(load(sched, LLAMA_3B, num_gpu=999))


def test_vram_held_by_another_program_makes_an_automatic_load_split():
    """llama_server.go:2600-2634: the driver's free figure includes other programs; llama.cpp --fit keeps
    1 GiB free and places the layers that fit (sched.go:1295-1336 takes the smaller figure)."""
    sched = Scheduler(vram_gb=12, external_vram_gb=6)
    runner = load(sched, LLAMA)
    assert 0 < runner.size_vram < runner.size
    assert runner.held_vram == runner.size_vram + RUNNER_VRAM_OVERHEAD


# ----------------------------------------------------------------------------------- queue and keep_alive


def test_full_pending_queue_is_busy_but_a_loaded_model_bypasses_it():
    """sched.go:169-212 getRunner: a loaded runner needing no reload is used at once (>= 0.11.5);
    anything else joins the pending queue, refused with 503 beyond OLLAMA_MAX_QUEUE."""
    sched = Scheduler(vram_gb=24)
    first = load(sched, MINILM)
    sched.max_queue = 0
    assert load(sched, MINILM) is first
    with pytest.raises(ApiError) as error:
        load(sched, LLAMA_3B)
    assert (error.value.status, error.value.message) == (503, BUSY_TEXT)


def test_keep_alive_expiry_then_asynchronous_removal_stepped_by_hand():
    """ollama-api.md keep_alive: the timer starts when the request count drops to 0; sched.go
    expireRunner sets expires_at = now and the process closes later (asynchronous unload)."""
    sched = Scheduler(vram_gb=24, unload_seconds=2.0)
    runner = sched.schedule(CATALOG[MINILM], {}, 60 * 10**9)
    assert sched.reap_once(now_ns=runner.expires_at_ns + 10**12) > 0 and runner.stop_at is None  # in use
    sched.release(runner)
    due = runner.expires_at_ns
    sched.reap_once(now_ns=due - 1)
    assert runner.stop_at is None
    sched.reap_once(now_ns=due)
    assert runner.stop_at is not None and [m["stopping"] for m in sched.loaded()] == [True]
    sched.reap_once(now_ns=due, now_mono=runner.stop_at - 0.5)
    assert len(sched.loaded()) == 1  # still listed while it stops
    sched.reap_once(now_ns=due, now_mono=runner.stop_at)
    assert sched.loaded() == [] and sched.counts(MINILM) == {"loads": 1, "unloads": 1}


# ----------------------------------------------------------------------------------- the package's borders

PACKAGE = Path(__file__).resolve().parent.parent / "ollama_sim"
CLIENT_MODULES = {
    "gpu_controller",
    "balancer",
    "optimizer",
    "events",
    "gpu_state",
    "flockparsecli",
    "console",
}


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    found |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    return {name.split(".")[0] for name in found}


def test_the_simulator_shares_no_code_with_the_client_and_its_scheduler_opens_no_socket():
    """The simulator checks the client, so it must not reuse the client's rules (issue 8)."""
    for path in PACKAGE.glob("*.py"):
        assert not imported_modules(path) & CLIENT_MODULES, path.name
    assert not imported_modules(PACKAGE / "scheduler.py") & {"socket", "http", "socketserver", "urllib"}
