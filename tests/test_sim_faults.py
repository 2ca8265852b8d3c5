"""Faults and scenarios of the simulator: restart, down, drop, hang, slow, 500, garbage, busy."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import requests
from helpers import wait_until

from ollama_sim import BUSY_TEXT, SimCluster, SimNode

ROOT = Path(__file__).resolve().parent.parent


def ps_names(node, timeout: float = 5) -> dict[str, int]:
    """name -> size_vram, from /api/ps."""
    reply = requests.get(node.url + "/api/ps", timeout=timeout)
    return {m["name"]: m["size_vram"] for m in reply.json()["models"]}


def connect_refused(node) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex(("127.0.0.1", node.port)) != 0


def test_restart_comes_back_with_nothing_loaded_until_a_client_asks(sim_node):
    """routes.go:2023-2028 (SIGTERM -> unloadAllRunners) and sched.go:97 (a new process starts with an
    empty map): after a restart /api/ps is empty; the next automatic load lands on the GPU."""
    node = sim_node(vram_gb=24, preload=[("llama3.1", "gpu"), ("mxbai-embed-large", "auto")])
    assert all(vram > 0 for vram in ps_names(node).values())
    node.restart()
    assert ps_names(node) == {} and node.loaded() == []
    assert node.counts("llama3.1") == {"loads": 0, "unloads": 0}  # counts are kept, not reset or bumped
    requests.post(node.url + "/api/generate", json={"model": "llama3.1"}, timeout=5).raise_for_status()
    (entry,) = requests.get(node.url + "/api/ps", timeout=5).json()["models"]
    assert entry["size_vram"] == entry["size"] > 0
    assert node.counts("llama3.1") == {"loads": 1, "unloads": 0}


def test_restart_with_downtime_refuses_connections_then_recovers_on_the_same_port(sim_node):
    """routes.go:2023-2028: the old process is gone during the downtime; sched.go:97: nothing loaded after."""
    node = sim_node(vram_gb=24, preload=[("llama3.2:3b", "auto")])
    port = node.port
    restarting = threading.Thread(target=node.restart, kwargs={"downtime": 0.5})
    restarting.start()
    wait_until(lambda: connect_refused(node), timeout=5)
    with pytest.raises(requests.ConnectionError):
        requests.get(node.url + "/api/ps", timeout=2)
    restarting.join(timeout=5)
    assert node.port == port
    assert ps_names(node) == {}


def test_down_refuses_connections_and_recovers(sim_node):
    node = sim_node(vram_gb=24)
    session = requests.Session()
    assert session.get(node.url + "/", timeout=2).status_code == 200  # a kept-alive connection
    node.set_fault("down")
    assert connect_refused(node)
    with pytest.raises(requests.ConnectionError):
        session.get(node.url + "/api/tags", timeout=2)
    node.clear_fault()
    assert session.get(node.url + "/api/version", timeout=2).json() == {"version": "0.33.0-rc2"}


def test_drop_closes_without_a_reply(sim_node):
    node = sim_node(vram_gb=24)
    node.set_fault("drop")
    with pytest.raises(requests.ConnectionError):
        requests.get(node.url + "/api/ps", timeout=2)
    node.clear_fault()
    assert requests.get(node.url + "/api/ps", timeout=2).status_code == 200


def test_hang_holds_the_reply_until_cleared(sim_node):
    node = sim_node(vram_gb=24)
    node.set_fault("hang")
    with pytest.raises(requests.ReadTimeout):
        requests.get(node.url + "/api/ps", timeout=0.2)
    result: dict = {}
    waiting = threading.Thread(
        target=lambda: result.update(reply=requests.get(node.url + "/api/version", timeout=10))
    )
    waiting.start()
    wait_until(lambda: len(node.request_log) >= 2, timeout=5)
    node.clear_fault()
    waiting.join(timeout=10)
    assert result["reply"].json() == {"version": "0.33.0-rc2"}


def test_stop_releases_hung_handlers():
    cluster = SimCluster([dict(vram_gb=24)]).start()
    node = cluster.nodes[0]
    node.set_fault("hang")
    errors: list[Exception] = []

    def call() -> None:
        try:
            requests.get(node.url + "/api/ps", timeout=10)
        except requests.RequestException as err:
            errors.append(err)

    caller = threading.Thread(target=call)
    caller.start()
    wait_until(lambda: node.request_log, timeout=5)
    cluster.stop()  # must return although a handler is hung (pytest-timeout guards it)
    caller.join(timeout=5)
    assert not caller.is_alive() and len(errors) == 1


def test_stop_ends_a_load_in_progress(sim_node):
    node = sim_node(vram_gb=24, load_seconds_per_gb=600.0)
    errors: list[Exception] = []
    replies: list[requests.Response] = []

    def load() -> None:
        try:
            replies.append(requests.post(node.url + "/api/generate", json={"model": "llama3.1"}, timeout=10))
        except requests.RequestException as err:
            errors.append(err)

    loader = threading.Thread(target=load)
    loader.start()
    wait_until(lambda: node.loading == "llama3.1:latest", timeout=5)
    node.stop()
    loader.join(timeout=5)
    assert not loader.is_alive()
    assert errors or replies[0].status_code == 500


def test_slow_delays_every_reply(sim_node):
    node = sim_node(vram_gb=24)
    node.set_fault("slow", seconds=0.5)
    with pytest.raises(requests.ReadTimeout):
        requests.get(node.url + "/api/ps", timeout=0.1)
    assert requests.get(node.url + "/api/ps", timeout=5).status_code == 200


def test_error500_garbage_and_busy(sim_node):
    node = sim_node(vram_gb=24)
    node.set_fault("error500")
    reply = requests.get(node.url + "/api/ps", timeout=2)
    assert reply.status_code == 500 and "error" in reply.json()
    node.set_fault("garbage")
    reply = requests.get(node.url + "/api/ps", timeout=2)
    assert reply.status_code == 200
    with pytest.raises(ValueError):
        reply.json()
    node.set_fault("busy")
    reply = requests.post(node.url + "/api/generate", json={"model": "llama3.1"}, timeout=2)
    assert reply.status_code == 503 and reply.json() == {"error": BUSY_TEXT}
    assert BUSY_TEXT == "server busy, please try again.  maximum pending requests exceeded"
    node.clear_fault()
    assert requests.get(node.url + "/api/ps", timeout=2).json() == {"models": []}


def test_fault_limited_to_some_paths(sim_node):
    node = sim_node(vram_gb=24)
    node.set_fault("error500", paths=("/api/generate",))
    assert requests.post(node.url + "/api/generate", json={"model": "llama3.1"}, timeout=2).status_code == 500
    assert requests.get(node.url + "/api/ps", timeout=2).status_code == 200
    assert ps_names(node) == {}


def test_request_log_keeps_the_newest_entries_only(sim_node):
    node = sim_node(vram_gb=24)
    node.request_log_max = 3
    for _ in range(5):
        requests.get(node.url + "/api/version", timeout=5)
    requests.get(node.url + "/api/ps", timeout=5)
    assert len(node.request_log) == 3 and node.request_log[-1] == ("GET", "/api/ps", None)


def test_request_log_and_byte_counters(sim_node):
    node = sim_node(vram_gb=24)
    requests.post(node.url + "/api/generate", json={"model": "llama3.2:3b"}, timeout=5)
    requests.get(node.url + "/api/ps", timeout=5)
    assert node.request_log == [
        ("POST", "/api/generate", {"model": "llama3.2:3b"}),
        ("GET", "/api/ps", None),
    ]
    assert node.bytes_in > len(b'{"model": "llama3.2:3b"}') and node.bytes_out > 200


def test_cluster_nodes_are_independent(sim_cluster):
    cluster = sim_cluster([dict(vram_gb=0), dict(vram_gb=24)])
    assert len(set(cluster.urls)) == 2
    cluster.nodes[0].set_fault("down")
    assert requests.get(cluster.urls[1] + "/", timeout=2).text == "Ollama is running"


def test_command_line_prints_its_url_first_and_serves(tmp_path):
    command = [sys.executable, "-m", "ollama_sim", "--port", "0", "--vram-gb", "24",
               "--preload", "mxbai-embed-large@cpu", "--preload", "llama3.1@auto"]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        url = process.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:")
        models = requests.get(url + "/api/ps", timeout=5).json()["models"]
        placement = {m["name"]: m["size_vram"] > 0 for m in models}
        assert placement == {"mxbai-embed-large:latest": False, "llama3.1:latest": True}
    finally:
        process.terminate()
        process.wait(timeout=10)


def test_expires_at_is_in_the_server_zone_and_created_at_in_utc():
    command = [sys.executable, "-m", "ollama_sim", "--port", "0", "--preload", "all-minilm@auto"]
    env = {**os.environ, "TZ": "SIM-02:30"}  # a POSIX zone 2h30 east of UTC, no tz database needed
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    try:
        url = process.stdout.readline().strip()
        (entry,) = requests.get(url + "/api/ps", timeout=5).json()["models"]
        assert entry["expires_at"].endswith("+02:30")
        loaded = requests.post(url + "/api/generate", json={"model": "llama3.2:3b"}, timeout=5).json()
        assert loaded["created_at"].endswith("Z")
    finally:
        process.terminate()
        process.wait(timeout=10)


def raw_exchange(node, request: bytes) -> bytes:
    """Send exact bytes on a fresh connection and read the reply until the server closes it."""
    with socket.create_connection(("127.0.0.1", node.port), timeout=5) as sock:
        sock.sendall(request)
        chunks = []
        while data := sock.recv(65536):
            chunks.append(data)
    return b"".join(chunks)


def test_byte_counters_count_headers_and_bodies_exactly(sim_node):
    node = sim_node(vram_gb=24)
    body = b'{"model": "llama3.2:3b"}'
    request = (
        b"POST /api/generate HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
        b"Content-Type: application/json\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )
    reply = raw_exchange(node, request)
    assert reply.startswith(b"HTTP/1.1 200 ") and b'"done_reason":"load"' in reply
    assert b"\r\nServer:" not in reply
    wait_until(lambda: node.bytes_out == len(reply), timeout=5)
    assert node.bytes_in == len(request)


def test_head_root_has_headers_but_no_body(sim_node):
    node = sim_node(vram_gb=24)
    reply = raw_exchange(node, b"HEAD / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
    head, _, rest = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ") and b"Content-Length: 17" in head and rest == b""


def test_drop_sends_nothing_back(sim_node):
    node = sim_node(vram_gb=24)
    node.set_fault("drop")
    try:
        reply = raw_exchange(node, b"GET /api/ps HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    except ConnectionResetError:
        reply = b""
    assert reply == b""


def test_installed_models_and_preload_placements(sim_node):
    node = sim_node(
        vram_gb=24,
        models=["llama3.1", "mxbai-embed-large:latest"],
        preload=[("llama3.1", "forced-cpu"), ("mxbai-embed-large", "gpu")],
    )
    tags = requests.get(node.url + "/api/tags", timeout=5).json()["models"]
    assert sorted(m["name"] for m in tags) == ["llama3.1:latest", "mxbai-embed-large:latest"]
    by_name = {m["name"]: m for m in node.loaded()}
    assert (by_name["llama3.1:latest"]["size_vram"], by_name["llama3.1:latest"]["num_gpu"]) == (0, 0)
    embed = by_name["mxbai-embed-large:latest"]
    assert embed["size_vram"] == embed["size"] and embed["num_gpu"] == -1
    reply = requests.post(node.url + "/api/generate", json={"model": "codellama"}, timeout=5)
    assert reply.status_code == 404
    with pytest.raises(ValueError):
        SimNode(models=["no-such-model"])
    with pytest.raises(ValueError, match="does not fit"):
        SimNode(vram_gb=24, preload=[("llama3.1:70b", "gpu")]).start()


def test_command_line_rejects_a_bad_preload():
    command = [sys.executable, "-m", "ollama_sim", "--port", "0", "--preload", "llama3.1@moon"]
    finished = subprocess.run(command, capture_output=True, text=True, timeout=20, cwd=ROOT)
    assert finished.returncode == 1 and "auto|gpu|cpu|forced-cpu" in finished.stderr
