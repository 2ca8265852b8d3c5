"""The simulator's event loop (ollama_sim/engine.py): every SimNode of a process on one loop thread, with
http.server's connection behaviour kept (keep-alive, pipelined requests one at a time, errors, a peer that
leaves mid-request, a slow reader) and stop() closing everything."""

from __future__ import annotations

import json
import socket
import threading

import pytest
from helpers import wait_until

from ollama_sim import SimNode
from ollama_sim.engine import MAX_LINE, head_length

PS = b"GET /api/ps HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"


@pytest.fixture
def node(sim_node) -> SimNode:
    return sim_node(vram_gb=24, preload=[("llama3.2:3b", "gpu")])


def connect(node: SimNode) -> socket.socket:
    return socket.create_connection((node.host, node.port), timeout=10)


def read_reply(sock: socket.socket, buffered: bytearray) -> bytes:
    """One Content-Length reply from `sock` (bytes after it stay in `buffered`)."""
    while b"\r\n\r\n" not in buffered:
        data = sock.recv(65536)
        assert data, f"closed before a reply; got {bytes(buffered)!r}"
        buffered += data
    head, _, _ = bytes(buffered).partition(b"\r\n\r\n")
    length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
    total = len(head) + 4 + length
    while len(buffered) < total:
        data = sock.recv(65536)
        assert data, "closed mid-reply"
        buffered += data
    reply = bytes(buffered[:total])
    del buffered[:total]
    return reply


def read_to_eof(sock: socket.socket) -> bytes:
    chunks = []
    while data := sock.recv(65536):
        chunks.append(data)
    return b"".join(chunks)


def test_pipelined_requests_are_answered_in_order_on_one_connection(node):
    with connect(node) as sock:
        sock.sendall(PS + b"GET /api/version HTTP/1.1\r\nHost: x\r\n\r\n" + PS)
        buffered = bytearray()
        replies = [read_reply(sock, buffered) for _ in range(3)]
    assert [r.split(b"\r\n", 1)[0] for r in replies] == [b"HTTP/1.1 200 OK"] * 3
    assert b'"models":[{"name":"llama3.2:3b"' in replies[0] and replies[0] == replies[2]
    assert b'"version"' in replies[1]
    assert [(m, p) for m, p, _ in node.request_log] == [("GET", "/api/ps"), ("GET", "/api/version")] + [
        ("GET", "/api/ps")
    ]


def test_hundreds_of_pipelined_requests_answered_at_once_are_all_served(sim_node):
    node = sim_node(vram_gb=24)  # no latency: each is answered on the loop as soon as it is read
    count = 1500
    with connect(node) as sock:
        sock.sendall(b"GET /api/version HTTP/1.1\r\nHost: x\r\n\r\n" * count)
        buffered = bytearray()
        replies = [read_reply(sock, buffered) for _ in range(count)]
    assert all(r.startswith(b"HTTP/1.1 200 OK") and r.endswith(b'"}') for r in replies)
    assert len(node.request_log) == count


def test_a_bad_request_line_gets_http_servers_error_and_the_connection_closes(node):
    with connect(node) as sock:
        sock.sendall(b"GARBAGE\r\n\r\n" + PS)
        reply = read_to_eof(sock)
    # one word: http.server takes it for HTTP/0.9, so its error page goes out without a status line
    assert reply.startswith(b"<!DOCTYPE HTML>") and b"<p>Error code: 400</p>" in reply
    assert b"Bad request syntax ('GARBAGE')" in reply and b"HTTP/1.1 200" not in reply  # the next is not read
    assert not node.request_log


def test_unsupported_method_and_too_long_line_as_http_server(node):
    with connect(node) as sock:
        sock.sendall(b"BREW /api/ps HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_to_eof(sock).startswith(b"HTTP/1.1 501 Unsupported method ('BREW')\r\n")
    with connect(node) as sock:
        sock.sendall(b"GET /" + b"a" * (MAX_LINE + 10) + b" HTTP/1.1\r\n\r\n")
        assert read_to_eof(sock).startswith(b"HTTP/1.1 414 Request-URI Too Long\r\n")


def test_expect_100_continue_is_answered_before_the_body_is_sent(node):
    body = b'{"model": "llama3.2:3b"}'
    with connect(node) as sock:
        sock.sendall(
            b"POST /api/show HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: "
            + str(len(body)).encode()
            + b"\r\n\r\n"
        )
        interim = sock.recv(100)
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
        sock.sendall(body)
        reply = read_reply(sock, bytearray())
    assert reply.startswith(b"HTTP/1.1 200 OK") and b'"capabilities"' in reply


def test_a_client_that_closes_mid_request_is_dropped_and_the_node_serves_on(node):
    with connect(node) as sock:
        sock.sendall(b'POST /api/show HTTP/1.1\r\nHost: x\r\nContent-Length: 500\r\n\r\n{"mod')
        wait_until(lambda: len(node._connections) == 1, "the connection accepted")
    wait_until(lambda: not node._connections, "the half-sent request's connection closed")
    assert node.request_log[-1] == ("POST", "/api/show", None)  # handled as http.server did: a short body
    with connect(node) as sock:
        sock.sendall(PS)
        assert read_reply(sock, bytearray()).startswith(b"HTTP/1.1 200 OK")


def test_a_slow_reader_holds_back_only_its_own_reply(sim_node):
    node = sim_node(vram_gb=24)
    other = sim_node(vram_gb=24)  # served by the same loop
    inputs = [f"text number {i} " * 4 for i in range(800)]  # 800 vectors of 1,024 floats: ~17 MB, more
    body = json.dumps({"model": "mxbai-embed-large", "input": inputs}).encode()  # than the kernel buffers
    slow = connect(node)
    slow.sendall(b"POST /api/embed HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
    wait_until(lambda: node.bytes_out > 16 << 20, "the reply written, the reader reading nothing yet")
    for target in (node, other):  # meanwhile both nodes answer others at once
        with connect(target) as sock:
            sock.sendall(PS)
            assert read_reply(sock, bytearray()).startswith(b"HTTP/1.1 200 OK")
    reply = read_reply(slow, bytearray())  # and the slow reader gets all of it, intact
    slow.close()
    vectors = json.loads(reply.partition(b"\r\n\r\n")[2])["embeddings"]
    assert len(vectors) == len(inputs) and len(vectors[0]) == 1024


def test_many_nodes_share_one_loop_thread(sim_cluster):
    before = threading.active_count()
    cluster = sim_cluster([dict(vram_gb=24, preload=[("llama3.2:3b", "gpu")]) for _ in range(40)])
    socks = [socket.create_connection((n.host, n.port), timeout=10) for n in cluster.nodes]
    for sock in socks:
        sock.sendall(PS)
    replies = [read_reply(sock, bytearray()) for sock in socks]
    for sock in socks:
        sock.close()
    assert all(r.startswith(b"HTTP/1.1 200 OK") and b"llama3.2:3b" in r for r in replies)
    assert [t.name for t in threading.enumerate()].count("sim-http") == 1
    assert (
        threading.active_count() - before <= 40 + 1
    )  # each node's expiry thread, one loop: no per connection


def test_a_hung_node_does_not_hold_up_another_on_the_same_loop(sim_node):
    hung, healthy = sim_node(vram_gb=24), sim_node(vram_gb=24)
    hung.set_fault("hang")
    with connect(hung) as stuck:
        stuck.sendall(PS)
        wait_until(lambda: hung.request_log, "the hung request taken")
        with connect(healthy) as sock:
            sock.sendall(PS)
            assert read_reply(sock, bytearray()).startswith(b"HTTP/1.1 200 OK")
        hung.clear_fault()
        assert read_reply(stuck, bytearray()).startswith(b"HTTP/1.1 200 OK")


def test_stop_closes_every_connection_and_refuses_new_ones():
    node = SimNode(vram_gb=24).start()
    idle = [connect(node) for _ in range(3)]
    with connect(node) as busy:
        busy.sendall(PS)
        assert read_reply(busy, bytearray()).startswith(b"HTTP/1.1 200 OK")
    wait_until(lambda: len(node._connections) == 3, "the idle connections accepted")
    node.stop()
    for sock in idle:
        assert read_to_eof(sock) == b""  # closed by the node, nothing sent
        sock.close()
    assert not node._connections
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((node.host, node.port), timeout=2)


@pytest.mark.parametrize(
    ("data", "eof", "expected"),
    [
        (PS, False, len(PS)),
        (PS[:-2], False, 0),  # the blank line has not arrived
        (PS[:-2], True, len(PS) - 2),  # at EOF what arrived is the head
        (b"GET / HTTP/1.1\nHost: x\n\nGET", False, 24),  # bare LF ends lines too (readline)
        (b"GET / HTTP/1.1\r\n" + b"X: y\r\n" * 100 + b"\r\n", False, 16 + 6 * 100 + 2),  # 101 lines: 431
        (b"GET /" + b"a" * MAX_LINE, False, MAX_LINE + 1),  # readline(65537) returns, then 414
        (b"GET / HTTP/1.1\r\nX: " + b"a" * MAX_LINE, False, 16 + MAX_LINE + 1),  # header line too long
    ],
)
def test_head_length_consumes_what_http_server_reads(data, eof, expected):
    assert head_length(bytearray(data), eof) == expected
