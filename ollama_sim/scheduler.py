"""One Ollama process's memory and scheduler, as a state machine with no sockets.

Owns: the runners (loaded models), the VRAM/RAM budget and what the driver reports free, needsReload,
placement (the 80% pre-flight, llama.cpp --fit, explicit num_gpu, era A), eviction order, the OOM retry,
keep_alive expiry and asynchronous unload (the expiry thread), the pending-load queue and its cap,
restart (runners gone, GPU discovered again), VRAM held by other programs, and preloads.
The HTTP layer (server.py) turns requests into `schedule()` / `release()` / `unload()` calls; tests can make
the same calls directly (tests/test_sim_scheduler_unit.py).

Locking: `_lock` guards the state below and is never held while waiting (loads and unloads wait on the
`_changed` Condition, which releases it); `_load_mutex` lets one model load at a time, like Ollama's single
pending loop.

Reading order: Runner -> Scheduler.schedule() -> _process_pending() -> _plan() -> _load(), then the expiry
thread (_reap_loop / reap_once) that expires and removes runners, then restart and preload.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import re
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from ollama_sim.catalogue import (
    CATALOG,
    DEFAULT_MODELS,
    RUNNER_VRAM_OVERHEAD,
    GiB,
    MiB,
    ModelSpec,
    canonical_name,
    default_num_ctx,
)
from ollama_sim.wire import BUSY_TEXT, FOREVER_NS, VERSION, ApiError, parse_env_keep_alive

FIT_FRACTION = 0.8  # era C eviction test: next to other models the prediction must be <= 80% of free VRAM
FIT_TARGET = 1 * GiB  # llama.cpp --fit leaves this much free per GPU when it places layers automatically
ERA_A_MINIMUM_MEMORY = 457 * MiB  # v0.12.10 ml/device.go:324 MinimumMemory() for CUDA/ROCm
REAPER_MAX_WAIT = 30.0  # the expiry thread is woken on every state change; this is only a safety net
SHUTTING_DOWN = "server shutting down"
KILLED = "llama-server process has terminated: signal: killed"


def parse_era(version: str) -> bool:
    """True for era A (<= 0.12.10, /api/ps shows llm/memory.go estimates); False for era C (>= 0.30).

    Era B (0.12.11-0.29.x) places layers its own way (createLayout) and is not simulated: ValueError.
    """
    parts = re.match(r"(\d+)\.(\d+)\.(\d+)", version)
    if parts is None:
        raise ValueError(f"version {version!r} is not MAJOR.MINOR.PATCH")
    number = tuple(int(p) for p in parts.groups())
    if number <= (0, 12, 10):
        return True
    if number < (0, 30, 0):
        raise ValueError(f"version {version}: era B (0.12.11-0.29.x) not simulated; use <=0.12.10 or >=0.30")
    return False


def expiry_ns(now_ns: int, keep_alive_ns: int) -> int:
    return now_ns + keep_alive_ns  # forever: now + MaxInt64 ns (~2318), as Go computes it


@dataclass
class Runner:
    """One loaded model instance (Ollama's runnerRef)."""

    spec: ModelSpec
    size: int
    size_vram: int
    num_gpu: int  # stored value: -1 when automatic
    num_ctx: int  # resolved per-slot context (/api/ps context_length)
    num_ctx_explicit: int | None
    num_batch_explicit: int | None
    num_batch: int  # resolved batch (embedding models: compared literally by needsReload)
    main_gpu: int | None
    use_mmap: bool | None
    num_thread: int
    keep_alive_ns: int
    expires_at_ns: int
    held_vram: int = 0  # what the process really holds on the GPU: size_vram + RUNNER_VRAM_OVERHEAD, or 0
    ref_count: int = 0  # requests in flight: a runner is only removed once idle
    stop_at: float | None = None  # set when unloading: removal happens at/after this moment (monotonic)
    # OLLAMA_NUM_PARALLEL (default 1): how many requests compute at once; the others wait their turn
    slots: threading.Semaphore = field(default_factory=lambda: threading.Semaphore(1))
    computing: int = 0  # requests holding a slot now
    waiting: int = 0  # requests waiting for a slot


@dataclass
class Placement:
    """Where a load would put the model: total size, the part on the GPU, and what the GPU really holds."""

    size: int
    size_vram: int
    held_vram: int = 0  # size_vram plus the runner's unreported overhead when it uses the GPU


class _Killed(Exception):
    """A CPU load larger than RAM: the kernel OOM-kills llama-server (no Ollama memory check stops it)."""


class _NeedsEviction(Exception):
    """The model does not fit next to the others (the 80% pre-flight): evict one victim and try again."""


class _OutOfMemory(Exception):
    """llama-server would run out of memory while loading: Ollama's one retry decides what happens."""


class Scheduler:
    """Ollama's scheduler and memory for one node, driven by method calls instead of HTTP.

    `schedule()` blocks like a request does (queue, evictions, load time); evictions complete through the
    expiry thread, so start() it (or use `with Scheduler(...)`) unless a test drives `reap_once()` itself.
    """

    def __init__(
        self,
        vram_gb: float = 24.0,
        ram_gb: float = 64.0,
        models: Iterable[str] | None = None,
        load_seconds_per_gb: float = 0.0,
        unload_seconds: float = 0.05,
        max_loaded: int = 0,
        max_queue: int = 512,
        keep_alive_default: str | int | float = "5m",
        gpu_found: bool = True,
        external_vram_gb: float = 0.0,
        ps_stall_seconds: float = 0.0,
        version: str = VERSION,
    ) -> None:
        self.ram_gb = ram_gb
        self._vram_gb = float(vram_gb)
        self._gpu_found = bool(gpu_found)  # discovered once per process (discover/runner.go:45,265)
        self._external_vram_gb = float(external_vram_gb)
        # /api/ps waits while a runner unloads and its VRAM recovers (sched.go:416-463, :1757); 0 = never
        self.ps_stall_seconds = float(ps_stall_seconds)
        self.era_a = parse_era(version)
        self.installed: dict[str, ModelSpec] = resolve_installed(models)
        self._load_seconds_per_gb = load_seconds_per_gb
        self.unload_seconds = unload_seconds
        self.max_loaded = max_loaded
        self.max_queue = max_queue  # OLLAMA_MAX_QUEUE
        self.loading: str | None = None  # the model being scheduled/loaded now (one at a time)
        self.keep_alive_default_ns = parse_env_keep_alive(keep_alive_default)
        self.default_num_ctx = default_num_ctx(self.discovered_vram_bytes)

        self._lock = threading.Lock()  # guards the memory state below; never held while sleeping
        self._changed = threading.Condition(self._lock)
        self._load_mutex = threading.Lock()  # one model loads at a time, like Ollama's single pending loop
        self._runners: dict[str, Runner] = {}
        self._counts: dict[str, dict[str, int]] = {}
        self._queued = 0
        self._epoch = 0  # bumped by a restart: loads in progress from before are lost
        self.stopping = threading.Event()  # the process is shutting down: every wait gives up
        self._reaper_wake = threading.Event()
        self._reaper: threading.Thread | None = None

    # ----------------------------------------------------------------------------- lifecycle

    def start(self, preload: Iterable[tuple[str, str]] = ()) -> Scheduler:
        """Apply the preloads (ValueError: nothing started), then run the expiry thread."""
        self.stopping.clear()
        self.apply_preload(preload)
        self._reaper = threading.Thread(target=self._reap_loop, name="sim-reaper", daemon=True)
        self._reaper.start()
        return self

    def stop(self) -> None:
        """Wake every wait (loads, evictions, /api/ps stalls) with 'server shutting down'; stop the thread."""
        self.stopping.set()
        self._reaper_wake.set()
        with self._changed:
            self._changed.notify_all()
        if self._reaper is not None:
            self._reaper.join(timeout=2)
            self._reaper = None

    def __enter__(self) -> Scheduler:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ----------------------------------------------------------------------------- memory

    @property
    def vram_gb(self) -> float:
        return self._vram_gb

    @vram_gb.setter
    def vram_gb(self, value: float) -> None:
        """Change the GPU (0 = lost, e.g. after suspend/resume); loaded runners keep what they hold."""
        with self._lock:
            self._vram_gb = float(value)

    @property
    def vram_bytes(self) -> int:
        return int(self._vram_gb * GiB)

    @property
    def ram_bytes(self) -> int:
        return int(self.ram_gb * GiB)

    @property
    def gpu_found(self) -> bool:
        """Whether this Ollama process discovered the GPU when it started (only a restart changes it)."""
        return self._gpu_found

    @property
    def discovered_vram_bytes(self) -> int:
        """Total VRAM this process found at start: what the default context tier is computed from."""
        return self.vram_bytes if self._gpu_found else 0

    @property
    def external_vram_gb(self) -> float:
        """VRAM held by other programs (a training job, a desktop): never in /api/ps."""
        return self._external_vram_gb

    @external_vram_gb.setter
    def external_vram_gb(self, value: float) -> None:
        """Takes effect for the next placement; loaded models stay where they are."""
        with self._changed:
            self._external_vram_gb = max(0.0, float(value))
            self._changed.notify_all()

    @property
    def load_seconds_per_gb(self) -> float:
        return self._load_seconds_per_gb

    @load_seconds_per_gb.setter
    def load_seconds_per_gb(self, value: float) -> None:
        """Takes effect at once, also for a load in progress."""
        with self._changed:
            self._load_seconds_per_gb = value
            self._changed.notify_all()

    def _gpu_usable(self) -> bool:
        """A GPU list for the next load: discovered at start and not lost since. Lock held."""
        return self._gpu_found and self.vram_bytes > 0

    def _real_free_vram(self, exclude: str = "") -> int:
        """What the driver reports free: VRAM - other programs - every runner's size_vram + overhead."""
        held = sum(r.held_vram for r in self._runners.values() if r.spec.name != exclude)
        return max(0, self.vram_bytes - int(self._external_vram_gb * GiB) - held)

    def driver_memory(self) -> tuple[int, int]:
        """(total, used) bytes of the GPU as the driver shows them to nvidia-smi, NVML and GPU exporters:
        the physical GPU (there even when this Ollama process did not discover it; 0 once it is lost),
        used by other programs and by every runner (size_vram plus its CUDA context)."""
        with self._lock:
            total = self.vram_bytes
            held = int(self._external_vram_gb * GiB) + sum(r.held_vram for r in self._runners.values())
        return total, min(total, held)

    def _scheduler_free_vram(self, exclude: str = "") -> int:
        """sched.go:1295-1336 updateFreeSpace + llama_server.go:2600-2634: the smaller of Ollama's own
        bookkeeping (total - Σ size_vram) and the driver's figure ("Take the minimum - never optimistic")."""
        booked = sum(r.size_vram for r in self._runners.values() if r.spec.name != exclude)
        return min(max(0, self.vram_bytes - booked), self._real_free_vram(exclude))

    # ----------------------------------------------------------------------------- introspection

    def lookup(self, model: str) -> ModelSpec | None:
        """Installed model by canonical or short name, case-insensitively (like Ollama's manifest lookup)."""
        wanted = canonical_name(model).lower()
        for name, spec in self.installed.items():
            if name.lower() == wanted:
                return spec
        return None

    def counts(self, model: str) -> dict[str, int]:
        """{"loads": n, "unloads": n} for one model (canonical or short name); a reload is one of each."""
        spec = self.lookup(model)
        name = spec.name if spec else canonical_name(model)
        with self._lock:
            return dict(self._counts.get(name, {"loads": 0, "unloads": 0}))

    def loaded(self) -> list[dict]:
        """The runners as the scheduler sees them (including ones that are still stopping)."""
        with self._lock:
            return [
                {
                    "name": r.spec.name,
                    "size": r.size,
                    "size_vram": r.size_vram,
                    "held_vram": r.held_vram,  # what the GPU really holds for it: + RUNNER_VRAM_OVERHEAD
                    "num_gpu": r.num_gpu,
                    "keep_alive": math.inf if r.keep_alive_ns == FOREVER_NS else r.keep_alive_ns / 1e9,
                    "expires_at": r.expires_at_ns / 1e9,
                    "context_length": r.num_ctx,
                    "stopping": r.stop_at is not None,
                    "in_flight": r.ref_count,
                    "computing": r.computing,
                    "waiting": r.waiting,
                }
                for r in self._runners.values()
            ]

    @property
    def queued(self) -> int:
        """Requests waiting for the load slot (the pending queue Ollama caps at OLLAMA_MAX_QUEUE)."""
        with self._lock:
            return self._queued

    def ps_runners(self) -> list[Runner]:
        """Copies of the runners /api/ps lists, sorted by expires_at descending at 1-second resolution.

        With ps_stall_seconds > 0 it waits while a runner unloads: processCompleted holds the runner's
        refMu through the unload and the VRAM-recovery wait (sched.go:416-463) and loadedModels takes
        every refMu (sched.go:1757); the reply then no longer lists that runner.
        """
        with self._changed:
            while self.ps_stall_seconds > 0 and not self.stopping.is_set() and self._unloading_locked():
                self._changed.wait(timeout=0.05)
            runners = sorted(self._runners.values(), key=lambda r: r.expires_at_ns // 10**9, reverse=True)
            return [dataclasses.replace(r) for r in runners]

    def ps_key(self) -> tuple | None:
        """Everything /api/ps shows, in order, as a value that changes whenever the reply would (the
        node caches the serialized reply under it); None while the reply would wait (see ps_runners)."""
        with self._lock:
            if self.ps_stall_seconds > 0 and self._unloading_locked():
                return None
            return tuple(
                (r.spec.name, r.size, r.size_vram, r.expires_at_ns, r.num_ctx) for r in self._runners.values()
            )

    def _unloading_locked(self) -> bool:
        return any(r.stop_at is not None and r.ref_count == 0 for r in self._runners.values())

    def _count(self, name: str, kind: str) -> None:
        self._counts.setdefault(name, {"loads": 0, "unloads": 0})[kind] += 1

    # ----------------------------------------------------------------------------- options

    def _resolve_ctx(self, spec: ModelSpec, opts: dict) -> int:
        """num_ctx: explicit, else the automatic one (VRAM-based default, or lowered by an OOM retry),
        clamped to the trained context."""
        return max(1, min(self._requested_ctx(opts), spec.context_length))

    def _requested_ctx(self, opts: dict) -> int:
        """opts.NumCtx before the clamp to the trained context (routes.go:132 defaultNumCtx)."""
        return opts.get("num_ctx") or opts.get("_auto_ctx") or self.default_num_ctx

    def _resolve_batch(self, spec: ModelSpec, opts: dict) -> int:
        """num_batch: explicit, else 512 for completion models; for embedding models min(2048, the
        REQUESTED num_ctx), unclamped (routes.go:151 WithDefaultEmbeddingNumBatch; llama_server.go:92-103)."""
        if opts.get("num_batch"):
            return opts["num_batch"]
        return min(2048, self._requested_ctx(opts)) if spec.embedding_only else 512

    def needs_reload(self, runner: Runner, opts: dict) -> bool:
        """sched.go:1381-1432 needsReload over the api.Runner fields; sampling options never reload.

        A new num_gpu < 0 (or absent) equals anything; num_ctx counts as equal when both the loaded and the
        new value are automatic, num_batch too except for embedding models, whose batch is never automatic
        (routes.go:217) and is compared literally. MLX models skip the comparison entirely (:1425).
        """
        if runner.spec.mlx:
            return False
        new_gpu = opts.get("num_gpu", -1)
        gpu_differs = new_gpu >= 0 and new_gpu != runner.num_gpu
        ctx_auto = opts.get("num_ctx") is None and runner.num_ctx_explicit is None
        ctx_differs = not ctx_auto and self._resolve_ctx(runner.spec, opts) != runner.num_ctx
        if runner.spec.embedding_only:
            batch_differs = self._resolve_batch(runner.spec, opts) != runner.num_batch
        else:
            batch_auto = opts.get("num_batch") is None and runner.num_batch_explicit is None
            new_batch, old_batch = opts.get("num_batch") or 512, runner.num_batch_explicit or 512
            batch_differs = not batch_auto and new_batch != old_batch
        return (
            gpu_differs
            or ctx_differs
            or batch_differs
            or opts.get("main_gpu") != runner.main_gpu
            or opts.get("use_mmap") != runner.use_mmap
            or opts.get("num_thread", 0) != runner.num_thread
        )

    def _new_runner(self, spec: ModelSpec, opts: dict, keep_alive_ns: int | None, place: Placement) -> Runner:
        keep = self.keep_alive_default_ns if keep_alive_ns is None else keep_alive_ns
        return Runner(
            spec=spec,
            size=place.size,
            size_vram=place.size_vram,
            num_gpu=opts.get("num_gpu", -1) if opts.get("num_gpu", -1) >= 0 else -1,
            num_ctx=self._resolve_ctx(spec, opts),
            num_ctx_explicit=opts.get("num_ctx"),
            num_batch_explicit=opts.get("num_batch"),
            num_batch=self._resolve_batch(spec, opts),
            main_gpu=opts.get("main_gpu"),
            use_mmap=opts.get("use_mmap"),
            num_thread=opts.get("num_thread", 0),
            keep_alive_ns=keep,
            expires_at_ns=expiry_ns(time.time_ns(), keep),
            held_vram=place.held_vram,
        )

    # ----------------------------------------------------------------------------- scheduling

    def _try_use(self, spec: ModelSpec, opts: dict, keep_alive_ns: int | None) -> Runner | None:
        """Fast path (getRunner, >= 0.11.5): a loaded runner needing no reload is used at once. Lock held."""
        runner = self._runners.get(spec.name)
        if runner is None or runner.stop_at is not None or self.needs_reload(runner, opts):
            return None
        if keep_alive_ns is not None:
            runner.keep_alive_ns = keep_alive_ns
        runner.ref_count += 1
        return runner

    def schedule(
        self,
        spec: ModelSpec,
        opts: dict,
        keep_alive_ns: int | None,
        count: bool = True,
        load_delay: bool = True,
    ) -> Runner:
        """Get a runner for this request (ref_count taken), loading/evicting like processPending.

        A loaded runner that needs no reload is used at once (getRunner fast path); anything else waits
        in the pending queue (503 when `max_queue` requests already wait) for the single load slot.
        The model's Modelfile options come first, then the request's (routes.go:141-146).
        Every runner returned must be given back with release().
        """
        opts = {**dict(spec.options), **opts}
        with self._lock:
            runner = self._try_use(spec, opts, keep_alive_ns)
            if runner is not None:
                return runner
            if self._queued >= self.max_queue:
                raise ApiError(503, BUSY_TEXT)
            self._queued += 1
        try:
            self._load_mutex.acquire()
        finally:
            with self._lock:
                self._queued -= 1
        try:
            self.loading = spec.name
            return self._process_pending(spec, opts, keep_alive_ns, count, load_delay)
        finally:
            self.loading = None
            self._load_mutex.release()

    def _process_pending(
        self, spec: ModelSpec, opts: dict, keep_alive_ns: int | None, count: bool, load_delay: bool
    ) -> Runner:
        """The scheduler loop for one request, with the load slot held: reload, evict, place, load."""
        retried_after_oom = False
        while True:
            if self.stopping.is_set():
                raise ApiError(500, SHUTTING_DOWN)
            with self._lock:
                runner = self._try_use(spec, opts, keep_alive_ns)
                if runner is not None:
                    return runner
                current = self._runners.get(spec.name)
                epoch = self._epoch
            if current is not None:  # needs a reload (or is stopping): the old instance goes first
                self._unload_and_wait([current])
                continue
            try:
                with self._lock:
                    place = self.plan(spec, opts)
            except _NeedsEviction:
                self._unload_and_wait(self.victims(spec.name, evict_all=False))
                continue
            except _Killed:
                raise ApiError(500, KILLED) from None
            except _OutOfMemory:
                retry_opts = None if retried_after_oom else self._opts_for_oom_retry(spec, opts)
                if retry_opts is None:
                    raise ApiError(500, self._oom_text(spec, opts)) from None
                retried_after_oom, opts = True, retry_opts
                self._unload_and_wait(self.victims(spec.name, evict_all=True))
                continue
            return self._load(spec, opts, keep_alive_ns, place, epoch, count, load_delay)

    def _opts_for_oom_retry(self, spec: ModelSpec, opts: dict) -> dict | None:
        """Ollama retries a load that ran out of memory once: with every other model evicted and, if the
        context was automatic, a smaller one (> 32768 -> 32768, > 4096 -> 4096). None = nothing to try."""
        with self._lock:
            others = any(r.spec.name != spec.name for r in self._runners.values())
        num_ctx = self._resolve_ctx(spec, opts)
        smaller = 32768 if num_ctx > 32768 else 4096 if num_ctx > 4096 else None
        if opts.get("num_ctx") is None and smaller is not None:
            return {**opts, "_auto_ctx": smaller}
        return dict(opts) if others else None

    def plan(self, spec: ModelSpec, opts: dict) -> Placement:
        """Era C placement for a model not loaded yet (era A differences noted). Lock held.

        Raises _NeedsEviction (pre-flight: evict one victim), _OutOfMemory (the load itself would fail)
        or _Killed (a CPU load larger than RAM).
        """
        others = [r for r in self._runners.values() if r.spec.name != spec.name]
        max_loaded = self.max_loaded or 3  # 3 x max(#GPUs, 1); a GPU node has one GPU here
        if len([r for r in others if r.stop_at is None]) >= max_loaded:
            raise _NeedsEviction()
        num_ctx = self._resolve_ctx(spec, opts)
        batch = self._resolve_batch(spec, opts)
        size = spec.loaded_size(num_ctx, batch)
        num_gpu = opts.get("num_gpu", -1)
        gpu = self._gpu_usable() and num_gpu != 0  # sched.go:272-273: num_gpu 0 -> empty GPU list
        if spec.mlx:  # no pre-flight (sched.go:528); x/mlxrunner/client.go:485-488 reports size == size_vram
            return Placement(size, size, size + RUNNER_VRAM_OVERHEAD if gpu else 0)
        if not gpu:
            # No GPU backend: no memory check (sched.go:547 needs GPUs), mmap off (sched.go:1162), so the
            # whole model is read into RAM; the kernel kills a llama-server larger than RAM
            if size > self.ram_bytes:
                raise _Killed()
            return Placement(size, 0)
        per_layer = size / spec.layers
        real_free = self._real_free_vram(spec.name)
        sched_free = self._scheduler_free_vram(spec.name)
        predicted = spec.predicted_vram(num_ctx, batch)
        partial = 0 < num_gpu < spec.layers  # explicitPartialGPUOffload skips the pre-flight (sched.go:790)
        if others and not partial and predicted > FIT_FRACTION * sched_free:
            raise _NeedsEviction()  # sched.go:547-562: the 80% pre-flight, for forced and automatic loads
        if num_gpu > 0:
            if self.era_a and self._era_a_layers_fit(spec, size, real_free) == 0:
                return Placement(size, 0)  # v0.12.10 llm/server.go:501-503: no layer fits -> CPU, silently
            size_vram = int(num_gpu * per_layer) if partial else size  # -ngl N: --fit leaves it alone
            if size_vram + RUNNER_VRAM_OVERHEAD > real_free:
                raise _OutOfMemory()
            return Placement(size, size_vram, size_vram + RUNNER_VRAM_OVERHEAD)
        # automatic: llama.cpp --fit places what fits against real free memory, keeping FIT_TARGET free
        layers = min(spec.layers, int(max(0, real_free - RUNNER_VRAM_OVERHEAD - FIT_TARGET) // per_layer))
        size_vram = size if layers == spec.layers else int(layers * per_layer)
        return Placement(size, size_vram, size_vram + RUNNER_VRAM_OVERHEAD if size_vram else 0)

    @staticmethod
    def _era_a_layers_fit(spec: ModelSpec, size: int, free: int) -> int:
        """v0.12.10 llm/memory.go EstimateGPULayers: a GPU takes layers only if it can hold the graph, the
        minimum memory and two layers (:285); then the estimate counts what fits (:323-340)."""
        per_layer = size / spec.layers
        graph = min(256 * MiB, spec.file_size // 2)
        room = free - graph - ERA_A_MINIMUM_MEMORY
        if room < 2 * per_layer:
            return 0
        return min(spec.layers, int(room // per_layer))

    def _oom_text(self, spec: ModelSpec, opts: dict) -> str:
        num_ctx = self._resolve_ctx(spec, opts)
        size = spec.loaded_size(num_ctx, self._resolve_batch(spec, opts))
        return (
            "llama-server process has terminated: error: ggml_backend_cuda_buffer_type_alloc_buffer: "
            f"allocating {size / MiB:.2f} MiB on device 0: cudaMalloc failed: out of memory"
        )

    def victims(self, exclude: str, evict_all: bool) -> list[Runner]:
        """findRunnerToUnload: ByDurationAndName (keep_alive ascending, then blob), the first idle one."""
        with self._lock:
            candidates = sorted(
                (r for r in self._runners.values() if r.spec.name != exclude),
                key=lambda r: (r.keep_alive_ns, r.spec.blob),
            )
        if evict_all or not candidates:
            return candidates
        idle = [r for r in candidates if r.ref_count == 0]
        return [(idle or candidates)[0]]

    def _unload_and_wait(self, runners: list[Runner]) -> None:
        """Expire runners and wait until they are gone (in-flight requests finish first)."""
        with self._lock:
            for runner in runners:
                self._expire_locked(runner)
        self._reaper_wake.set()
        with self._changed:
            while any(self._runners.get(r.spec.name) is r for r in runners):
                if self.stopping.is_set():
                    raise ApiError(500, SHUTTING_DOWN)
                self._changed.wait(timeout=0.1)

    def _expire_locked(self, runner: Runner) -> None:
        """expireRunner: expires_at = now; the process is closed unload_seconds later (async)."""
        if runner.stop_at is None:
            runner.stop_at = time.monotonic() + self.unload_seconds
            runner.expires_at_ns = time.time_ns()

    def _load(
        self,
        spec: ModelSpec,
        opts: dict,
        keep_alive_ns: int | None,
        place: Placement,
        epoch: int,
        count: bool,
        load_delay: bool,
    ) -> Runner:
        """Start the runner: wait the load time (lock released), then list it (era C: only once healthy)."""
        if load_delay:
            self._wait_load_time(place.size)
        runner = self._new_runner(spec, opts, keep_alive_ns, place)
        runner.ref_count = 1
        with self._lock:
            if epoch != self._epoch:
                raise ApiError(500, KILLED)
            self._runners[spec.name] = runner
            if count:
                self._count(spec.name, "loads")
            self._changed.notify_all()
        return runner

    def _wait_load_time(self, size: int) -> None:
        """Wait load_seconds_per_gb x size without the lock; re-read when the setting changes, so a test
        or the demo can hold a load in progress and then let it finish."""
        started = time.monotonic()
        with self._changed:
            while (remaining := started + self.load_seconds_per_gb * size / GiB - time.monotonic()) > 0:
                if self.stopping.is_set():
                    raise ApiError(500, SHUTTING_DOWN)
                self._changed.wait(timeout=remaining)

    def release(self, runner: Runner) -> None:
        """A request finished: the keep_alive timer starts now (keep_alive 0 -> unload when idle)."""
        with self._lock:
            runner.ref_count = max(0, runner.ref_count - 1)
            if runner.ref_count == 0 and runner.stop_at is None:
                runner.expires_at_ns = expiry_ns(time.time_ns(), runner.keep_alive_ns)
        self._reaper_wake.set()

    def unload(self, spec: ModelSpec) -> None:
        """The keep_alive 0 request: expire the runner if loaded; removal is asynchronous."""
        with self._lock:
            runner = self._runners.get(spec.name)
            if runner is not None:
                self._expire_locked(runner)
        self._reaper_wake.set()

    @contextlib.contextmanager
    def computing(self, runner: Runner) -> Iterator[None]:
        """Hold one of the runner's compute slots (OLLAMA_NUM_PARALLEL=1): one request computes at a time,
        the others wait their turn; `loaded()` shows both counts."""
        self._count_compute(runner, waiting=+1)
        with runner.slots:
            self._count_compute(runner, waiting=-1, computing=+1)
            try:
                yield
            finally:
                self._count_compute(runner, computing=-1)

    def _count_compute(self, runner: Runner, waiting: int = 0, computing: int = 0) -> None:
        with self._lock:
            runner.waiting += waiting
            runner.computing += computing

    # ----------------------------------------------------------------------------- expiry

    def _reap_loop(self) -> None:
        """Background timer: expire idle runners past expires_at, remove stopping runners when due."""
        while not self.stopping.is_set():
            self._reaper_wake.clear()
            next_wake = self.reap_once()
            self._reaper_wake.wait(timeout=max(0.001, min(next_wake, REAPER_MAX_WAIT)))

    def reap_once(self, now_ns: int | None = None, now_mono: float | None = None) -> float:
        """One pass of the expiry thread at the given moment (default: now); returns seconds to the next.

        An idle runner past expires_at starts stopping; a stopping idle runner is removed once
        unload_seconds (and ps_stall_seconds) have passed. Tests may pass the clocks to step through time.
        """
        now_ns = time.time_ns() if now_ns is None else now_ns
        now_mono = time.monotonic() if now_mono is None else now_mono
        next_wake = REAPER_MAX_WAIT
        with self._lock:
            for name, runner in list(self._runners.items()):
                if runner.stop_at is None and runner.ref_count == 0 and runner.expires_at_ns <= now_ns:
                    self._expire_locked(runner)
                if runner.stop_at is None:
                    if runner.ref_count == 0:
                        next_wake = min(next_wake, (runner.expires_at_ns - now_ns) / 1e9)
                elif runner.ref_count == 0 and now_mono >= runner.stop_at + self.ps_stall_seconds:
                    del self._runners[name]  # with ps_stall_seconds: after the VRAM-recovery wait
                    self._count(name, "unloads")
                    self._changed.notify_all()
                else:
                    due = runner.stop_at + self.ps_stall_seconds - now_mono
                    next_wake = min(next_wake, max(0.001, due))
        return next_wake

    # ----------------------------------------------------------------------------- restart

    def kill_runners(self) -> None:
        """SIGTERM: every runner dies with the process (routes.go:2023-2028 unloadAllRunners) and the new
        process starts with an empty map (sched.go:97); loads in progress are lost. Counts are kept."""
        with self._lock:
            self._runners.clear()
            self._epoch += 1
            self._changed.notify_all()

    def rediscover(self, gpu_found: bool = True) -> None:
        """The new process discovers the GPU again (discover/runner.go:45,265); the default context follows
        the VRAM found now (routes.go:2043-2057)."""
        with self._lock:
            self._gpu_found = bool(gpu_found)
            self.default_num_ctx = default_num_ctx(self.discovered_vram_bytes)
        self._reaper_wake.set()

    def restart(self, gpu_found: bool = True) -> None:
        """A restart with no downtime: kill_runners() then rediscover()."""
        self.kill_runners()
        self.rediscover(gpu_found)

    # ----------------------------------------------------------------------------- preload

    def apply_preload(self, preload: Iterable[tuple[str, str]]) -> None:
        """Preloads, each made by a real sequence of events (counted as neither loads nor unloads):

        auto       an automatic load (no options);
        gpu        an automatic load that must land fully on the GPU, else ValueError;
        forced-cpu a client loaded it with num_gpu 0;
        cpu        it fell back to RAM by automatic placement: loaded while another program held all the
                   VRAM, which then went back to `external_vram_gb`. On a GPU node Ollama's pre-flight
                   would evict one such model to load the next (sched.go:547), so only one is possible;
                   they load first, before the others.
        """
        placements = []
        for model, where in preload:
            spec = self.lookup(model)
            if spec is None:
                raise ValueError(f"preload: {model!r} is not installed")
            if where not in ("auto", "gpu", "cpu", "forced-cpu"):
                raise ValueError(f"preload placement must be auto|gpu|cpu|forced-cpu, not {where!r}")
            placements.append((spec, where))
        fell_back = [spec for spec, where in placements if where == "cpu"]
        if len(fell_back) > 1 and self._gpu_usable():
            names = ", ".join(spec.name for spec in fell_back)
            raise ValueError(
                f"preload: {names}: only one model can have fallen back to RAM automatically on a GPU node "
                "(loading the next one would evict it); use forced-cpu for the others"
            )
        for spec in fell_back:
            configured = self._external_vram_gb
            self._external_vram_gb = self._vram_gb if self._gpu_usable() else configured
            try:
                self._preload_one(spec, {})
            finally:
                self._external_vram_gb = configured
        for spec, where in placements:
            if where == "cpu":
                continue
            runner = self._preload_one(spec, {"num_gpu": 0} if where == "forced-cpu" else {})
            if where == "gpu" and not (runner.size_vram == runner.size > 0):
                with self._lock:
                    self._runners.pop(spec.name, None)
                size = runner.size / GiB
                raise ValueError(f"preload: {spec.name} ({size:.1f} GiB) does not fit on the GPU")

    def _preload_one(self, spec: ModelSpec, opts: dict) -> Runner:
        try:
            runner = self.schedule(spec, opts, None, count=False, load_delay=False)
        except ApiError as err:
            raise ValueError(f"preload: {spec.name}: {err.message}") from None
        self.release(runner)
        return runner


def resolve_installed(models: Iterable[str] | None) -> dict[str, ModelSpec]:
    """The installed models by canonical name (None = DEFAULT_MODELS); ValueError for an unknown one."""
    if models is None:
        return {name: CATALOG[name] for name in DEFAULT_MODELS}
    installed = {}
    for model in models:
        name = canonical_name(model)
        if name not in CATALOG:
            raise ValueError(f"unknown model {model!r}; known: {', '.join(CATALOG)}")
        installed[name] = CATALOG[name]
    return installed
