"""serve/observe.py in process over real sockets: /metrics under the control API's read token rule, and
/flockparse/v1/history's answers (filtered by model or node, bad windows, history off)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from helpers import LLAMA, wait_until
from prometheus_client.parser import text_string_to_metric_families
from serve_support import ServeThread

from flockparse.console.config import Config
from flockparse.console.services import Services, start_services

HISTORY = "/flockparse/v1/history"


@pytest.fixture
def running() -> Iterator[list[Any]]:
    """Servers and services to stop at the end, servers first."""
    started: list[Any] = []
    yield started
    for thing in started:
        thing.stop() if isinstance(thing, ServeThread) else thing.close()


def test_metrics_need_the_token_only_where_control_reads_do(sim_node, make_balancer, running) -> None:
    nodes = [sim_node(preload=[("llama3.1", "gpu")]), sim_node()]
    balancer = make_balancer([node.url for node in nodes])
    wait_until(lambda: all(state.online for state in balancer.node_states()), "both nodes checked")
    loopback = ServeThread(balancer, token="s3cret").start()
    guarded = ServeThread(balancer, token="s3cret", control_reads_need_token=True).start()
    running.extend([loopback, guarded])

    scraped = requests.get(loopback.url + "/metrics", timeout=10)
    assert scraped.status_code == 200 and scraped.headers["Content-Type"].startswith("text/plain")
    families = {family.name: family for family in text_string_to_metric_families(scraped.text)}
    up = {sample.labels["node"]: sample.value for sample in families["flockparse_node_up"].samples}
    assert up == {node.url: 1.0 for node in nodes}
    assert requests.get(loopback.url + "/api/tags", timeout=10).status_code == 401  # Ollama's API: still

    assert requests.get(guarded.url + "/metrics", timeout=10).status_code == 401
    wrong = requests.get(guarded.url + "/metrics", headers={"Authorization": "Bearer nope"}, timeout=10)
    assert wrong.status_code == 401 and wrong.json() == {"error": "wrong token"}
    right = requests.get(guarded.url + "/metrics", headers={"Authorization": "Bearer s3cret"}, timeout=10)
    assert right.status_code == 200 and "flockparse_node_up" in right.text


def test_history_over_the_control_api(sim_node, make_balancer, running, tmp_path: Path) -> None:
    node = sim_node(preload=[("llama3.1", "cpu"), ("all-minilm", "gpu")])
    config = Config(nodes=[node.url], path=tmp_path / "config.toml")
    balancer = make_balancer([node.url], start=False)
    services = start_services(balancer, config, tmp_path, None)
    running.append(services)
    balancer.start()
    server = ServeThread(balancer, services=services).start()
    running.append(server)
    wait_until(lambda: len(balancer.node_states()[0].models) == 2, "both models seen")
    moved = requests.post(server.url + "/flockparse/v1/force_gpu", json={"model": "llama3.1"}, timeout=30)
    assert moved.status_code == 200

    everything = requests.get(server.url + HISTORY, timeout=10).json()
    assert {pair["model"] for pair in everything["models"]} == {LLAMA, "all-minilm:latest"}
    [llama] = requests.get(
        server.url + HISTORY, params={"target": "llama3.1", "since": "1h"}, timeout=10
    ).json()["models"]
    assert (llama["moves"], llama["now"]) == (1, "gpu")
    by_node = requests.get(server.url + HISTORY, params={"target": node.url}, timeout=10).json()
    assert [n["node"] for n in by_node["nodes"]] == [node.url] and len(by_node["models"]) == 2

    for params, needle in (({"since": "soon"}, "not a duration"), ({"since": "10s"}, "between 1m")):
        bad = requests.get(server.url + HISTORY, params=params, timeout=10)
        assert bad.status_code == 400 and needle in bad.json()["error"]
    bad_name = requests.get(server.url + HISTORY, params={"target": "no such/model!"}, timeout=10)
    assert bad_name.status_code == 400 and bad_name.json()["error"].startswith("target: ")


def test_history_off_is_a_404_with_the_reason(sim_node, make_balancer, running) -> None:
    balancer = make_balancer([sim_node().url])
    server = ServeThread(balancer, services=Services()).start()
    running.append(server)
    reply = requests.get(server.url + HISTORY, timeout=10)
    assert reply.status_code == 404 and "history_days = 0" in reply.json()["error"]
