"""Shared fixtures: simulated Ollama nodes (real sockets on 127.0.0.1), balancers and a deadline poll.

Plain helpers (the poll itself, placement checks, Recorder) live in helpers.py.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import wait_until

from flockparse.balancer import OllamaLoadBalancer
from gpu_controller import GPUController
from ollama_sim import SimCluster, SimNode


@pytest.fixture
def sim_node() -> Iterator[Callable[..., SimNode]]:
    """Factory: `node = sim_node(vram_gb=24, preload=[...])` starts a SimNode; at teardown any fault a
    test left is cleared and the node stopped."""
    started: list[SimNode] = []

    def start(**kwargs: Any) -> SimNode:
        node = SimNode(**kwargs).start()
        started.append(node)
        return node

    yield start
    for node in started:
        node.clear_fault()
        node.stop()


@pytest.fixture
def quick_sim_node(sim_node: Callable[..., SimNode]) -> Callable[..., SimNode]:
    """`sim_node` with a 20 ms unload (instead of 50 ms): the controller tests move models a lot."""
    return functools.partial(sim_node, unload_seconds=0.02)


@pytest.fixture
def sim_cluster() -> Iterator[Callable[..., SimCluster]]:
    """Factory: `cluster = sim_cluster([dict(vram_gb=0), dict(vram_gb=24)])`, stopped at teardown."""
    started: list[SimCluster] = []

    def start(configs: list[dict]) -> SimCluster:
        cluster = SimCluster(configs).start()
        started.append(cluster)
        return cluster

    yield start
    for cluster in started:
        cluster.stop()


@pytest.fixture
def controller() -> Iterator[GPUController]:
    """A GPUController with short timeouts, closed at teardown."""
    ctl = GPUController(timeout=2.0, load_timeout=10.0, verify_timeout=5.0)
    yield ctl
    ctl.close()


@pytest.fixture
def make_balancer() -> Iterator[Callable[..., OllamaLoadBalancer]]:
    """Fast health checks, optimizer off and a long interval unless a test says otherwise."""
    balancers: list[OllamaLoadBalancer] = []

    def make(urls: list[str], **options: object) -> OllamaLoadBalancer:
        options.setdefault("health_interval", 0.2)
        options.setdefault("check_interval", 300)
        options.setdefault("auto_optimize_gpu", False)
        options.setdefault("controller", GPUController(timeout=3.0, load_timeout=20.0, verify_timeout=10.0))
        balancer = OllamaLoadBalancer(urls, **options)
        balancers.append(balancer)
        return balancer

    yield make
    for balancer in balancers:
        balancer.close()


@pytest.fixture(name="wait_until")
def wait_until_fixture() -> Callable[..., Any]:
    """helpers.wait_until as a fixture, for tests that prefer not to import it."""
    return wait_until


@pytest.fixture
def served() -> Iterator[Callable[..., str]]:
    """Factory: `url = served(balancer, token=None, **options)` serves the control API for `balancer` on
    127.0.0.1 (tests/serving.py) and returns its URL; stopped at teardown. `served.apps` lists them."""
    from serving import ServedApp, control_app

    apps: list[ServedApp] = []

    def serve(balancer: OllamaLoadBalancer, token: str | None = None, **options: object) -> str:
        app = ServedApp(control_app(balancer, token, **options))
        apps.append(app)
        return app.start()

    serve.apps = apps  # type: ignore[attr-defined]
    yield serve
    for app in apps:
        app.stop()


@pytest.fixture
def stop_at_end() -> Iterator[list[Any]]:
    """Servers and services to stop at the end, servers first."""
    from serve_support import ServeThread

    things: list[Any] = []
    yield things
    for thing in things:
        thing.stop() if isinstance(thing, ServeThread) else thing.close()


@pytest.fixture
def serve_over(make_balancer, stop_at_end, tmp_path: Path) -> Callable[..., Any]:
    """`serve_over(nodes, token=None, reads_need_token=False)`: a serve (with history) over those nodes,
    once every node has been checked (the dashboard's tests)."""
    from serve_support import ServeThread

    from flockparse.console.config import Config
    from flockparse.console.services import start_services

    def serve(nodes: list[Any], token: str | None = None, reads_need_token: bool = False) -> Any:
        urls = [node.url for node in nodes]
        balancer = make_balancer(urls, start=False, gpu_priority_models=["llama3.1"])
        services = start_services(balancer, Config(nodes=urls, path=tmp_path / "c.toml"), tmp_path, None)
        stop_at_end.append(services)
        balancer.start()
        wait_until(lambda: all(s.online and s.ollama_version for s in balancer.node_states()), "first checks")
        server = ServeThread(
            balancer, token=token, services=services, control_reads_need_token=reads_need_token
        )
        stop_at_end.insert(0, server.start())
        return server

    return serve
