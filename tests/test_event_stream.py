"""The serve's event stream (GET /flockparse/v1/events, server-sent events) and the attached console's
reader of it (RemoteCluster): order, heartbeats, replay on reconnect, a slow client dropped without
holding anyone up, and one notice each when the serve goes away and comes back.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable
from urllib.parse import urlsplit

import pytest
from helpers import wait_until
from serving import ServedApp, control_app

from flockparse.events import Event
from flockparse.remote import API_PREFIX, RemoteCluster

EVENTS = 1500


class Collected:
    """Events a RemoteCluster delivered, in the order delivered."""

    def __init__(self, remote: RemoteCluster) -> None:
        self.events: list[Event] = []
        self._lock = threading.Lock()
        remote.subscribe(self._add)

    def _add(self, event: Event) -> None:
        with self._lock:
            self.events.append(event)

    def messages(self, kind: str | None = None) -> list[str]:
        with self._lock:
            return [e.message for e in self.events if kind is None or e.kind == kind]


def attached(url: str, **options) -> tuple[RemoteCluster, Collected]:
    remote = RemoteCluster(url, **options)
    remote.connect()
    seen = Collected(remote)
    remote.start()
    wait_until(lambda: remote._stream_live, "the event stream to open")
    return remote, seen


def open_stream(url: str, last_event_id: str | None = None, rcvbuf: int | None = None) -> socket.socket:
    """A raw stream client: the request sent, nothing read yet."""
    parts = urlsplit(url)
    sock = socket.socket()
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(10)
    sock.connect((parts.hostname, parts.port))
    extra = f"Last-Event-ID: {last_event_id}\r\n" if last_event_id else ""
    sock.sendall(f"GET {API_PREFIX}/events HTTP/1.1\r\nHost: x\r\n{extra}\r\n".encode())
    return sock


def read_until(sock: socket.socket, predicate: Callable[[bytes], bool], what: str) -> bytes:
    data = b""
    deadline = time.monotonic() + 10
    while not predicate(data):
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}; got {data[-500:]!r}")
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def stream_messages(raw: bytes) -> list[str]:
    """The `message` of every whole event in a raw HTTP/1.1 chunked stream (a cut-off tail is ignored)."""
    body, rest = b"", raw.split(b"\r\n\r\n", 1)[1]
    while rest:
        size_line, _, rest = rest.partition(b"\r\n")
        size = int(size_line, 16) if size_line.strip() else 0
        if size == 0 or len(rest) < size:
            break
        body, rest = body + rest[:size], rest[size + 2 :]
    messages = []
    for frame in body.split(b"\n\n"):
        for line in frame.split(b"\n"):
            if line.startswith(b'data: {"seq'):
                messages.append(json.loads(line[6:])["message"])
    return messages


def test_events_arrive_in_order_at_every_client(make_balancer, served) -> None:
    lb = make_balancer([])
    url = served(lb)
    clients = [attached(url) for _ in range(2)]
    for number in range(300):
        lb.events.emit(Event("node_up", node="http://n:1", message=f"event {number}"))
    for remote, seen in clients:
        wait_until(lambda s=seen: len(s.messages("node_up")) == 300, "all 300 events")
        assert seen.messages("node_up") == [f"event {n}" for n in range(300)]
        assert seen.events[0].node == "http://n:1" and seen.events[0].kind == "node_up"
        remote.close()


def test_a_client_that_stops_reading_is_dropped_and_holds_up_nobody(make_balancer, served) -> None:
    lb = make_balancer([])
    url = served(lb, client_queue=200, heartbeat_s=60.0)  # only a full queue drops a client here
    remote, seen = attached(url)
    slow = open_stream(url, rcvbuf=4096)  # sends its request, then never reads
    received = read_until(slow, lambda data: b"event: hello" in data, "the slow client's hello")
    padding = "x" * 8000
    for batch in range(EVENTS // 100):  # 12 MB in all: three times what the kernel buffers for the slow one
        for number in range(batch * 100, batch * 100 + 100):
            lb.events.emit(Event("node_up", message=f"event {number}", data={"padding": padding}))
        wait_until(
            lambda b=batch: len(seen.messages("node_up")) == b * 100 + 100, "the batch at the reader", 60
        )
    assert seen.messages("node_up") == [f"event {n}" for n in range(EVENTS)]
    assert not seen.messages("serve_lost")  # the reading client was never dropped
    # the slow one was: it gets what it had buffered, then the end of its stream
    try:
        while chunk := slow.recv(1 << 20):
            received += chunk
    except ConnectionResetError:  # an abort may reset the connection instead of closing it
        received += b"(reset)"
    slow.close()
    messages = stream_messages(received)
    assert len(messages) < EVENTS and messages == [f"event {n}" for n in range(len(messages))]
    remote.close()


def test_a_heartbeat_keeps_an_idle_stream_alive(make_balancer, served) -> None:
    url = served(make_balancer([]), heartbeat_s=0.2)
    sock = open_stream(url)
    data = read_until(sock, lambda d: d.count(b": keepalive") >= 2, "two heartbeats")
    sock.close()
    assert b"200 OK" in data and b"text/event-stream" in data and b"event: hello" in data


def test_a_client_that_reconnects_gets_what_it_missed(make_balancer, served) -> None:
    lb = make_balancer([])
    url = served(lb)
    first = open_stream(url)
    hello = read_until(first, lambda d: b"}\n\n" in d.partition(b"event: hello")[2], "the hello")
    instance = json.loads(hello.partition(b"event: hello\ndata: ")[2].partition(b"\n")[0])["instance"]
    for number in range(10):
        lb.events.emit(Event("node_up", message=f"event {number}"))
    read_until(first, lambda d: b"event 9" in d, "ten events")
    first.close()
    again = open_stream(url, last_event_id=f"{instance}-6")
    data = read_until(again, lambda d: b"event 9" in d, "the replay")
    again.close()
    assert stream_messages(data) == ["event 6", "event 7", "event 8", "event 9"]


def test_the_console_says_once_when_the_serve_goes_and_once_when_it_is_back(make_balancer) -> None:
    lb = make_balancer([])
    app = ServedApp(control_app(lb, heartbeat_s=0.5))
    url = app.start()
    remote, seen = attached(url, reconnect_max=0.3)
    app.stop()
    wait_until(lambda: seen.messages("serve_lost"), "the lost notice")
    wait_until(lambda: remote.summary()["serve"]["online"] is False, "the toolbar's view")
    again = ServedApp(control_app(lb, heartbeat_s=0.5), port=app.port)
    again.start()
    try:
        wait_until(lambda: seen.messages("serve_back"), "the back notice")
        lb.events.emit(Event("node_up", message="after the restart"))
        wait_until(lambda: "after the restart" in seen.messages("node_up"), "events from the new run")
    finally:
        remote.close()
        again.stop()
    assert len(seen.messages("serve_lost")) == 1 and len(seen.messages("serve_back")) == 1
    assert "it restarted" in seen.messages("serve_back")[0]


def test_a_serve_that_hangs_is_noticed_by_its_missing_heartbeats() -> None:
    """A stream that sends its hello and then nothing (the serve hung) is judged dead after three
    heartbeats, not waited on for ever."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    accepted: list[socket.socket] = []

    def fake_serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            accepted.append(conn)
            request = conn.recv(65536)
            if b"/events" in request:
                conn.sendall(
                    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\r\n"
                    b'event: hello\ndata: {"instance": "a", "heartbeat_s": 0.2, "seq": 0}\n\n'
                )  # and then nothing, ever
            else:
                body = json.dumps({"service": "flockparse", "nodes": [], "summary": {}}).encode()
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
                conn.close()

    threading.Thread(target=fake_serve, daemon=True).start()
    remote, seen = attached(f"http://127.0.0.1:{port}", reconnect_max=0.3)
    try:
        wait_until(lambda: seen.messages("serve_lost"), "the lost notice")
        assert "no event or heartbeat for 0.6s" in seen.messages("serve_lost")[0]
    finally:
        remote.close()
        listener.close()
        for conn in accepted:
            conn.close()


def test_an_event_json_cannot_carry_arrives_as_text_and_node_text_stays_text(make_balancer, served) -> None:
    lb = make_balancer([])
    remote, seen = attached(served(lb))
    lb.events.emit(Event("node_up", message="odd", data={"latency": float("nan")}))
    lb.events.emit(Event("node_down", message="x\x1b[2J\n\u202e", data={"error": "\x07"}))
    wait_until(lambda: seen.messages("node_down"), "both events")
    odd, hostile = seen.events
    assert odd.data == {"text": "{'latency': nan}"}
    assert hostile.message == "x\x1b[2J\n\u202e" and hostile.data == {"error": "\x07"}  # rendering escapes it
    remote.close()
