"""OllamaLoadBalancer: the public API of the core (the product spec's facade).

It keeps one `NodeAgent` per node (flockparse/agent.py: the node's state, its ordered status replies and its
move lane), a health monitor that checks every node concurrently, request routing with fail-over,
cluster-wide force-GPU/force-CPU, and owns the `GPUOptimizer`. It never prints: everything it has to say
is an `Event`, and after `close()` it says nothing and sends nothing.

Locking rule: `self._lock` guards the registry of agents and nothing else; no network call runs under it.
"""

from __future__ import annotations

import dataclasses
import functools
import heapq
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future, wait
from typing import Any

from flockparse import gpu_state as gs
from flockparse import routing as routes
from flockparse.agent import OPTIMIZER_PRIORITY, USER_PRIORITY, Folded, NodeAgent, NodeState, run_daemon
from flockparse.events import Event, EventBus
from flockparse.gpu_metrics import (
    GpuMemory,
    GpuMetricsScraper,
    HeldOffTracker,
    kept_off_by_others,
    vram_fields,
)
from flockparse.gpu_metrics.scraper import SCRAPE_INTERVAL_S
from flockparse.limits import FdBudget, fd_budget, relax_gc
from flockparse.optimizer import GPUOptimizer
from flockparse.request_stats import RequestStats, Sample, eval_metrics
from flockparse.results import MoveResult, Reason, skipped
from flockparse.room import NO_FIT, Fit, VramBounds, fit, no_fit_text
from flockparse.rules import (
    LOCATION_CPU,
    LOCATION_GPU,
    canonical_name,
    matches_priority,
    model_key,
    normalize_url,
    same_model,
)
from flockparse.stats import ClusterStats
from flockparse.workers import ElasticPool
from gpu_controller import DEFAULT_ESTIMATE_CTX, GPUController, NodeError

__all__ = ["AllNodesFailedError", "NodeState", "OllamaLoadBalancer", "RequestRejectedError"]

OOM_REMEMBERED_S = 600.0  # a load to GPU that ran out of memory alone: force_gpu refuses it again this long
MIN_USUAL_CONTEXT = 2048  # contexts below this are embedding models' own: not what a chat model gets

logger = logging.getLogger(__name__)

DEFAULT_PRIORITY_MODELS = ["mxbai-embed-large", "llama3.1"]
OFFLINE_RECHECK_SECONDS = 1.0  # an offline node is re-checked this often (a refused connect is cheap)
REPORT_SLACK_S = 1.0  # a report waits a node's timeout plus this from when its read was sent
REPORT_QUEUE_CAP = 3  # ... and never more than this many timeouts in all (reads queued behind thousands)
GOLDEN_RATIO_FRACTION = 0.6180339887498949  # spreads the nodes' check phases evenly, whatever their count
CHECK_MAX_WAIT_S = 0.25  # a due health check waits at most about this for a checker before one is added
CHECK_BATCH_S = 0.05  # checks due this soon go with those due now: one wake-up for a batch, not one each
READ_MAX_WAIT_S = 0.05  # ... and a report's read (it has the node's timeout plus REPORT_SLACK_S in all)
ROUTE_VIEW_TTL_S = 0.25  # routing reuses the nodes' snapshots this long (requests in flight are live)


class AllNodesFailedError(RuntimeError):
    """No node could serve a routed request; `errors` lists (node, reason) for every node tried."""

    def __init__(self, model: str, errors: list[tuple[str, str]]) -> None:
        self.model = model
        self.errors = errors
        tried = "; ".join(f"{node}: {reason}" for node, reason in errors) or "no node is online"
        super().__init__(f"no node could serve {model}: {tried}")


class RequestRejectedError(RuntimeError):
    """The node answered with a client error (4xx other than 404): another node would say the same."""

    def __init__(self, node: str, status_code: int, message: str) -> None:
        self.node = node
        self.status_code = status_code
        super().__init__(f"{node} rejected the request ({status_code}): {message}")


class OllamaLoadBalancer:
    """Nodes, health, routing, cluster-wide placement and the background GPU optimizer."""

    def __init__(
        self,
        nodes: Iterable[str] = (),
        auto_optimize_gpu: bool = True,
        gpu_priority_models: list[str] | None = None,
        check_interval: float = 300,
        health_interval: float = 5.0,
        gpu_capability: dict[str, bool] | None = None,
        keep_alive: str | int | float | None = None,
        controller: GPUController | None = None,
        start: bool = True,
        request_timeout: float = 300.0,
        on_gpu_lost: str | None = None,
        remedy_timeout: float = gs.REMEDY_TIMEOUT_S,
        gpu_metrics: Mapping[str, str] | None = None,
        gpu_metrics_interval: float = SCRAPE_INTERVAL_S,
        routing: str = routes.DEFAULT_STRATEGY,
        evict_to: str = "unload",
    ) -> None:
        self.events = EventBus()
        self.evict_to = check_evict_to(evict_to)  # how the optimizer makes room: "unload" or "cpu"
        self.stats = ClusterStats()  # passes, moves, request latencies: for metrics (flockparse/metrics.py)
        self.events.subscribe(self.stats.on_event)
        self._routing = routes.check_strategy(routing)  # how pick_node chooses (flockparse/routing.py)
        self._turn = 0  # round robin's position; guarded by _turn_lock
        self._turn_lock = threading.Lock()
        self.request_stats = RequestStats()  # latency/TTFT/token-rate rings and cool-downs, per node
        self._route_views: tuple[float, list[routes.NodeView]] = (float("-inf"), [])  # (when, views)
        self.controller = controller if controller is not None else GPUController(keep_alive=keep_alive)
        self.gpu_priority_models: list[str] = list(
            DEFAULT_PRIORITY_MODELS if gpu_priority_models is None else gpu_priority_models
        )
        self.health_interval = float(health_interval)
        self.request_timeout = float(request_timeout)
        self.on_gpu_lost = on_gpu_lost  # the operator's remedy command; off by default
        self.remedy_timeout = float(remedy_timeout)
        self._lock = threading.Lock()  # guards _agents; never held during I/O
        self._agents: dict[str, NodeAgent] = {}
        self._closed = threading.Event()
        self._monitor_stop = threading.Event()
        self._monitor_thread: threading.Thread | None = None
        # Health checks run on a few checker threads that grow past hung nodes (flockparse/workers.py), not a
        # thread per check; reports read on a pool of their own, never queued behind the monitor's checks.
        self._check_pool = ElasticPool("lb-check", max_wait=CHECK_MAX_WAIT_S, idle_seconds=10.0)
        self._read_pool = ElasticPool("lb-read", max_wait=READ_MAX_WAIT_S, idle_seconds=10.0)
        self._pass_pool = ElasticPool("lb-pass", max_wait=CHECK_MAX_WAIT_S, idle_seconds=10.0)
        self._due_lock = threading.Lock()  # guards _due and _due_heap (the monitor's schedule); no I/O
        self._due: dict[str, float] = {}  # node -> time.monotonic() its next health check is due
        self._due_heap: list[tuple[float, str]] = []  # (due, node); entries not matching _due are stale
        self._phased: set[str] = set()  # nodes whose checks are spread over the interval (see _take_due)
        self._monitor_wake = threading.Event()
        self.fd_budget: FdBudget | None = None  # the descriptor limit judged at start (flockparse/limits.py)
        self._optimizer = GPUOptimizer(self, interval=check_interval)
        self._auto_optimize_gpu = bool(auto_optimize_gpu)
        self._started = False
        declared = {normalize_url(url): gpu for url, gpu in (gpu_capability or {}).items()}
        for url in dict.fromkeys(normalize_url(u) for u in nodes):
            self.add_node(url, has_gpu=declared.get(url))
        # each node's GPU exporter (optional), scraped on threads of its own (flockparse/gpu_metrics)
        self.gpu_metrics = GpuMetricsScraper(
            timeout=float(getattr(self.controller, "timeout", 5.0)),
            interval=gpu_metrics_interval,
            on_scrape=self._on_gpu_memory,
            emit=self.events.emit,
        )
        self._held_off = HeldOffTracker()
        # each node's models when its exporter was last read: the report pairs figures taken together
        self._models_at_scrape: dict[str, list[dict]] = {}  # guarded by _lock
        self._rescrape: set[str] = set()  # nodes scraped again after their models changed; guarded by _lock
        self.events.subscribe(self._scrape_after_change)
        for url, exporter in (gpu_metrics or {}).items():
            self.set_gpu_exporter(url, exporter)
        if start:
            self.start()

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Start the health monitor and, if `auto_optimize_gpu`, the optimizer (`__init__` does it)."""
        if self._started or self._closed.is_set():
            return
        self._started = True
        self._check_fd_budget()
        relax_gc(len(self.nodes))  # a large cluster's passes would otherwise set off full collections
        if self._auto_optimize_gpu:  # first, so that it hears the node_up of the first health checks
            self._start_gpu_optimization()
        self._monitor_stop.clear()
        self._monitor_thread = threading.Thread(target=self._monitor_loop, name="lb-health", daemon=True)
        self._monitor_thread.start()
        self.gpu_metrics.start()

    def close(self) -> None:
        """Stop everything within a second: no event is delivered and no request is sent afterwards.

        Moves in flight are cancelled (a load already sent finishes on the node; its daemon thread never
        holds the interpreter at exit). Safe to call twice.
        """
        if self._closed.is_set():
            return
        self._closed.set()
        self.events.close()
        self.controller.shutdown()
        self._optimizer.stop()
        self._monitor_stop.set()
        self._monitor_wake.set()
        self._check_pool.close()
        self._read_pool.close()
        self._pass_pool.close()
        self.gpu_metrics.close()
        with self._lock:
            agents = list(self._agents.values())
        for agent in agents:
            agent.close()
        if self._monitor_thread is not None:
            self._monitor_thread.join(1.0)

    def __enter__(self) -> OllamaLoadBalancer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ------------------------------------------------------------------ optimizer facade
    @property
    def auto_optimize_gpu(self) -> bool:
        return self._auto_optimize_gpu

    @auto_optimize_gpu.setter
    def auto_optimize_gpu(self, enabled: bool) -> None:
        """Setting it really switches the optimizer on or off (the old code only had a dead flag)."""
        self._auto_optimize_gpu = bool(enabled)
        if not self._started:
            return
        if enabled:
            self._start_gpu_optimization()
        else:
            self.stop_gpu_optimization()

    @property
    def optimization_running(self) -> bool:
        return self._optimizer.running

    @property
    def check_interval(self) -> float:
        return self._optimizer.interval

    @check_interval.setter
    def check_interval(self, seconds: float) -> None:
        self._optimizer.interval = seconds

    @property
    def optimizer(self) -> GPUOptimizer:
        return self._optimizer

    def _start_gpu_optimization(self) -> bool:
        """Start the background optimizer (a full pass runs at once); False if it was already running."""
        if self._closed.is_set():
            return False
        self._auto_optimize_gpu = True
        return self._optimizer.start()

    def _gpu_optimization_loop(self) -> None:
        """The product spec's name for the background loop: start it and block until it is stopped."""
        self._start_gpu_optimization()
        self._optimizer.join()

    def stop_gpu_optimization(self) -> bool:
        """Stop the optimizer within a second, also mid-wait or mid-pass; True if its thread ended."""
        self._auto_optimize_gpu = False
        return self._optimizer.stop()

    def optimize_gpu_once(self, cancel: threading.Event | None = None, dry_run: bool = False) -> list[dict]:
        """One pass now over all nodes (works with the optimizer off); returns the actions taken.

        Setting `cancel` (e.g. on Ctrl-C) stops waiting for the nodes and stops further moves. `dry_run`:
        the moves it would make, where and why (`would_move`, `would_probe`, skips), changing nothing.
        """
        if dry_run:
            return self._optimizer.plan_pass()
        return self._optimizer.run_pass(None, cancel=cancel or self._closed, load_absent=True, asked=True)

    def optimizer_status(self) -> dict:
        return self._optimizer.status()

    def run_node_task(self, work: Callable[[], Any]) -> Future:
        """Run one node's part of an optimizer pass on the pass pool (daemon threads that grow past hung
        nodes), instead of a new thread per node and pass."""
        return self._pass_pool.submit(work)

    def subscribe(self, callback: Callable[[Event], None]) -> Callable[[], None]:
        return self.events.subscribe(callback)

    # ------------------------------------------------------------------ nodes
    @property
    def nodes(self) -> list[str]:
        with self._lock:
            return list(self._agents)

    def _agent(self, url: str) -> NodeAgent | None:
        with self._lock:
            return self._agents.get(url)

    def _all_agents(self) -> list[NodeAgent]:
        with self._lock:
            return list(self._agents.values())

    def add_node(self, url: str, has_gpu: bool | None = None) -> NodeState:
        """Add a node at run time; it is checked at once and gets an optimizer pass when it answers."""
        node = normalize_url(url)
        with self._lock:
            if node in self._agents:
                raise ValueError(f"node already in the cluster: {node}")
            agent = NodeAgent(
                node, self.controller, has_gpu, self._closed, self.health_interval, self._check_pool.submit
            )
            self._agents[node] = agent
            count = len(self._agents)
        self._route_views = (float("-inf"), [])  # routing sees the new node at once
        self.events.emit(Event("node_added", node=node, message=f"added node {node}"))
        if self._started:
            self._schedule(node, time.monotonic())
            if self.fd_budget is not None and count == self.fd_budget.checkable_nodes + 1:
                self._check_fd_budget()  # the node that no longer fits: said once, when it is added
        return agent.snapshot()

    def remove_node(self, url: str) -> bool:
        """Forget a node (its pins and back-offs too); False if it was not in the cluster."""
        try:
            node = normalize_url(url)
        except ValueError:
            return False
        with self._lock:
            agent = self._agents.pop(node, None)
        if agent is None:
            return False
        with self._due_lock:
            self._due.pop(node, None)
            self._phased.discard(node)
        agent.close()
        self.controller.forget_node(node)
        self.request_stats.forget(node)
        self._route_views = (float("-inf"), [])
        self._optimizer.forget_node(node, keep_pins=False)
        self.gpu_metrics.set_exporter(node, None)
        with self._lock:
            self._models_at_scrape.pop(node, None)
        self._held_off.forget(node)
        self.events.emit(Event("node_removed", node=node, message=f"removed node {node}"))
        return True

    def node_state(self, url: str) -> NodeState | None:
        agent = self._agent(url)
        return agent.snapshot() if agent is not None else None

    def node_states(self) -> list[NodeState]:
        """A copy of every node's state, models included: for tables, not for counts (see `summary`)."""
        return [agent.snapshot() for agent in self._all_agents()]

    def summary(self) -> dict[str, int]:
        """Node counts for a toolbar or a status line, read without copying any node's state or models:
        {'total', 'online', 'offline', 'unchecked', 'gpu' (online with a GPU), 'gpu_lost', 'stale'}."""
        counts = {"total": 0, "online": 0, "offline": 0, "unchecked": 0, "gpu": 0, "gpu_lost": 0, "stale": 0}
        for agent in self._all_agents():
            online, has_gpu, gpu, stale = agent.counts()
            counts["total"] += 1
            counts["online" if online else "unchecked" if online is None else "offline"] += 1
            counts["gpu"] += bool(online and has_gpu)
            counts["gpu_lost"] += gpu == gs.GPU_LOST
            counts["stale"] += stale
        return counts

    # ------------------------------------------------------------------ descriptor budget
    def _check_fd_budget(self) -> None:
        """Raise the soft descriptor limit towards the hard one; when the cluster needs more than can be had,
        say so in one line (a `fd_limit` event and a log warning), with how many nodes can be checked."""
        self.fd_budget = budget = fd_budget(len(self.nodes))
        warning = budget.warning()
        if warning is None:
            return
        logger.warning("%s", warning)
        self.events.emit(Event("fd_limit", message=warning, data=dataclasses.asdict(budget)))

    # ------------------------------------------------------------------ health monitor
    def _monitor_loop(self) -> None:
        """Check every node now, then each every `health_interval` from its own last due time (a heap of due
        times, so 5,000 nodes cost nothing between checks); an offline node every second, so a node that
        comes back gets its optimizer pass quickly. Checks run on the checker pool: a slow node only
        delays itself."""
        now = time.monotonic()
        for url in self.nodes:
            self._schedule(url, now)
        while not self._monitor_stop.is_set():
            patterns = self._patterns()
            for agent in self._take_due(time.monotonic() + CHECK_BATCH_S):
                self._check(agent, patterns)
            self._monitor_wake.wait(self._seconds_to_next_due())
            self._monitor_wake.clear()

    def _schedule(self, url: str, due: float) -> None:
        """Move `url`'s next health check to `due` when that is sooner than planned (or none is planned)."""
        with self._due_lock:
            planned = self._due.get(url)
            if planned is not None and planned <= due:
                return
            self._due[url] = due
            heapq.heappush(self._due_heap, (due, url))
            soonest = self._due_heap[0][1] == url
        if soonest:
            self._monitor_wake.set()

    def _postpone(self, urls: list[str], due: float) -> None:
        """These nodes are being read now, and a read is recorded as a check (the same fold, up or down):
        their next monitor check moves to `due` instead of asking them twice in one health interval. A
        5,000-node pass then adds 5,000 reads, not 5,000 on top of the monitor's."""
        with self._due_lock:
            for url in urls:
                planned = self._due.get(url)
                if planned is not None and planned < due:
                    self._due[url] = due
                    heapq.heappush(self._due_heap, (due, url))

    def _take_due(self, now: float) -> list[NodeAgent]:
        """The agents due by `now`; each gets its next due time one interval on (fixed rate, no catch-up
        burst after a stall). A node's second check comes a fraction of an interval after its first (golden
        ratio steps), so the checks of nodes started together spread over the interval instead of coming
        as one burst of thousands every `health_interval`."""
        due: list[str] = []
        with self._due_lock:
            heap = self._due_heap
            while heap and heap[0][0] <= now:
                when, url = heapq.heappop(heap)
                if self._due.get(url) != when:
                    continue  # moved sooner, or removed
                if url not in self._phased:
                    self._phased.add(url)
                    step = (len(self._phased) * GOLDEN_RATIO_FRACTION) % 1.0
                    following = now + self.health_interval * (0.1 + 0.9 * step)
                else:
                    following = when + self.health_interval
                    following = following if following > now else now + self.health_interval
                self._due[url] = following
                heapq.heappush(heap, (following, url))
                due.append(url)
        with self._lock:
            return [agent for url in due if (agent := self._agents.get(url)) is not None]

    def _seconds_to_next_due(self) -> float:
        with self._due_lock:
            if not self._due_heap:
                return self.health_interval
            return max(0.0, min(self._due_heap[0][0] - time.monotonic(), self.health_interval))

    def _check(self, agent: NodeAgent, patterns: list[str] | None = None) -> None:
        """One monitor check of a node (at most one in flight per node); its result is acted on when in."""
        future = agent.check(self._patterns() if patterns is None else patterns)
        if future is not None:
            future.add_done_callback(lambda done: self._after_check(agent, done))

    def _after_check(self, agent: NodeAgent, done: Future) -> None:
        if done.cancelled():  # closing: the checker pool dropped it
            return
        try:
            folded = done.result()
        except Exception:  # the controller promises not to raise; never let the monitor die
            logger.exception("health check of %s failed", agent.url)
            return
        if agent.online is False and not self._closed.is_set():
            self._schedule(agent.url, time.monotonic() + OFFLINE_RECHECK_SECONDS)
        self._act_on(agent, folded, trigger=True)
        if agent.online and self.controller.has_pending_restores(agent.url) and not agent.lane.busy:
            agent.lane.submit(lambda stop: self._restore_pending(agent, stop), None, OPTIMIZER_PRIORITY)

    def _restore_pending(self, agent: NodeAgent, stop: threading.Event) -> dict:
        """A failed move could not put every model back (the node blipped): try again now it answers."""
        outcome = self.controller.restore_pending(agent.url, cancel=stop)
        if outcome["restored"]:
            names = ", ".join(outcome["restored"])
            message = f"reloaded {names} on {agent.url}: a failed move had left it unloaded"
            self.events.emit(Event("models_restored", node=agent.url, message=message, data=dict(outcome)))
        return outcome

    def _act_on(self, agent: NodeAgent, folded: Folded, trigger: bool) -> None:
        """Emit what a status reply changed; a fresh start drops back-offs; trigger a pass when needed.

        A node that comes up or restarted gets an immediate warm-up pass (even from a pass's own read);
        a priority model newly seen off GPU gets an immediate pass when `trigger` (the monitor's reads).
        """
        if folded.fresh_start:
            self._optimizer.forget_node(
                agent.url
            )  # fresh memory after a restart: old back-offs no longer apply
        self._emit_all(folded.events)
        if folded.warm_up or (trigger and folded.needs_pass):
            self._optimizer.trigger(agent.url, load_absent=folded.warm_up)

    def _patterns(self) -> list[str]:
        value = self.gpu_priority_models
        return [value] if isinstance(value, str) else [str(p) for p in value]

    def read_status(self, node: str, trigger: bool = False) -> dict:
        """Read a node's /api/ps now (on this thread) and record it, in order with every other reply."""
        agent = self._agent(node)
        if agent is None:
            return {"node_url": node, "models": [], "error": f"{node} is not in the cluster"}
        seq, sent_at, raw = agent.read_raw()
        folded, status = agent.fold(seq, sent_at, raw, self._patterns())
        self._after_read(agent, folded, status, trigger)
        return status

    def _after_read(self, agent: NodeAgent, folded: Folded, status: dict, trigger: bool) -> None:
        """What a read outside the monitor's checks leads to: a quick recheck of a node seen down, the
        version of a node seen coming up, and the optimizer's attention when something changed."""
        if "error" in status and self._started and not self._closed.is_set():
            self._schedule(agent.url, time.monotonic() + OFFLINE_RECHECK_SECONDS)  # seen down: recheck soon
        if folded.warm_up:  # it came up: the version says how far its /api/ps figures can be trusted
            agent.ensure_version()
        self._act_on(agent, folded, trigger=trigger)

    def read_statuses(self, nodes: Iterable[str]) -> dict[str, Future]:
        """Read every given node's /api/ps now, all at once through the status poller: a Future of each
        node's status dict (as `read_status`), done within the controller's timeout. An unchanged reply
        costs no parsing and no thread; a changed one is parsed and recorded on a reader worker."""
        patterns = self._patterns()
        futures: dict[str, Future] = {}
        read: list[str] = []
        for url in nodes:
            agent = self._agent(url)
            future: Future = Future()
            futures[url] = future
            if agent is None:
                future.set_result({"node_url": url, "models": [], "error": f"{url} is not in the cluster"})
                continue
            agent.fetch(functools.partial(self._on_read, agent, future, patterns))
            read.append(url)
        self._postpone(read, time.monotonic() + self.health_interval)
        return futures

    def _on_read(
        self, agent: NodeAgent, future: Future, patterns: list[str], seq: int, sent_at: float, raw: Any
    ) -> None:
        status = agent.fold_if_unchanged(seq, sent_at, raw)
        if status is not None:
            future.set_result(status)
            return

        def fold() -> None:
            try:
                folded, full = agent.fold(seq, sent_at, raw, patterns)
                self._after_read(agent, folded, full, trigger=False)
            except BaseException as error:  # the controller promises not to raise; never hang a caller
                future.set_exception(error)
                return
            future.set_result(full)

        if self._read_pool.submit(fold).cancelled():  # closing: say so rather than never answering
            future.set_result({"node_url": agent.url, "models": [], "error": f"{agent.url}: closing"})

    def installed_models(self, node: str) -> set[str]:
        """Canonical keys of the models installed on a node (read now if never read successfully)."""
        agent = self._agent(node)
        return agent.installed() if agent is not None else set()

    def _emit_all(self, events: Iterable[Event]) -> None:
        """Emit; a GPU loss also starts the operator's remedy command (once per loss, in the background)."""
        for event in events:
            self.events.emit(event)
            if event.kind == "gpu_lost" and self.on_gpu_lost and not self._closed.is_set():
                threading.Thread(
                    target=self._run_remedy, args=(event.node,), name="gpu-remedy", daemon=True
                ).start()

    def _run_remedy(self, node: str) -> None:
        command = gs.remedy_command(str(self.on_gpu_lost), node)
        self.events.emit(Event("remedy_started", node=node, message=f"running the GPU remedy: {command}",
                               data={"command": command}))  # fmt: skip
        outcome = gs.run_remedy(str(self.on_gpu_lost), node, self.remedy_timeout)
        if outcome.error is not None:
            message = f"the GPU remedy for {node} could not start: {outcome.error}"
        elif outcome.timed_out:
            message = (
                f"the GPU remedy for {node} did not finish within {self.remedy_timeout:g}s and was stopped"
            )
        else:
            message = f"the GPU remedy for {node} exited with {outcome.exit_code}"
        logger.warning("%s; output:\n%s", message, outcome.output)  # the console writes it to console.log
        self.events.emit(
            Event("remedy_finished", node=node, message=message, data=dataclasses.asdict(outcome))
        )

    def probe_gpu(self, node: str, cancel: threading.Event | None = None, trust_vram: bool = True) -> dict:
        """Ask the node whether it has a usable GPU with a tiny load (see GPUController.probe_gpu), in the
        node's move lane, and record the answer as evidence; returns the probe's dict."""
        agent = self._agent(node)
        if agent is None:
            return {"gpu": None, "model": None, "message": f"{node} is not in the cluster"}

        def probe(stop: threading.Event) -> dict:
            return self.controller.probe_gpu(node, cancel=stop, trust_vram=trust_vram)

        result = agent.lane.submit(probe, cancel, USER_PRIORITY).result()
        if isinstance(result, MoveResult):  # the lane was closed
            return {"gpu": None, "model": None, "message": result.message}
        self._emit_all(agent.record_probe(result, self._exporter_gpus(node)))
        return result

    # ------------------------------------------------------------------ GPU exporters
    def set_gpu_exporter(self, node: str, exporter: str | None) -> None:
        """Read `node`'s VRAM figures from its GPU exporter (`http://host:9400/metrics`), or stop (None).
        ValueError (one line) for a node not in the cluster or an unusable exporter address."""
        url = normalize_url(node)
        if exporter is not None and self._agent(url) is None:
            raise ValueError(f"not in the cluster: {url}")
        self.gpu_metrics.set_exporter(url, exporter)

    def gpu_memory(self, node: str) -> GpuMemory | None:
        """The node's GPU memory as its exporter last showed it; None without an exporter. No network call."""
        return self.gpu_metrics.memory(normalize_url(node))

    def _exporter_gpus(self, node: str) -> int | None:
        """How many GPUs the node's exporter lists (its last good figures), None when not known."""
        memory = self.gpu_metrics.memory(node)
        return None if memory is None else memory.gpu_count

    def _vram_fields(self, state: NodeState) -> dict[str, Any]:
        """The exporter's figures with what Ollama held when they were read: a fresh /api/ps beside
        figures a few seconds old would count a model just moved twice (or as another program's)."""
        memory = self.gpu_metrics.memory(state.url)
        if memory is None:
            return {}
        with self._lock:
            models = self._models_at_scrape.get(state.url, state.models)
        return vram_fields(memory, models)

    def _scrape_after_change(self, event: Event) -> None:
        """A node's models changed: read its exporter again now, not at the next interval; a
        `vram_measured` event says when the new figures are in (the dashboard reads them then)."""
        node = event.node
        if event.kind != "placements_changed" or node is None or node not in self.gpu_metrics.nodes:
            return
        with self._lock:
            self._rescrape.add(node)
        self.gpu_metrics.scrape_soon(node)

    def _on_gpu_memory(self, node: str, memory: GpuMemory) -> None:
        """After each scrape (on a scrape thread): the GPUs listed are verdict evidence, and VRAM held by
        other programs that keeps a priority model off the GPU is an event, once per condition."""
        agent = self._agent(node)
        if agent is None or self._closed.is_set() or memory.error is not None:
            return
        self._emit_all(agent.record_exporter(len(memory.gpus)))
        state = agent.snapshot()
        with self._lock:
            self._models_at_scrape[node] = state.models
            asked = node in self._rescrape
            self._rescrape.discard(node)
        if asked:
            self.events.emit(Event("vram_measured", node=node, message=f"{node}: VRAM figures read again"))
        if not state.online:
            return  # its models are the last known ones: they say nothing about now
        held = []
        if state.gpu == gs.GPU_YES:
            pinned = self._optimizer.is_pinned
            held = kept_off_by_others(state.models, memory, self._patterns(), lambda m: pinned(node, m))
        self._emit_all(self._held_off.update(node, held))

    # ------------------------------------------------------------------ reports
    def vram_report(self, nodes: Iterable[str] | None = None) -> list[dict]:
        """Fresh placement of every model on every node, nodes concurrently, bounded by the timeout.

        Every node is read at once through the status poller (never queued behind the monitor or another
        node), so a node that answers within its timeout is never reported stale. A node that does not
        answer keeps its last known models, marked `stale`. `nodes`: only those (no other node is waited
        for).
        """
        wanted = None if nodes is None else set(self._targets(nodes))
        agents = [agent for agent in self._all_agents() if wanted is None or agent.url in wanted]
        sent = time.monotonic()
        futures = self.read_statuses(agent.url for agent in agents)
        self._wait_for_reads(futures)
        budget = float(getattr(self.controller, "timeout", 5.0)) + REPORT_SLACK_S
        self.gpu_metrics.wait_first(list(futures), sent + budget - time.monotonic())  # right after start
        report = []
        for agent in agents:
            state = agent.snapshot()
            late = not futures[agent.url].done()
            report.append({
                "node": state.url,
                "online": state.online,
                "stale": state.stale or late,
                "last_seen": state.last_seen,
                "error": "no reply within the timeout" if late else state.last_error,
                **_gpu_fields(state),
                "latency_ms": state.latency_ms,
                "models": _report_models(state),
                **self._vram_fields(state),
            })  # fmt: skip
        return report

    def _wait_for_reads(self, futures: dict[str, Future]) -> None:
        """Wait for a report's reads. Each ends within the node's timeout from when the poller sent it
        (reads beyond its MAX_IN_FLIGHT wait their turn with their clock stopped), so a node that answered
        in time is never judged stale for the queue's time; the whole wait is capped at REPORT_QUEUE_CAP
        timeouts."""
        budget = float(getattr(self.controller, "timeout", 5.0)) + REPORT_SLACK_S
        wait(list(futures.values()), timeout=REPORT_QUEUE_CAP * budget)

    def get_stats(self) -> dict:
        """Per-node counters and evidence plus the optimizer's status (no network call)."""
        nodes = [
            {
                "node": s.url,
                "online": s.online,
                **_gpu_fields(s),
                "latency_ms": s.latency_ms,
                "requests": s.requests,
                "errors": s.errors,
                "in_flight": s.in_flight,
                "last_error": s.last_error,
                "last_seen": s.last_seen,
                "stale": s.stale,
                "models_loaded": len(s.models),
                "models_on_gpu": sum(m.get("location") == LOCATION_GPU for m in s.models),
                **self._vram_fields(s),
                **self.request_stats.summary(s.url),  # p50/p95 latency and TTFT, tokens/s, cool-down
            }
            for s in self.node_states()
        ]
        return {"nodes": nodes, "optimizer": self.optimizer_status(), "routing": self._routing}

    def known_models(self) -> list[str]:
        """Canonical names installed or loaded on any node (for completion); no network call."""
        names: set[str] = set()
        for state in self.node_states():
            names.update(state.installed)
            names.update(model_key(m["name"]) for m in state.models)
        return sorted(names)

    # ------------------------------------------------------------------ placement
    def force_gpu_all_nodes(
        self,
        model: str,
        cancel: threading.Event | None = None,
        nodes: Iterable[str] | None = None,
        dry_run: bool = False,
        force: bool = False,
    ) -> list[dict]:
        """Move `model` to GPU on every node (concurrently), or on `nodes`; lifts a CPU pin and any back-off.

        A node where it cannot fit (room.py: its size against the most VRAM seen free there) is refused with
        reason `does_not_fit` before any load, unless `force`. `dry_run`: say per node what would be done
        (`would_move`, `would_probe`, `already`, or a skip), changing nothing and sending nothing but reads.
        """
        if not dry_run:
            self._optimizer.release_model(model)
        return self._force_all_nodes(model, "GPU", cancel, nodes, dry_run, force)

    def force_cpu_all_nodes(
        self,
        model: str,
        cancel: threading.Event | None = None,
        nodes: Iterable[str] | None = None,
        dry_run: bool = False,
    ) -> list[dict]:
        """Move `model` to CPU on every node where it is loaded (or on `nodes`), and pin it there (the
        optimizer leaves it alone); nodes where it is not loaded are skipped: nothing is loaded just to sit
        in RAM."""
        targets = self._targets(nodes)
        if not dry_run:  # pinned before the move, so that no pass moves it back meanwhile
            self._optimizer.release_model(model)
            for node in targets:
                self._optimizer.pin_cpu(node, model)
        results = self._force_all_nodes(model, "CPU", cancel, targets, dry_run)
        for entry in results if not dry_run else []:
            if entry["result"].get("reason") == Reason.NOT_LOADED:
                self._optimizer.unpin_cpu(entry["node"], model)
        return results

    def unload_all_nodes(
        self,
        model: str,
        cancel: threading.Event | None = None,
        nodes: Iterable[str] | None = None,
        dry_run: bool = False,
    ) -> list[dict]:
        """Unload `model` (like `ollama stop`) on every node where it is loaded, or on `nodes`, verified:
        [{'node', 'result'}] with reason `unloaded`, or a skip (`not_loaded`, `offline`)."""
        name = canonical_name(model)

        def one(node: str) -> MoveResult:
            status = self.read_status(node)
            if "error" in status:
                return skipped(Reason.OFFLINE, f"skipped {node}: {status['error']}")
            if not any(same_model(m["name"], model) for m in status["models"]):
                return skipped(Reason.NOT_LOADED, f"skipped {node}: {name} is not loaded there")
            if dry_run:
                return MoveResult(True, f"would unload {name}", Reason.WOULD_UNLOAD, dry_run=True)
            return self.unload(node, model, cancel)

        targets = self._targets(nodes)
        futures = [run_daemon(lambda n=node: one(n), "unload") for node in targets]
        return [
            {"node": node, "result": f.result().as_dict()} for node, f in zip(targets, futures, strict=True)
        ]

    def unload(
        self, node: str, model: str, cancel: threading.Event | None = None, source: str = "user"
    ) -> MoveResult:
        """One verified unload in the node's lane, with a `model_unloaded` (or `move_failed`) event."""
        agent = self._agent(node)
        if agent is None:
            return skipped(Reason.REMOVED, f"{node} was removed from the cluster")
        name = canonical_name(model)

        def run(stop: threading.Event) -> MoveResult:
            reply = self.controller.unload(node, model, cancel=stop)
            reason = Reason(reply["reason"])
            result = MoveResult(bool(reply["success"]), str(reply["message"]), reason)
            kind = "model_unloaded" if result.success else "move_failed"
            data = {"target": "unload", "reason": str(reason), "source": source}
            self.events.emit(Event(kind, node=node, model=name, message=result.message, data=data))
            return result

        priority = USER_PRIORITY if source == "user" else OPTIMIZER_PRIORITY
        return agent.lane.submit(run, cancel, priority).result()

    def cleanup(
        self, cancel: threading.Event | None = None, nodes: Iterable[str] | None = None, dry_run: bool = False
    ) -> list[dict]:
        """Unload every model that is not a priority model from VRAM, on every node (or `nodes`), verified:
        [{'node', 'model', 'result'}]. A model serving requests routed here is left (reason `busy`); models
        in RAM only hold no VRAM and are left too. `dry_run`: `would_unload` for each, nothing sent."""
        patterns = self._patterns()

        def one(node: str) -> list[tuple[str | None, MoveResult]]:
            status = self.read_status(node)
            if "error" in status:
                return [(None, skipped(Reason.OFFLINE, f"skipped {node}: {status['error']}"))]
            state = self.node_state(node)
            busy = state.in_flight_models if state is not None else {}
            done: list[tuple[str | None, MoveResult]] = []
            for row in status["models"]:
                name = row["name"]
                if row.get("stopping") or not row.get("vram_mb") or matches_priority(name, patterns):
                    continue
                if busy.get(model_key(name)):
                    message = f"{name} on {node} is serving requests: left loaded"
                    done.append((name, MoveResult(False, message, Reason.BUSY, row.get("location"))))
                elif dry_run:
                    message = f"would unload {name} ({row['vram_mb'] / 1024:.1f} GB of VRAM)"
                    done.append((name, MoveResult(True, message, Reason.WOULD_UNLOAD, dry_run=True)))
                else:
                    done.append((name, self.unload(node, name, cancel, source="cleanup")))
            return done

        targets = self._targets(nodes)
        futures = [run_daemon(lambda n=node: one(n), "cleanup") for node in targets]
        return [
            {"node": node, "model": model, "result": result.as_dict()}
            for node, future in zip(targets, futures, strict=True)
            for model, result in future.result()
        ]

    # ------------------------------------------------------------------ room on the GPU (room.py)
    def load_back(self, node: str, model: str, on_cpu: bool = False) -> MoveResult:
        """Load back, in the node's lane, a model the optimizer unloaded for room (automatic placement)."""
        agent = self._agent(node)
        if agent is None:
            return skipped(Reason.REMOVED, f"{node} was removed from the cluster")

        def run(stop: threading.Event) -> MoveResult:
            reply = self.controller.load_back(node, model, on_cpu)
            reason = Reason.MOVED if reply["success"] else Reason.ERROR
            return MoveResult(bool(reply["success"]), str(reply["message"]), reason, reply["location"])

        return agent.lane.submit(run, None, OPTIMIZER_PRIORITY).result()

    def vram_bounds(self, node: str, models: list[dict] | None = None) -> VramBounds:
        """What the node's GPU can hold for Ollama's models: from its exporter (what the models hold plus
        the driver's free VRAM, read again now: I/O), else as far as seen (the most held;
        a learned ceiling)."""
        state = self.node_state(node)
        if state is None:
            return VramBounds()
        memory = self.gpu_metrics.fresh(normalize_url(node))
        if memory is not None and memory.known and not memory.stale and memory.free_mb is not None:
            rows = state.models if models is None else models
            capacity = _held_mb(rows) + memory.free_mb
            return VramBounds(capacity, capacity)
        return state.vram_bounds

    def model_need_mb(self, node: str, model: str) -> float | None:
        """The VRAM `model` needs fully on the GPU: its size when this node last held it; else the
        controller's estimate from /api/tags and /api/show (I/O) for the context this node
        gives its models (another node's figure would not do: Ollama's default context follows each node's
        VRAM); else None."""
        key = model_key(model)
        state = self.node_state(node)
        if state is None:
            return None
        if state.model_sizes_mb.get(key):
            return state.model_sizes_mb[key]
        return self.controller.estimate_vram_mb(node, model, _usual_context(state.models))

    def fit_check(self, node: str, model: str, status: dict | None = None, alone: bool = False) -> Fit:
        """Whether `model` fits fully on `node`'s GPU next to the other models loaded there (room.fit), or
        with every other model unloaded (`alone`). ValueError for a node not in the cluster."""
        [node] = self._targets([node])
        status = status if status is not None else self.read_status(node)
        others = [
            m
            for m in status.get("models", [])
            if not alone and not same_model(m["name"], model) and not m.get("stopping") and m.get("vram_mb")
        ]
        bounds = self.vram_bounds(node, status.get("models"))
        names = [model_key(m["name"]) for m in others]
        return fit(self.model_need_mb(node, model), _held_mb(others), bounds, model_key(model), names)

    def _targets(self, nodes: Iterable[str] | None) -> list[str]:
        """All nodes, or the ones asked for (normalised; a node not in the cluster is a ValueError); one
        address alone is one node."""
        if nodes is None:
            return self.nodes
        if isinstance(nodes, str):
            nodes = [nodes]
        known, wanted = self.nodes, [normalize_url(node) for node in nodes]
        missing = [node for node in wanted if node not in known]
        if missing:
            raise ValueError(
                f"not in the cluster: {', '.join(missing)} (nodes: {', '.join(known) or 'none'})"
            )
        return wanted

    def _force_all_nodes(
        self,
        model: str,
        target: str,
        cancel: threading.Event | None,
        nodes: Iterable[str] | None = None,
        dry_run: bool = False,
        force: bool = False,
    ) -> list[dict]:
        """Every node at once, each on a thread of its own: 200 nodes take about one load, not four rounds."""
        nodes = self._targets(nodes)
        futures = [
            run_daemon(lambda n=node: self._force_one(n, model, target, cancel, dry_run, force), "force")
            for node in nodes
        ]
        return [
            {"node": node, "result": future.result().as_dict()}
            for node, future in zip(nodes, futures, strict=True)
        ]

    def _force_one(
        self,
        node: str,
        model: str,
        target: str,
        cancel: threading.Event | None,
        dry_run: bool = False,
        force: bool = False,
    ) -> MoveResult:
        """Do no harm: a model is loaded where it was not only onto a GPU known, declared or probed, and
        not onto one it cannot fit (unless `force`)."""
        state = self.node_state(node)
        if state is None:
            return skipped(Reason.REMOVED, f"{node} was removed from the cluster")
        if state.online is False:
            return skipped(Reason.OFFLINE, f"skipped {node}: offline ({state.last_error})")
        if target == "GPU" and state.gpu == gs.GPU_LOST:
            return skipped(Reason.GPU_LOST, f"skipped {node}: its GPU is lost. {gs.lost_remedy_text(node)}")
        if target == "GPU" and state.gpu == gs.GPU_NO:
            return skipped(Reason.NO_GPU, f"skipped {node}: no GPU ({state.gpu_evidence})")
        status = self.read_status(node)
        if "error" in status:
            return skipped(Reason.OFFLINE, f"skipped {node}: {status['error']}")
        row = next((m for m in status["models"] if same_model(m["name"], model)), None)
        if target == "GPU" and not force and (row is None or row.get("location") != LOCATION_GPU):
            # Ollama unloads other models for a forced load by itself: refused only what cannot fit even
            # alone, where the load would unload everything and still run out of memory
            failed_at = state.gpu_oom_at.get(model_key(model))
            if failed_at is not None and time.monotonic() - failed_at < OOM_REMEMBERED_S:
                ago = _ago(time.monotonic() - failed_at)
                message = (
                    f"{canonical_name(model)} on {node} does not fit: its load {ago} ago ran out of memory "
                    "with every other model unloaded; --force tries again"
                )
                return MoveResult(False, message, Reason.DOES_NOT_FIT, row.get("location") if row else None)
            verdict = self.fit_check(node, model, status, alone=True)
            if verdict.verdict == NO_FIT:
                message = f"{canonical_name(model)} on {node} {no_fit_text(verdict)}; --force tries anyway"
                return MoveResult(False, message, Reason.DOES_NOT_FIT, row.get("location") if row else None)
        if target == "GPU" and state.gpu == gs.GPU_YES and not dry_run:
            return self.move(node, model, target, cancel=cancel, source="user")
        if dry_run:
            return _dry_run(node, model, target, row, state.gpu)
        if row is None:
            if target == "CPU":
                return skipped(
                    Reason.NOT_LOADED, f"skipped {node}: {canonical_name(model)} is not loaded there"
                )
            probe = self.probe_gpu(node, cancel=cancel)
            if self.node_state(node).gpu == gs.GPU_LOST:  # its exporter lists a GPU Ollama does not use
                return skipped(
                    Reason.GPU_LOST, f"skipped {node}: its GPU is lost. {gs.lost_remedy_text(node)}"
                )
            if probe["gpu"] is not True:
                reason = Reason.NO_GPU if probe["gpu"] is False else Reason.GPU_UNKNOWN
                return skipped(reason, f"skipped {node}: no GPU shown by a probe ({probe['message']})")
        return self.move(node, model, target, cancel=cancel, source="user")

    def move(
        self, node: str, model: str, target: str, cancel: threading.Event | None = None, source: str = "user"
    ) -> MoveResult:
        """One verified move in the node's lane (one move per node at a time; a user's move goes before the
        optimizer's queued ones), with move_started / move_finished / move_failed events."""
        agent = self._agent(node)
        if agent is None:
            return skipped(Reason.REMOVED, f"{node} was removed from the cluster")
        name = canonical_name(model)
        priority = USER_PRIORITY if source == "user" else OPTIMIZER_PRIORITY

        def run(stop: threading.Event) -> MoveResult:
            data: dict[str, Any] = {"target": target, "source": source}
            self.events.emit(Event("move_started", node=node, model=name, data=dict(data),
                                   message=f"moving {name} to {target} on {node}"))  # fmt: skip
            try:
                result = self.controller.move(node, model, target.lower(), cancel=stop)
            except Exception as error:  # the controller promises not to raise; report it as a failed move
                logger.exception("move of %s on %s failed", name, node)
                result = MoveResult(False, str(error), Reason.ERROR)
            self._emit_all(agent.record_move(name, result, self._exporter_gpus(node), target))
            data.update(location=result.location, reason=str(result.reason), vram_mb=result.vram_mb)
            kind = "move_finished" if result.success else "move_failed"
            self.events.emit(Event(kind, node=node, model=name, data=data, message=result.message))
            if result.reason in (Reason.UNREACHABLE, Reason.TIMEOUT):
                self._check(agent)
            return result

        return agent.lane.submit(run, cancel, priority).result()

    # ------------------------------------------------------------------ routing
    @property
    def routing(self) -> str:
        """How requests are routed (flockparse/routing.py): adaptive, round_robin, least_loaded or
        lowest_latency; setting an unknown name is a ValueError."""
        return self._routing

    @routing.setter
    def routing(self, name: str) -> None:
        self._routing = routes.check_strategy(name)  # ValueError naming the four for anything else

    def route_candidates(self, model: str | None, fresh: bool = False) -> list[routes.Candidate]:
        """What routing knows about every node for `model` (no network call). The nodes' placements come
        from snapshots taken at most ROUTE_VIEW_TTL_S ago (`fresh`: now), so a request costs no copy of
        every node's state; requests in flight and cool-downs are counted live."""
        taken, views = self._route_views
        if fresh or time.monotonic() - taken > ROUTE_VIEW_TTL_S:
            views = [routes.view(state) for state in self.node_states()]
            self._route_views = (time.monotonic(), views)
        key = model_key(model) if model else None
        in_flight, cooling = self.request_stats.in_flight(), self.request_stats.cooling()
        return [
            routes.candidate(node, key, in_flight.get(node.url, 0), cooling.get(node.url, 0.0))
            for node in views
        ]

    def pick_node(self, model: str | None = None, exclude: Iterable[str] = ()) -> str | None:
        """The node for a request for `model` under the routing strategy; None when no node is usable.

        Offline nodes are never chosen; nodes cooling down after errors only when nothing else is left;
        nodes not checked yet come after every online node. `exclude`: nodes already tried.
        """
        with self._turn_lock:
            turn, self._turn = self._turn, self._turn + 1
        return routes.choose(self.route_candidates(model), model, self._routing, turn, exclude)

    def explain_route(self, model: str | None) -> dict[str, Any]:
        """`route MODEL`: every node in the order the next request would try them, each with why (one
        phrase), then the nodes skipped and why. Changes nothing (round robin's turn is not used up)."""
        with self._turn_lock:
            turn = self._turn
        order = routes.rank(self.route_candidates(model, fresh=True), model, self._routing, turn)
        return {
            "model": canonical_name(model) if model else None,
            "routing": self._routing,
            "nodes": [ranked.as_dict() for ranked in order],
        }

    def request_started(self, node: str, model: str | None = None) -> bool:
        """Count a routed request on `node` (requests, in flight; its `model` is busy, never evicted, until
        request_finished names it too); False if the node is not in the cluster."""
        agent = self._agent(node)
        if agent is None:
            return False
        agent.request_started(model)
        self.request_stats.begin(node)
        return True

    def request_finished(
        self,
        node: str,
        error: str | None = None,
        sample: Sample | None = None,
        *,
        endpoint: str | None = None,
        seconds: float | None = None,
        model: str | None = None,
    ) -> None:
        """End a routed request. `error`: the node failed it (counted, the node cools down and its health is
        checked now rather than in `health_interval`); `sample`: what the answer took (lb_stats); neither:
        the node answered without a sample (e.g. rejected the caller's request with a 4xx). `endpoint` and
        `seconds`: the attempt for the metrics' per-endpoint histogram (`self.stats`)."""
        if endpoint is not None and seconds is not None:
            self.stats.observe_request(endpoint, seconds, failed=error is not None)
        agent = self._agent(node)
        if agent is not None and agent.request_finished(error, model):
            self._optimizer.model_idle(node)  # a pass that waited for it gets its turn now
        self.request_stats.end(node)
        if error is not None:
            self.request_stats.failed(node, error)
            if agent is not None:
                self._check(agent)  # let the monitor confirm up/down now rather than in 5 s
        elif sample is not None:
            self.request_stats.record(node, sample)
        else:
            self.request_stats.succeeded(node)

    def generate(self, model: str, prompt: str, **options: Any) -> dict:
        """POST /api/generate (stream false) on the best node, failing over to other nodes.

        Extra keyword arguments go into the request body as they are (options={...}, keep_alive=...).
        """
        return self._routed_post("/api/generate", model, {"model": model, "prompt": prompt, **options})

    def embed(self, model: str, input: str | list[str], **options: Any) -> dict:
        """POST /api/embed on the best node, failing over to other nodes."""
        return self._routed_post("/api/embed", model, {"model": model, "input": input, **options})

    def _routed_post(self, path: str, model: str, body: dict) -> dict:
        body = {**body, "stream": False}
        tried: list[str] = []
        errors: list[tuple[str, str]] = []
        while (node := self.pick_node(model, exclude=tried)) is not None:
            tried.append(node)
            reply, error = self._post_once(node, path, body)
            if error is None:
                return reply
            errors.append((node, error))
        raise AllNodesFailedError(model, errors)

    def _post_once(self, node: str, path: str, body: dict) -> tuple[dict, str | None]:
        """One attempt; returns (reply, None) or ({}, reason to fail over). 4xx other than 404 raises and
        is not counted against the node: another node would say the same about the caller's request."""
        model = str(body.get("model") or "")
        if not self.request_started(node, model):
            return {}, "removed from the cluster"
        node_error: str | None = None
        sent = time.monotonic()
        try:
            answer = self.controller.call(node, "POST", path, body, read_timeout=self.request_timeout)
        except NodeError as exc:  # refused, reset, timed out: fail over
            node_error = exc.message
        else:
            if 400 <= answer.status < 500 and answer.status != 404:
                self.request_finished(node, endpoint=path, seconds=time.monotonic() - sent, model=model)
                raise RequestRejectedError(node, answer.status, answer.error_text())
            if answer.status != 200:
                node_error = f"HTTP {answer.status}: {answer.error_text()}"
            elif not isinstance(answer.body, dict):
                node_error = "reply is not a JSON object"
        seconds = time.monotonic() - sent
        if node_error is not None:
            self.request_finished(node, node_error, endpoint=path, seconds=seconds, model=model)
            return {}, node_error
        count, duration = eval_metrics(answer.body)
        sample = Sample(seconds, None, count, duration)
        self.request_finished(node, sample=sample, endpoint=path, seconds=seconds, model=model)
        return answer.body, None


# --------------------------------------------------------------------------------------------- helpers
def _dry_run(node: str, model: str, target: str, row: dict | None, gpu: str) -> MoveResult:
    """What a force would do on a node, from its fresh status; nothing is sent."""
    name = canonical_name(model)
    location = row.get("location") if row is not None else None
    if location == (LOCATION_GPU if target == "GPU" else LOCATION_CPU):
        return MoveResult(True, f"{name} is already on {target}", Reason.ALREADY, location, dry_run=True)
    if row is None and target == "CPU":
        return skipped(Reason.NOT_LOADED, f"skipped {node}: {name} is not loaded there")
    if row is None and gpu != gs.GPU_YES:
        message = f"would probe {node} for a GPU with a small load, then load {name} onto it"
        return MoveResult(True, message, Reason.WOULD_PROBE, dry_run=True)
    message = f"would move {name} to {target} (now {location or 'not loaded'})"
    return MoveResult(True, message, Reason.WOULD_MOVE, location, dry_run=True)


def check_evict_to(value: str) -> str:
    """How the optimizer makes room: "unload" (frees the memory) or "cpu" (keeps the model, in RAM)."""
    if value not in ("unload", "cpu"):
        raise ValueError(f"evict_to must be 'unload' or 'cpu', not {value!r}")
    return value


def _ago(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"


def _usual_context(models: Iterable[dict]) -> int:
    """The context a node gives its models (the most common among those loaded, embedding models' small
    ones aside), else Ollama's smallest default: what a model never loaded there would get."""
    contexts = [m.get("context_length") for m in models]
    usual = Counter(c for c in contexts if isinstance(c, int) and c >= MIN_USUAL_CONTEXT).most_common(1)
    return usual[0][0] if usual else DEFAULT_ESTIMATE_CTX


def _held_mb(models: Iterable[dict]) -> float:
    """The VRAM the models hold (MB), leaving out those being unloaded."""
    return sum(float(m.get("vram_mb") or 0.0) for m in models if not m.get("stopping"))


def _gpu_fields(state: NodeState) -> dict[str, Any]:
    """The GPU verdict as reports and stats show it."""
    return {
        "gpu": state.gpu,
        "has_gpu": state.has_gpu,
        "gpu_evidence": state.gpu_evidence,
        "gpu_lost_since": state.gpu_lost_since,
        "ollama_version": state.ollama_version,
        "estimates": state.reports_estimates,
    }


def _report_models(state: NodeState) -> list[dict]:
    """The node's model rows, each saying why it cannot be moved when that is known."""
    rows = []
    for model in state.models:
        row = dict(model)
        known = state.unmovable.get(model_key(row["name"]))
        if known is not None:
            row["unmovable"] = known["reason"]
            row["unmovable_message"] = known["message"]
        elif row.get("controllable") is False:
            row["unmovable"] = "not_controllable"
            row["unmovable_message"] = "a safetensors (MLX) model: Ollama ignores num_gpu for it"
        rows.append(row)
    return rows
