"""serve against a hostile node (tests/hostile.py: behaviours no Ollama has): a compressed, redirected,
oversized or non-JSON reply is refused before any byte reaches the client, and the request is served by
another node; the node's failure is counted and named in one phrase."""

from __future__ import annotations

import gzip
import json
import socket

import pytest
import requests
from helpers import LLAMA, wait_until
from hostile import HostileNode, Request, reply
from serve_support import ServeThread

MIB = 1024 * 1024
IN_VRAM = {"name": LLAMA, "model": LLAMA, "size": 10, "size_vram": 10, "digest": "0" * 64, "details": {}}
STATUS = {
    "/api/ps": reply("200 OK", json.dumps({"models": [IN_VRAM]}).encode()),
    "/api/tags": reply("200 OK", json.dumps({"models": [{"name": LLAMA, "model": LLAMA}]}).encode()),
    "/api/version": reply("200 OK", b'{"version":"0.33.0"}'),
}
DONE = b'{"model":"llama3.1","response":"hi","done":true}'


def by_path(replies: dict[str, bytes]) -> object:
    """Each path answered with its own prepared reply (404 otherwise), keep-alive."""

    def behave(conn: socket.socket, request: Request, node: HostileNode) -> bool:
        return node.send(conn, replies.get(request.path, reply("404 Not Found", b"404 page not found")))

    return behave


@pytest.mark.parametrize(
    ("generate_reply", "why"),
    [
        (
            reply("200 OK", gzip.compress(DONE), {"Content-Encoding": "gzip"}),
            "gzip-encoded /api/generate reply",
        ),
        (reply("302 Found", b"", {"Location": "http://127.0.0.1:9/x"}), "redirect to http://127.0.0.1:9/x"),
        (reply("200 OK", b"{", {"Content-Length": str(17 * MIB)}), "reply too large to read (over 16 MiB)"),
        (reply("200 OK", b"<html>hello</html>"), "the reply is not a JSON object"),
    ],
    ids=["gzip", "redirect", "oversized", "not-json"],
)
def test_a_hostile_reply_is_refused_and_served_by_another_node(
    sim_node, make_balancer, generate_reply: bytes, why: str
) -> None:
    spare = sim_node(preload=[("llama3.1", "cpu")])
    with HostileNode(by_path({**STATUS, "/api/generate": generate_reply})) as bad:
        balancer = make_balancer([bad.url, spare.url])
        wait_until(lambda: all(s.online and s.installed for s in balancer.node_states()), "both checked")
        assert balancer.pick_node("llama3.1") == bad.url  # it claims the model 100% in VRAM
        with ServeThread(balancer) as server:
            body = {"model": "llama3.1", "prompt": "hi", "stream": False}
            answer = requests.post(server.url + "/api/generate", json=body, timeout=30)
        assert answer.status_code == 200 and answer.json()["done"] is True
        assert sum(r.path == "/api/generate" for r in bad.requests) == 1
    stats = {node["node"]: node for node in balancer.get_stats()["nodes"]}
    assert stats[bad.url]["errors"] == 1 and why in stats[bad.url]["last_request_error"]
    assert stats[spare.url]["errors"] == 0
