"""Shared fixtures: simulated Ollama nodes (real sockets on 127.0.0.1) and a deadline poll."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ollama_sim import SimCluster, SimNode  # noqa: E402


def wait_until(predicate: Callable[[], Any], timeout: float = 5.0, interval: float = 0.01) -> Any:
    """Poll `predicate` until it returns something truthy (returned) or fail the test at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() >= deadline:
            pytest.fail(f"condition not met within {timeout} s: {getattr(predicate, '__name__', predicate)}")
        time.sleep(interval)


@pytest.fixture
def sim_node() -> Iterator[Callable[..., SimNode]]:
    """Factory: `node = sim_node(vram_gb=24, preload=[...])` starts a SimNode, stopped at teardown."""
    started: list[SimNode] = []

    def start(**kwargs: Any) -> SimNode:
        node = SimNode(**kwargs).start()
        started.append(node)
        return node

    yield start
    for node in started:
        node.stop()


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


@pytest.fixture(name="wait_until")
def wait_until_fixture() -> Callable[..., Any]:
    """The same poll as a fixture, for tests that prefer not to import conftest."""
    return wait_until
