"""Scale (issue 8): the checker pool, the monitor's schedule, the descriptor budget, the summary counts and
the transport's hot GET path. Behaviour only; the figures are in bench/scale.py and README."""

from __future__ import annotations

import json
import socket
import threading
import time

import pytest
from helpers import Recorder, wait_until
from hostile import HostileNode, Request, answer

from flockparse import limits
from flockparse.agent import NodeAgent
from flockparse.console.render import event_line
from flockparse.console.toolbar import toolbar_state
from flockparse.limits import FdBudget
from flockparse.transport import NodeTransport
from flockparse.workers import ElasticPool
from gpu_controller import GPUController

PS = json.dumps({"models": []}).encode()


# ------------------------------------------------------------------------------ the elastic pool
def test_a_pool_grows_past_hung_tasks_and_shrinks_back() -> None:
    pool = ElasticPool("test", min_workers=2, max_wait=0.02, idle_seconds=0.2)
    release = threading.Event()
    hung = [pool.submit(lambda: release.wait(30)) for _ in range(6)]
    quick = pool.submit(lambda: "done")
    assert quick.result(timeout=10) == "done"  # not queued behind the six hung tasks
    assert not any(f.done() for f in hung)
    release.set()
    assert all(f.result(timeout=10) for f in hung)
    wait_until(lambda: pool.workers == 2, "the surplus workers ended")
    pool.close()


def test_a_closed_pool_cancels_what_waits() -> None:
    pool = ElasticPool("test", min_workers=1, max_wait=60)
    release, started = threading.Event(), threading.Event()
    running = pool.submit(lambda: started.set() or release.wait(30))
    assert started.wait(10)
    waiting = pool.submit(lambda: "never")
    pool.close()
    assert waiting.cancelled()
    assert pool.submit(lambda: 1).cancelled()
    release.set()
    assert running.result(timeout=10) is True


# ------------------------------------------------------------------------------ the health monitor
def ps_requests(node) -> int:
    return sum(path == "/api/ps" for _, path, _ in list(node.request_log))


def test_hung_nodes_do_not_delay_other_nodes_checks_and_hold_one_check_each(sim_node, make_balancer) -> None:
    healthy = sim_node()
    hung = [sim_node() for _ in range(12)]  # more than the pool's idle workers
    for node in hung:
        node.set_fault("hang", paths=("/api/ps",))
    balancer = make_balancer(
        [healthy.url, *(n.url for n in hung)], health_interval=0.2, controller=GPUController(timeout=30.0)
    )
    wait_until(lambda: all(ps_requests(n) == 1 for n in hung), "every hung node asked once")
    start = ps_requests(healthy)
    wait_until(lambda: ps_requests(healthy) >= start + 5, "five more checks of the healthy node")
    assert [ps_requests(n) for n in hung] == [1] * len(hung)  # never a second check in flight
    assert balancer.node_state(healthy.url).online is True


def test_a_report_is_not_queued_behind_hung_monitor_checks(sim_node, make_balancer) -> None:
    healthy = sim_node()
    hung = [sim_node() for _ in range(12)]
    for node in hung:
        node.set_fault("hang", paths=("/api/ps",))
    controller = GPUController(timeout=1.0)
    balancer = make_balancer([healthy.url, *(n.url for n in hung)], controller=controller)
    wait_until(lambda: all(ps_requests(n) >= 1 for n in hung), "the monitor's checks hang")
    rows = {row["node"]: row for row in balancer.vram_report()}
    assert rows[healthy.url]["stale"] is False and rows[healthy.url]["online"] is True


def test_an_agent_runs_its_checks_on_the_given_pool(sim_node, controller) -> None:
    node = sim_node()
    pool = ElasticPool("test", min_workers=1)
    submitted = []

    def submit(work):
        submitted.append(work)
        return pool.submit(work)

    agent = NodeAgent(node.url, controller, submit=submit)
    future = agent.check([])
    assert agent.check([]) is None or len(submitted) == 1  # at most one in flight
    future.result(timeout=10)
    assert len(submitted) >= 1 and agent.online is True
    pool.close()


# ------------------------------------------------------------------------------ the summary counts
def test_summary_counts_nodes_without_copying_their_state(sim_node, make_balancer, monkeypatch) -> None:
    up, gpu = sim_node(vram_gb=0), sim_node(preload=[("llama3.1", "gpu")])
    down = sim_node()
    down.set_fault("down")
    balancer = make_balancer([up.url, gpu.url, down.url], auto_optimize_gpu=False)
    wait_until(lambda: balancer.summary()["unchecked"] == 0, "every node checked")
    wait_until(lambda: balancer.summary()["gpu"] == 1, "the GPU seen in VRAM")

    def no_copies(self):
        raise AssertionError("summary() must not snapshot a node")

    monkeypatch.setattr(NodeAgent, "snapshot", no_copies)
    counts = balancer.summary()
    assert counts == {"total": 3, "online": 2, "offline": 1, "unchecked": 0, "gpu": 1, "gpu_lost": 0,
                      "stale": 0}  # fmt: skip
    monkeypatch.setattr(balancer, "node_states", lambda: pytest.fail("the toolbar copied every node"))
    state = toolbar_state(balancer)
    assert (state["nodes_total"], state["nodes_online"], state["nodes_gpu"]) == (3, 2, 1)


# ------------------------------------------------------------------------------ the collector
@pytest.fixture
def gc_thresholds(monkeypatch) -> list[int]:
    """The collector's thresholds, faked: a test never changes the real ones of the test process."""
    thresholds = [700, 10, 10]
    monkeypatch.setattr(limits.gc, "get_threshold", lambda: tuple(thresholds))

    def set_threshold(*values: int) -> None:
        thresholds[:] = values

    monkeypatch.setattr(limits.gc, "set_threshold", set_threshold)
    return thresholds


def test_a_large_cluster_enlarges_the_young_generation_and_a_small_one_is_left_alone(gc_thresholds) -> None:
    assert limits.relax_gc(limits.GC_LARGE_CLUSTER - 1) == 700 and gc_thresholds == [700, 10, 10]
    assert limits.relax_gc(5000) == limits.GC_YOUNG_THRESHOLD
    assert gc_thresholds == [limits.GC_YOUNG_THRESHOLD, 10, 10]  # the older generations as they were
    gc_thresholds[0] = 200_000  # someone chose more: never lowered
    assert limits.relax_gc(5000) == 200_000


def test_the_balancer_relaxes_the_collector_at_start_for_its_node_count(monkeypatch, make_balancer, sim_node):
    seen: list[int] = []
    monkeypatch.setattr("flockparse.balancer.relax_gc", seen.append)
    balancer = make_balancer([sim_node().url, sim_node().url], start=False)
    assert seen == []
    balancer.start()
    assert seen == [2]


# ------------------------------------------------------------------------------ descriptors
def test_the_soft_fd_limit_is_raised_to_the_hard_one(monkeypatch) -> None:
    limit = [256, 4096]
    monkeypatch.setattr(limits.resource, "getrlimit", lambda _: tuple(limit))
    monkeypatch.setattr(limits.resource, "setrlimit", lambda _, value: limit.__setitem__(0, value[0]))
    budget = limits.fd_budget(1000)
    assert (budget.soft, budget.hard) == (4096, 4096)
    assert budget.enough and budget.warning() is None


def test_a_cluster_past_the_hard_limit_gets_one_clear_line(monkeypatch, make_balancer, sim_node) -> None:
    node = sim_node()
    monkeypatch.setattr(limits.resource, "getrlimit", lambda _: (1024, 1024))
    budget = limits.fd_budget(5000)
    warning = budget.warning()
    assert warning is not None and "\n" not in warning
    assert f"about {budget.checkable_nodes} nodes can be checked" in warning and "ulimit -n" in warning
    assert str(limits.descriptors_needed(5000)) in warning

    monkeypatch.setattr(
        "flockparse.balancer.fd_budget", lambda nodes: FdBudget(soft=68, hard=68, nodes=nodes + 2)
    )
    balancer = make_balancer([node.url], start=False)
    events = Recorder(balancer)
    balancer.start()
    [event] = events.of("fd_limit")
    needed = limits.descriptors_needed(3)  # 64 reserved + 3 per node
    assert f"3 nodes need about {needed} open files" in event.message
    assert "about 1 node can be checked" in event.message and "ulimit -n" in event.message
    line = event_line(event).plain
    assert "limit" in line and "\n" not in line and "ulimit -n" in line


# ------------------------------------------------------------------------------ the hot GET path
def chunked(conn: socket.socket, request: Request, node: HostileNode) -> bool:
    body = PS
    head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    parts = [body[:5], body[5:]]
    data = b"".join(f"{len(p):x}\r\n".encode() + p + b"\r\n" for p in parts) + b"0\r\n\r\n"
    return node.send(conn, head + data)


def until_close(conn: socket.socket, request: Request, node: HostileNode) -> bool:
    node.send(conn, b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n\r\n" + PS)
    return False


@pytest.mark.parametrize(
    "behaviour", [chunked, until_close, answer("200 OK", PS)], ids=["chunked", "close", "length"]
)
def test_the_hot_get_path_reads_every_body_framing(behaviour) -> None:
    transport = NodeTransport()
    with HostileNode(behaviour) as node:
        for _ in range(3):  # reused (chunked, length) or reconnected (close) each time
            reply = transport.call(node.url, "GET", "/api/ps", timeout=2.0)
            assert reply.status == 200 and reply.body == {"models": []}
    transport.close()


def test_a_read_by_a_pass_counts_as_the_nodes_health_check(sim_node, make_balancer) -> None:
    """A pass reads every node, and each read is recorded as a check would be: the monitor's next check of
    a node just read moves a whole interval on, so 5,000 nodes cost 5,000 reads per pass, not 5,000 more
    than the monitor's (bench/scale.py counts them)."""
    node = sim_node(vram_gb=24)
    balancer = make_balancer([node.url], health_interval=30.0)
    wait_until(lambda: balancer.node_state(node.url).online, "the first check")
    before = time.monotonic()

    [read] = balancer.read_statuses([node.url]).values()

    assert "error" not in read.result(timeout=10)
    assert balancer._due[node.url] >= before + 30.0  # the scheduling rule, read where it lives
