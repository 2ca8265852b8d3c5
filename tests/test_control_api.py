"""The control API (flockparse/serve/control.py) over real sockets: a balancer on simulated nodes, served
by an aiohttp app on 127.0.0.1 (the `served` fixture), called through the console's own client
(flockparse/remote.py) and, for malformed requests, through raw HTTP.
"""

from __future__ import annotations

import http.client
import json
import socket
import threading
from collections.abc import Callable
from urllib.parse import urlsplit

import pytest
from helpers import LLAMA, loaded, on_cpu, on_gpu, posts
from serving import ServedApp, control_app

from flockparse.remote import (
    API_PREFIX,
    ControlClient,
    RemoteAuthError,
    RemoteCluster,
    RemoteError,
    RemoteRejected,
    serve_url,
)
from ollama_sim import SimNode

TOKEN = "s3cret-token"


def raw(url: str, method: str, path: str, body: bytes | None = None, headers: dict | None = None) -> tuple:
    """(status, parsed JSON body) of one plain HTTP call: for requests the client would never send."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    try:
        conn.request(method, API_PREFIX + path, body, headers or {})
        response = conn.getresponse()
        return response.status, json.loads(response.read() or b"null")
    finally:
        conn.close()


@pytest.fixture
def node(sim_node: Callable[..., SimNode]) -> SimNode:
    return sim_node(vram_gb=24, preload=[("llama3.1", "gpu"), ("mxbai-embed-large", "gpu")])


@pytest.fixture
def lb(node: SimNode, make_balancer, wait_until):
    balancer = make_balancer([node.url], gpu_priority_models=["mxbai-embed-large"])
    wait_until(lambda: all(s.online and s.installed for s in balancer.node_states()), "the first check")
    return balancer


def test_serve_addresses_are_read_like_node_addresses_with_the_serve_port() -> None:
    assert serve_url("gpu-box") == "http://gpu-box:11435"
    assert serve_url("127.0.0.1:9000") == "http://127.0.0.1:9000"
    assert serve_url("https://lb.example") == "https://lb.example:443"
    for bad in ("ftp://x", "http://u:p@x:1", "http://x:1/path", "", "x y", "http://x:99999"):
        with pytest.raises(ValueError):
            serve_url(bad)


def test_reads_are_open_and_mutating_calls_need_the_token(node: SimNode, lb, served) -> None:
    url = served(lb, TOKEN)
    anonymous = ControlClient(url)
    assert anonymous.request("GET", "/status").data["nodes"] == [node.url]
    for method, path, body in (
        ("POST", "/force_cpu", {"model": "llama3.1"}),
        ("POST", "/optimizer/on", None),
        ("POST", "/priorities", {"add": ["codellama"]}),
        ("PUT", "/priorities", {"models": []}),
        ("POST", "/cancel", {"operation": "x"}),
    ):
        status, reply = raw(url, method, path, json.dumps(body).encode() if body else None)
        assert status == 401 and set(reply) == {"error"} and "\n" not in reply["error"], path
        wrong = {"Authorization": "Bearer not-it"}
        assert raw(url, method, path, json.dumps(body).encode() if body else None, wrong) == (
            401,
            {"error": "wrong token"},
        )
    assert on_gpu(node, LLAMA) and not lb.optimization_running and "codellama" not in lb.gpu_priority_models
    with pytest.raises(RemoteAuthError, match="wants a token: pass --token or set"):
        RemoteCluster(url).force_cpu_all_nodes("llama3.1")

    results = RemoteCluster(url, token=TOKEN).force_cpu_all_nodes("llama3.1")
    assert results[0]["node"] == node.url and results[0]["result"]["reason"] == "moved"
    assert on_cpu(node, LLAMA)


def test_reads_need_the_token_too_when_asked(lb, served) -> None:
    url = served(lb, TOKEN, require_token_for_reads=True)
    assert raw(url, "GET", "/status")[0] == 401
    assert raw(url, "GET", "/events")[0] == 401
    assert ControlClient(url, TOKEN).request("GET", "/status").data["service"] == "flockparse"


def test_the_reports_are_the_cores_own(node: SimNode, lb, served) -> None:
    remote = RemoteCluster(served(lb))
    status = remote.connect()
    assert status["nodes"] == [node.url] and status["summary"]["online"] == 1
    assert status["priority_models"] == ["mxbai-embed-large"] and status["timeouts"]["timeout"] == 3.0

    report = remote.vram_report()
    local = lb.vram_report()
    assert [e["node"] for e in report] == [e["node"] for e in local]
    assert set(report[0]) == set(local[0])  # the shape `vram_report --json` prints
    assert sorted(m["name"] for m in report[0]["models"]) == ["llama3.1:latest", "mxbai-embed-large:latest"]
    assert remote.vram_report(nodes=[node.url])[0]["node"] == node.url

    stats = remote.get_stats()
    assert stats["nodes"][0]["node"] == node.url and "optimizer" in stats
    states = remote.node_states()
    assert states[0].url == node.url and states[0].online is True and states[0].gpu == "yes"
    assert "llama3.1:latest" in remote.known_models()
    assert remote.summary()["total"] == 1 and remote.summary()["serve"]["online"] is True


def test_bad_requests_get_one_json_line_and_the_right_status(lb, served, node: SimNode) -> None:
    url = served(lb, TOKEN)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    cases = [
        ("POST", "/force_gpu", b"{not json", 400, "not JSON"),
        ("POST", "/force_gpu", b"[1, 2]", 400, "JSON object"),
        ("POST", "/force_gpu", b"{}", 400, "missing field `model`"),
        ("POST", "/force_gpu", b'{"model": 3}', 400, "`model` must be a string"),
        ("POST", "/force_gpu", b'{"model": "llama3.1", "dry_run": "yes"}', 400, "true or false"),
        ("POST", "/force_gpu", b'{"model": "llama3.1", "colour": 1}', 400, "unknown field `colour`"),
        ("POST", "/force_gpu", b'{"model": "x\\u001b[2J"}', 400, "not a model name"),
        ("POST", "/force_gpu", b'{"model": "lama3.1"}', 404, "unknown model lama3.1"),
        ("POST", "/force_gpu", b'{"model": "llama3.1", "nodes": ["http://10.9.9.9:1"]}', 404, "not in the"),
        ("POST", "/force_gpu", b'{"model": "llama3.1", "nodes": [5]}', 400, "list of strings"),
        ("POST", "/force_gpu", b'{"model": "llama3.1"}' + b" " * 70000, 413, "too large"),
        ("POST", "/optimizer/interval", b'{"seconds": 1}', 400, "between 5 and"),
        ("POST", "/optimizer/interval", b'{"seconds": true}', 400, "a number"),
        ("POST", "/optimizer/interval", b"", 400, "missing field `seconds`"),
        ("POST", "/priorities", b'{"add": ["llama3.1"], "remove": []}', 200, None),
        ("POST", "/priorities", b'{"add": ["LLaMA3.1:latest"]}', 409, "already a priority model"),
        ("POST", "/priorities", b'{"remove": ["codellama"]}', 409, "not a priority model"),
        ("PUT", "/priorities", b'{"models": ["ok", "bad name!"]}', 400, "not a model name"),
        ("POST", "/cancel", b'{"operation": "nope"}', 404, "no running operation"),
        ("POST", "/force_gpu", b'{"model": "llama3.1", "operation": "a b"}', 400, "operation:"),
        ("GET", "/vram_report?node=http://10.9.9.9:1", None, 404, "not in the cluster"),
        ("GET", "/no_such_thing", None, 404, "no such control path"),
        ("DELETE", "/status", None, 405, "DELETE is not allowed"),
    ]
    for method, path, body, status, words in cases:
        got, reply = raw(url, method, path, body, auth)
        assert got == status, (path, body, reply)
        if words is not None:
            assert set(reply) == {"error"} and words in reply["error"] and "\n" not in reply["error"], reply
    assert lb.gpu_priority_models == ["mxbai-embed-large", "llama3.1"]
    assert not posts(node)  # nothing of that reached a node
    with pytest.raises(RemoteRejected) as refused:
        RemoteCluster(url, token=TOKEN).force_gpu_all_nodes("lama3.1")
    assert refused.value.status == 404 and isinstance(refused.value, ValueError)


def test_optimizer_and_priorities_through_the_api(lb, served) -> None:
    remote = RemoteCluster(served(lb, TOKEN), token=TOKEN)
    remote.connect()
    assert remote._start_gpu_optimization() is True and lb.optimization_running
    assert remote.optimizer_status()["running"] is True
    assert remote._start_gpu_optimization() is False  # already running: still one optimizer
    remote.check_interval = 60
    assert lb.check_interval == 60 and remote.optimizer_status()["interval"] == 60
    remote.stop_gpu_optimization()
    assert not lb.optimization_running and remote.optimizer_status()["running"] is False

    # two consoles change the list at once: each sends its change, neither undoes the other's
    other = RemoteCluster(remote.url, token=TOKEN)
    other.connect()
    mine, theirs = remote.gpu_priority_models, other.gpu_priority_models
    remote.gpu_priority_models = [*mine, "llama3.1"]
    other.gpu_priority_models = [*theirs, "codellama"]
    assert lb.gpu_priority_models == ["mxbai-embed-large", "llama3.1", "codellama"]
    other.gpu_priority_models = [p for p in other.gpu_priority_models if p != "mxbai-embed-large"]
    assert lb.gpu_priority_models == ["llama3.1", "codellama"]


def test_ctrl_c_in_an_attached_console_cancels_the_serves_pass(
    sim_node, make_balancer, served, wait_until
) -> None:
    """As in a local console: the pass returns at once and starts no further move (a load already sent
    finishes on the node)."""
    slow = sim_node(
        vram_gb=24, preload=[("llama3.1", "forced-cpu"), ("codellama", "forced-cpu")], load_seconds_per_gb=0.2
    )
    lb = make_balancer([slow.url], gpu_priority_models=["llama3.1", "codellama"])
    wait_until(lambda: lb.node_states()[0].online, "the first check")
    remote = RemoteCluster(served(lb, TOKEN), token=TOKEN)
    remote.connect()
    cancel = threading.Event()
    box: dict = {}
    worker = threading.Thread(target=lambda: box.update(actions=remote.optimize_gpu_once(cancel)))
    worker.start()
    wait_until(lambda: slow.loading, "the first load to start on the node")
    cancel.set()  # what Ctrl-C does in the console
    worker.join(10)
    assert not worker.is_alive() and isinstance(box["actions"], list)
    wait_until(lambda: lb.optimizer_status()["last_pass"], "the cancelled pass to finish on the serve")
    assert lb.optimizer_status()["last_pass"]["cancelled"] is True
    loads = [body["model"] for _, path, body in posts(slow) if path == "/api/generate"]
    assert len(loads) == 1  # the second model's move never started


def test_a_serve_that_stops_answers_its_long_calls_first(sim_node, make_balancer, wait_until) -> None:
    """Stopping the server cancels the passes and moves in flight: each answers with what it did."""
    slow = sim_node(
        vram_gb=24, preload=[("llama3.1", "forced-cpu"), ("codellama", "forced-cpu")], load_seconds_per_gb=1
    )
    lb = make_balancer([slow.url], gpu_priority_models=["llama3.1", "codellama"])
    wait_until(lambda: lb.node_states()[0].online, "the first check")
    app = ServedApp(control_app(lb, TOKEN))
    remote = RemoteCluster(app.start(), token=TOKEN)
    remote.connect()
    box: dict = {}
    worker = threading.Thread(target=lambda: box.update(actions=remote.optimize_gpu_once()))
    worker.start()
    wait_until(lambda: slow.loading, "the first load to start on the node")
    app.stop()
    worker.join(10)
    assert not worker.is_alive() and isinstance(box.get("actions"), list)


class HostileServe:
    """A listener that answers every request with `reply(conn)`: for what a real serve never does."""

    def __init__(self, reply: Callable[[socket.socket], None]) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.reply = reply
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.conns.append(conn)
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _answer(self, conn: socket.socket) -> None:
        conn.recv(65536)
        try:
            self.reply(conn)
        except OSError:  # the client gave up and closed: what the test wants to see
            conn.close()

    def close(self) -> None:
        self.listener.close()
        for conn in self.conns:
            conn.close()


def trickle(conn: socket.socket) -> None:
    stop = threading.Event()
    for byte in b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + b" " * 100000:
        conn.sendall(bytes([byte]))
        stop.wait(0.05)


@pytest.mark.parametrize(
    ("reply", "words"),
    [
        (trickle, "did not answer /status within 0.5s"),
        (lambda c: c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 999999999\r\n\r\n{"), "too large to read"),
        (lambda c: c.sendall(b"HTTP/1.1 302 Found\r\nLocation: http://evil/\r\nContent-Length: 0\r\n\r\n"),
         "redirected /status to http://evil/: not followed"),
        (lambda c: c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"), "not JSON"),
        (lambda c: c.sendall(b"SSH-2.0-OpenSSH\r\n"), "/status failed (the reply is not HTTP"),
    ],
)  # fmt: skip
def test_the_client_bounds_every_call(reply: Callable[[socket.socket], None], words: str) -> None:
    """A total deadline (not per read), a reply cap, no redirect, one line: whatever answers at the URL."""
    hostile = HostileServe(reply)
    try:
        with pytest.raises(RemoteError) as failed:
            ControlClient(hostile.url, timeout=0.5).request("GET", "/status")
    finally:
        hostile.close()
    assert words in str(failed.value) and "\n" not in str(failed.value)


def test_routing_and_route_go_to_the_serve(node: SimNode, lb, served) -> None:
    """An attached console's `routing` and `route` are the serve's, not a local copy (a new user found
    `route` raising AttributeError and `routing NAME` changing nothing on the serve)."""
    remote = RemoteCluster(served(lb))
    remote.connect()
    assert remote.routing == lb.routing == "adaptive"

    remote.routing = "round_robin"

    assert lb.routing == "round_robin" and remote.routing == "round_robin"
    explained = remote.explain_route("llama3.1")
    assert explained["routing"] == "round_robin" and [n["node"] for n in explained["nodes"]] == [node.url]
    with pytest.raises(ValueError, match="routing"):
        remote.routing = "fastest"
    assert lb.routing == "round_robin"


def test_cleanup_and_a_forced_move_through_the_api(node: SimNode, lb, served) -> None:
    remote = RemoteCluster(served(lb, TOKEN), token=TOKEN)
    remote.connect()
    [dry] = remote.cleanup(dry_run=True)  # priority: mxbai-embed-large; llama3.1 holds VRAM
    assert (dry["model"], dry["result"]["reason"]) == ("llama3.1:latest", "would_unload")
    [done] = remote.cleanup()
    assert done["result"]["reason"] == "unloaded" and loaded(node, "llama3.1:latest") is None
    [moved] = remote.force_gpu_all_nodes("llama3.1", force=True)
    assert moved["result"]["reason"] == "moved" and on_gpu(node, "llama3.1:latest")
    status, body = raw(remote.url, "POST", "/force_cpu", b'{"model": "llama3.1", "force": true}',
                       {"Authorization": f"Bearer {TOKEN}"})  # fmt: skip
    assert status == 400 and "force" in body["error"]


def test_a_wrong_token_is_refused_even_on_an_open_read(lb, served) -> None:
    """Reads are open on loopback, but a client that sends a token learns at once that it is wrong (the
    dashboard's token form says so instead of keeping it)."""
    url = served(lb, TOKEN)
    assert raw(url, "GET", "/status")[0] == 200
    assert raw(url, "GET", "/status", headers={"Authorization": "Bearer nope"}) == (
        401,
        {"error": "wrong token"},
    )
    assert raw(url, "GET", "/status", headers={"Authorization": f"Bearer {TOKEN}"})[0] == 200
