"""The status poller (flockparse/poller.py): every /api/ps read on one selector thread (issue 8, scale).

The hostile-node rules (deadline, cap, no redirect, identity only, one-phrase causes) are tested through
`GPUController.get_model_status` in test_transport.py, which reads through the poller; here: what the
poller adds (connections kept and replaced, one node never delaying another, close) and the monitor's
light path for a reply that did not change.
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator

import pytest
from helpers import LLAMA, wait_until
from hostile import HostileNode, Request, answer, reply

from flockparse.poller import PollReply, StatusPoller
from flockparse.transport import NodeTransport
from gpu_controller import GPUController

PS_EMPTY = json.dumps({"models": []}).encode()
FAST = 0.5


@pytest.fixture
def poller() -> Iterator[StatusPoller]:
    transport = NodeTransport()
    status_poller = StatusPoller(transport)
    yield status_poller
    status_poller.close()
    transport.close()


class Replies:
    """Collects PollReply objects in the order they arrive; `wait(n)` waits for n of them."""

    def __init__(self) -> None:
        self.items: list[PollReply] = []
        self._lock = threading.Lock()

    def __call__(self, reply: PollReply) -> None:
        with self._lock:
            self.items.append(reply)

    def wait(self, count: int) -> list[PollReply]:
        wait_until(lambda: len(self.items) >= count, f"{count} replies")
        with self._lock:
            return list(self.items)


def test_reads_reuse_one_connection_per_node(poller) -> None:
    with HostileNode(answer("200 OK", PS_EMPTY)) as node:
        replies = Replies()
        for _ in range(3):
            assert poller.get(node.url, "/api/ps", FAST, replies)
            replies.wait(len(replies.items) + 1)

        assert [(r.status, r.body, r.error) for r in replies.items] == [(200, PS_EMPTY, None)] * 3
        assert node.accepted == 1 and len(node.requests) == 3


def test_a_connection_the_node_closed_while_idle_is_replaced(poller) -> None:
    def answer_then_close(conn: socket.socket, request: Request, node: HostileNode) -> bool:
        node.send(conn, reply("200 OK", PS_EMPTY))  # a keep-alive reply, then the node closes anyway
        return False

    with HostileNode(answer_then_close) as node:
        replies = Replies()
        poller.get(node.url, "/api/ps", FAST, replies)
        replies.wait(1)
        wait_until(lambda: node.finished == 1, "the node closed the idle connection")
        poller.get(node.url, "/api/ps", FAST, replies)

        assert [r.error for r in replies.wait(2)] == [None, None] and node.accepted == 2


def test_a_hung_node_never_delays_another(poller) -> None:
    def never_answer(conn: socket.socket, request: Request, node: HostileNode) -> bool:
        node.stopping.wait()
        return False

    with HostileNode(never_answer) as hung, HostileNode(answer("200 OK", PS_EMPTY)) as healthy:
        replies = Replies()
        poller.get(hung.url, "/api/ps", FAST, replies)
        poller.get(healthy.url, "/api/ps", FAST, replies)

        first, second = replies.wait(2)

    assert (first.node_url, first.error) == (healthy.url, None)
    assert second.node_url == hung.url and second.error is not None
    assert second.error.message == f"{hung.url} did not answer /api/ps within {FAST:g}s"


def test_a_refused_connection_is_one_phrase(poller) -> None:
    with socket.socket() as bound:  # bound, never listening: the kernel refuses connections to it
        bound.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{bound.getsockname()[1]}"
        replies = Replies()
        poller.get(url, "/api/ps", FAST, replies)
        (only,) = replies.wait(1)
    assert only.error is not None and only.error.message == f"{url} is unreachable (connection refused)"


def test_a_name_is_resolved_off_the_poller_thread(poller, sim_node) -> None:
    node = sim_node()
    url = node.url.replace("127.0.0.1", "localhost")
    replies = Replies()
    poller.get(url, "/api/ps", 3.0, replies)
    (only,) = replies.wait(1)
    assert only.error is None and only.status == 200 and json.loads(only.body) == {"models": []}


def test_close_answers_what_is_pending_and_sends_nothing_more() -> None:
    def never_answer(conn: socket.socket, request: Request, node: HostileNode) -> bool:
        node.stopping.wait()
        return False

    transport = NodeTransport()
    poller = StatusPoller(transport)
    with HostileNode(never_answer) as node:
        replies = Replies()
        poller.get(node.url, "/api/ps", 30.0, replies)
        wait_until(lambda: len(node.requests) == 1, "the read was sent")

        poller.close()

        (only,) = replies.wait(1)
        assert only.error is not None and only.error.reason == "cancelled"
        assert poller.get(node.url, "/api/ps", 30.0, replies) is False
        assert len(node.requests) == 1
    transport.close()


def test_https_nodes_are_left_to_the_threaded_path(poller) -> None:
    assert poller.get("https://127.0.0.1:1", "/api/ps", FAST, Replies()) is False


# ------------------------------------------------------------------------ the monitor's light path
def test_an_unchanged_reply_is_not_parsed_and_a_changed_one_is(sim_node, make_balancer) -> None:
    """The steady state costs a byte comparison: the status is parsed only when the reply changed."""
    node = sim_node(preload=[("llama3.1", "forced-cpu")])
    controller = GPUController(timeout=3.0, load_timeout=20.0, verify_timeout=10.0)
    parsed: list[str] = []
    status_from_raw = controller.status_from_raw

    def counting(raw):  # type: ignore[no-untyped-def]
        parsed.append(raw.node_url)
        return status_from_raw(raw)

    controller.status_from_raw = counting  # type: ignore[method-assign]
    balancer = make_balancer([node.url], health_interval=0.05, controller=controller)
    wait_until(lambda: balancer.node_state(node.url).online, "node up")
    seen = balancer.node_state(node.url).last_seen
    wait_until(lambda: balancer.node_state(node.url).last_seen != seen, "a later check")
    parsed.clear()
    later = balancer.node_state(node.url).last_seen
    wait_until(lambda: balancer.node_state(node.url).last_seen != later, "one more check")

    assert parsed == []  # checked again (last_seen moved) without parsing the same reply

    node.set_fault("down")
    wait_until(lambda: balancer.node_state(node.url).online is False, "the change is seen")
    node.clear_fault()
    wait_until(lambda: balancer.node_state(node.url).online, "back up")
    assert parsed and balancer.node_state(node.url).models[0]["name"] == LLAMA


def test_requests_beyond_the_limit_wait_their_turn_and_all_complete(poller, monkeypatch) -> None:
    """A cluster starting up does not send thousands of requests at once (they would only queue)."""
    monkeypatch.setattr("flockparse.poller.MAX_IN_FLIGHT", 1)
    with (
        HostileNode(answer("200 OK", PS_EMPTY)) as first,
        HostileNode(answer("200 OK", PS_EMPTY)) as second,
        HostileNode(answer("200 OK", PS_EMPTY)) as third,
    ):
        replies = Replies()
        for node in (first, second, third):
            poller.get(node.url, "/api/ps", FAST, replies)

        got = replies.wait(3)

    assert sorted(r.node_url for r in got) == sorted([first.url, second.url, third.url])
    assert all(r.error is None and r.status == 200 for r in got)


def test_a_failure_inside_the_poller_ends_that_read_and_not_the_others(poller, monkeypatch) -> None:
    """A bug met on one connection answers its read with an error; the poller goes on serving."""
    with HostileNode(answer("200 OK", PS_EMPTY)) as broken, HostileNode(answer("200 OK", PS_EMPTY)) as fine:
        receive = StatusPoller._receive

        def failing(self, channel, sock):  # type: ignore[no-untyped-def]
            if channel.node == broken.url:
                raise RuntimeError("a bug")
            return receive(self, channel, sock)

        monkeypatch.setattr(StatusPoller, "_receive", failing)
        replies = Replies()
        poller.get(broken.url, "/api/ps", FAST, replies)
        (first,) = replies.wait(1)
        poller.get(fine.url, "/api/ps", FAST, replies)
        _, second = replies.wait(2)

    assert first.error is not None and "failed inside the client (RuntimeError)" in first.error.message
    assert (second.node_url, second.error, second.status) == (fine.url, None, 200)
