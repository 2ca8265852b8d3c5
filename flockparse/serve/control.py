"""The control API: JSON under /flockparse/v1/ on the serve's server, for attached consoles and scripts.

`add_control_routes(app, balancer, token)` adds the routes to the serve's aiohttp app. The balancer is
synchronous and thread-based, so every call into it runs on a pool of daemon threads (an `ElasticPool`:
a move of minutes holds one thread, never the event loop, and never the interpreter at exit).

- Reads (`GET`) are open unless `require_token_for_reads`; every `POST`/`PUT` needs
  `Authorization: Bearer TOKEN` when a token is set (401 and a one-line JSON error otherwise).
- Every error is `{"error": "one line"}` with its status: 400 a malformed body or value, 401 no or wrong
  token, 404 an unknown path, node, model or operation, 405 a wrong method, 409 a conflict with the
  current state (already a priority model, not one, an operation id in use), 413 a body too large.
- Long calls (`force_*`, `unload`, `optimizer/now`) may carry an `operation` id; `POST /cancel` with it
  sets the call's cancel Event, as Ctrl-C does in a local console.
- `GET /events` is a stream of server-sent events: each core Event as JSON (with `id:` for reconnects),
  a heartbeat comment every `heartbeat_s`, a bounded queue per client. A client that falls behind (its
  queue full, or a write blocked for two heartbeats) is dropped, never waited for: the bus never blocks.
- Every JSON reply says which run of the serve built it and the newest event emitted by then
  (X-Flockparse-Instance, X-Flockparse-Event-Seq): an attached console waits until its stream has brought
  those events, so a command's own move lines never print after its summary.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import hmac
import json
import logging
import math
import os
import secrets
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from flockparse import __version__
from flockparse.balancer import REPORT_QUEUE_CAP, REPORT_SLACK_S, OllamaLoadBalancer
from flockparse.control_client import API_PREFIX, EVENT_SEQ_HEADER, INSTANCE_HEADER
from flockparse.events import Event
from flockparse.rules import ModelNameError, check_model_name, same_model, same_name, unique_names
from flockparse.workers import ElasticPool

logger = logging.getLogger(__name__)

MAX_BODY_BYTES = 64 * 1024
DEFAULT_HEARTBEAT_S = 15.0
# events buffered per stream client before it is dropped: a burst (5,000 nodes coming up) must fit, and the
# frames are shared between clients, so a queue costs a reference per event
DEFAULT_CLIENT_QUEUE = 20_000
REPLAY_EVENTS = 1024  # kept for clients that reconnect with Last-Event-ID
INTERVAL_RANGE_S = (5.0, 30 * 86400.0)  # as the console's --interval (console/config.py RANGES)
OPERATION_ID_MAX = 64
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class BadRequest(Exception):
    """The request cannot be done as asked; `status` and one line for the caller."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


CONTROL_KEY: web.AppKey[Control] = web.AppKey("flockparse_control")


def add_control_routes(
    app: web.Application,
    balancer: OllamaLoadBalancer,
    token: str | None,
    *,
    require_token_for_reads: bool = False,
    heartbeat_s: float = DEFAULT_HEARTBEAT_S,
    client_queue: int = DEFAULT_CLIENT_QUEUE,
) -> None:
    """Add the control API to `app` (before it starts). `token` None or empty: no token is asked for."""
    control = Control(balancer, token, require_token_for_reads, heartbeat_s, client_queue)
    app[CONTROL_KEY] = control
    app.middlewares.append(_json_errors)
    reads: list[tuple[str, Callable[[web.Request], Any]]] = [
        ("/status", control.status),
        ("/vram_report", control.vram_report),
        ("/lb_stats", control.lb_stats),
        ("/nodes", control.nodes),
        ("/known_models", control.known_models),
        ("/optimizer", control.optimizer),
        ("/priorities", control.priorities),
        ("/routing", control.routing),
        ("/route", control.route),
    ]
    for path, handler in reads:
        app.router.add_get(API_PREFIX + path, control.endpoint(handler, mutating=False))
    writes: list[tuple[str, str, Callable[[web.Request], Any]]] = [
        ("POST", "/force_gpu", functools.partial(control.move, "GPU")),
        ("POST", "/force_cpu", functools.partial(control.move, "CPU")),
        ("POST", "/unload", functools.partial(control.move, "unload")),
        ("POST", "/cleanup", control.cleanup),
        ("POST", "/optimizer/on", control.optimizer_on),
        ("POST", "/optimizer/off", control.optimizer_off),
        ("POST", "/optimizer/now", control.optimizer_now),
        ("POST", "/optimizer/interval", control.optimizer_interval),
        ("PUT", "/priorities", control.set_priorities),
        ("POST", "/priorities", control.change_priorities),
        ("POST", "/cancel", control.cancel),
        ("PUT", "/routing", control.set_routing),
    ]
    for method, path, handler in writes:
        app.router.add_route(method, API_PREFIX + path, control.endpoint(handler, mutating=True))
    app.router.add_get(API_PREFIX + "/events", control.events)
    app.on_startup.append(control.on_startup)
    app.on_shutdown.append(control.on_shutdown)
    app.on_cleanup.append(control.on_cleanup)


@web.middleware
async def _json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Under the API prefix, aiohttp's own errors (unknown path, wrong method, body too large) are JSON."""
    if not request.path.startswith(API_PREFIX):
        return await handler(request)
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        if exc.status == 404:
            message = f"no such control path: {request.path} (see README: the control API)"
        elif exc.status == 405:
            allowed = ", ".join(sorted(getattr(exc, "allowed_methods", ()) or ())) or "none"
            message = f"{request.method} is not allowed on {request.path} (allowed: {allowed})"
        elif exc.status == 413:
            message = "the request body is too large"
        else:
            message = exc.reason
        return _error(exc.status, message)


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"error": message}, status=status, headers=headers)


@dataclass(frozen=True)
class _Item:
    seq: int
    frame: bytes  # the whole SSE frame, encoded once for every client


class _Client:
    """One stream reader: its bounded queue lives in the event loop's thread only."""

    def __init__(self, size: int, after: int, transport: asyncio.BaseTransport | None) -> None:
        self.queue: asyncio.Queue[_Item | None] = asyncio.Queue(size)
        self.after = after  # events up to this one were sent already (or are older than the client)
        self.transport = transport
        self.dropped = False

    def offer(self, item: _Item) -> None:
        if self.dropped or item.seq <= self.after:
            return
        try:
            self.queue.put_nowait(item)
        except asyncio.QueueFull:
            self.drop()

    def drop(self) -> None:
        """Too slow: stop serving it (it reconnects and gets what the replay buffer still holds)."""
        self.dropped = True
        if self.transport is not None:
            self.transport.abort()  # a write blocked on a full socket fails now
        self.end()

    def end(self) -> None:
        while not self.queue.empty():
            self.queue.get_nowait()
        self.queue.put_nowait(None)


class EventHub:
    """Core events -> every stream client, without ever blocking the thread that emits.

    `publish` runs on core threads: it numbers the event and encodes it under a lock (memory only), and
    hands it to the event loop with `call_soon_threadsafe`; the loop fans it out to the clients' queues.
    """

    def __init__(self, instance: str, queue_size: int, replay: int = REPLAY_EVENTS) -> None:
        self.instance = instance
        self.queue_size = max(1, queue_size)
        self._lock = threading.Lock()  # guards seq, the replay ring and the loop reference
        self._seq = 0
        self._ring: collections.deque[_Item] = collections.deque(maxlen=replay)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._clients: set[_Client] = set()  # the loop's thread only

    @property
    def seq(self) -> int:
        with self._lock:
            return self._seq

    def attach(self, loop: asyncio.AbstractEventLoop | None) -> None:
        with self._lock:
            self._loop = loop

    def publish(self, event: Event) -> None:
        body = _event_json(event)
        with self._lock:
            self._seq += 1
            frame = b'id: %s-%d\ndata: {"seq": %d, %s\n\n' % (
                self.instance.encode(),
                self._seq,
                self._seq,
                body,
            )
            item = _Item(self._seq, frame)
            self._ring.append(item)
            loop = self._loop
        if loop is None:
            return
        try:
            loop.call_soon_threadsafe(self._fan_out, item)
        except RuntimeError:  # the loop is closed: the serve is stopping, nobody is listening
            logger.debug("event %s not streamed: the event loop is closed", event.kind)

    def _fan_out(self, item: _Item) -> None:
        for client in list(self._clients):
            client.offer(item)

    def join(
        self, last_event_id: str | None, transport: asyncio.BaseTransport | None
    ) -> tuple[_Client, list[_Item]]:
        """A new client (loop thread) and the events it missed, when it reconnects to this same run."""
        with self._lock:
            after, backlog = self._seq, []
            seen = _seen_seq(last_event_id, self.instance)
            if seen is not None and seen < self._seq:
                backlog = [item for item in self._ring if item.seq > seen]
            client = _Client(self.queue_size, after, transport)
        self._clients.add(client)
        return client, backlog

    def leave(self, client: _Client) -> None:
        self._clients.discard(client)

    def end_all(self) -> None:
        for client in list(self._clients):
            client.end()


def _event_json(event: Event) -> bytes:
    """The event as strict JSON without its opening brace (the stream adds `{"seq": N, `); data that
    JSON cannot carry (NaN, odd objects) is sent as its text."""
    fields = {"kind": event.kind, "node": event.node, "model": event.model, "message": event.message}
    try:
        body = json.dumps({**fields, "data": event.data, "time": event.time}, default=str, allow_nan=False)
    except (TypeError, ValueError):
        body = json.dumps({**fields, "data": {"text": str(event.data)}, "time": event.time}, default=str)
    return body[1:].encode()


def _seen_seq(last_event_id: str | None, instance: str) -> int | None:
    """`INSTANCE-SEQ` of this run -> SEQ; anything else (another run, garbage) -> None."""
    if not last_event_id:
        return None
    run, _, number = last_event_id.strip().rpartition("-")
    return int(number) if run == instance and number.isdigit() else None


class Control:
    """The handlers, the token check, the running operations and the event hub of one serve."""

    def __init__(
        self,
        balancer: OllamaLoadBalancer,
        token: str | None,
        require_token_for_reads: bool,
        heartbeat_s: float,
        client_queue: int,
    ) -> None:
        self.balancer = balancer
        self.token = token or None
        self.require_token_for_reads = require_token_for_reads
        self.heartbeat_s = float(heartbeat_s)
        self.instance = secrets.token_hex(6)
        self.started_at = time.time()
        self.hub = EventHub(self.instance, client_queue)
        self.pool = ElasticPool("control", min_workers=2, max_wait=0.05, idle_seconds=30.0)
        self._operations: dict[str, threading.Event] = {}
        self._operations_lock = threading.Lock()  # guards _operations; no I/O
        self._unsubscribe: Callable[[], None] | None = None

    # ------------------------------------------------------------------ lifecycle
    async def on_startup(self, app: web.Application) -> None:
        self.hub.attach(asyncio.get_running_loop())
        self._unsubscribe = self.balancer.subscribe(self.hub.publish)

    async def on_shutdown(self, app: web.Application) -> None:
        """Before the server waits for its handlers: end every event stream (they would never end), and
        cancel the long calls, which then answer with what they did (a load already sent ends on its node)."""
        self.hub.end_all()
        with self._operations_lock:
            running = list(self._operations.values())
        for cancel in running:
            cancel.set()

    async def on_cleanup(self, app: web.Application) -> None:
        if self._unsubscribe is not None:
            self._unsubscribe()
        self.hub.attach(None)
        self.pool.close()

    # ------------------------------------------------------------------ plumbing
    def endpoint(self, handler: Callable[[web.Request], Any], mutating: bool) -> Handler:
        """The token check, errors as one JSON line, and the reply's instance and event position."""

        async def run(request: web.Request) -> web.StreamResponse:
            refused = self._refuse(request, mutating)
            if refused is not None:
                return refused
            try:
                data = await handler(request)
            except BadRequest as exc:
                return _error(exc.status, str(exc))
            except Exception as exc:  # a core bug: one line to the caller, the traceback to the log
                logger.exception("%s %s failed", request.method, request.path)
                return _error(500, f"{request.path} failed: {type(exc).__name__}: {exc}")
            headers = {INSTANCE_HEADER: self.instance, EVENT_SEQ_HEADER: str(self.hub.seq)}
            return web.json_response(data, headers=headers, dumps=_dumps)

        return run

    def refuse_read(self, request: web.Request) -> web.Response | None:
        """The reads' token rule, for routes outside the control API's prefix (`/metrics`)."""
        return self._refuse(request, mutating=False)

    def _refuse(self, request: web.Request, mutating: bool) -> web.Response | None:
        """401 when a token is set and this call needs it but does not carry it, or carries a wrong one (an
        open read too: a client, e.g. the dashboard's token form, learns at once that its token is wrong)."""
        if self.token is None:
            return None
        header = request.headers.get("Authorization", "")
        if not (mutating or self.require_token_for_reads or header):
            return None
        scheme, _, given = header.partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), self.token.encode()):
            return None
        message = "a token is needed: Authorization: Bearer TOKEN" if not given else "wrong token"
        return _error(401, message, headers={"WWW-Authenticate": 'Bearer realm="flockparse"'})

    async def call(self, work: Callable[[], Any]) -> Any:
        """Run a blocking core call on the pool; the loop goes on serving meanwhile."""
        return await asyncio.wrap_future(self.pool.submit(work))

    # ------------------------------------------------------------------ reads
    async def status(self, request: web.Request) -> dict:
        return await self.call(self.status_now)

    def status_now(self) -> dict:
        """What an attached console mirrors: version, nodes, counts, optimizer, priorities, time bounds."""
        balancer = self.balancer
        controller = balancer.controller
        timeout = float(getattr(controller, "timeout", 5.0))
        load = float(getattr(controller, "load_timeout", 300.0))
        verify = float(getattr(controller, "verify_timeout", 30.0))
        priorities = list(balancer.gpu_priority_models)
        return {
            "service": "flockparse",
            "api": 1,
            "version": __version__,
            "instance": self.instance,
            "pid": os.getpid(),
            "started_at": self.started_at,
            "nodes": balancer.nodes,
            "summary": balancer.summary(),
            "optimizer": balancer.optimizer_status(),
            "priority_models": priorities,
            "timeouts": {"timeout": timeout, "load_timeout": load, "verify_timeout": verify},
            "report_timeout_s": REPORT_QUEUE_CAP * (timeout + REPORT_SLACK_S),
            # a probe and a move per node, or one move per priority model in a pass, each load + verify
            "operation_timeout_s": (len(priorities) + 2) * (load + verify) + 4 * timeout,
            "event_seq": self.hub.seq,
        }

    async def vram_report(self, request: web.Request) -> list:
        nodes = request.query.getall("node", [])
        try:
            return await self.call(lambda: self.balancer.vram_report(nodes=nodes or None))
        except ValueError as exc:  # a node not in the cluster
            raise BadRequest(str(exc), 404) from None

    async def lb_stats(self, request: web.Request) -> dict:
        return await self.call(self.balancer.get_stats)

    async def nodes(self, request: web.Request) -> list:
        return await self.call(lambda: [state.as_dict() for state in self.balancer.node_states()])

    async def known_models(self, request: web.Request) -> list:
        return await self.call(self.balancer.known_models)

    async def optimizer(self, request: web.Request) -> dict:
        return await self.call(self.balancer.optimizer_status)

    async def priorities(self, request: web.Request) -> dict:
        return {"priority_models": list(self.balancer.gpu_priority_models)}

    # ------------------------------------------------------------------ actions
    async def move(self, target: str, request: web.Request) -> list:
        """force_gpu / force_cpu / unload: {"model", "nodes"?, "dry_run"?, "force"? (GPU), "operation"?}."""
        fields = {"model": str, "nodes": list, "dry_run": bool, "operation": str}
        body = await _body(request, {**fields, "force": bool} if target == "GPU" else fields)
        if "model" not in body:
            raise BadRequest("missing field `model`")
        model = _model_name(body["model"])
        nodes = _strings(body, "nodes")
        dry_run = bool(body.get("dry_run", False))
        extra = {"force": True} if body.get("force") else {}
        method = {
            "GPU": self.balancer.force_gpu_all_nodes,
            "CPU": self.balancer.force_cpu_all_nodes,
            "unload": self.balancer.unload_all_nodes,
        }[target]
        known = await self.call(self.balancer.known_models)
        if known and not any(same_model(model, name) for name in known):
            raise BadRequest(f"unknown model {model}: no node has it", 404)
        with self._operation(body.get("operation")) as cancel:
            try:
                return await self.call(
                    lambda: method(model, cancel=cancel, nodes=nodes, dry_run=dry_run, **extra)
                )
            except ValueError as exc:  # a node not in the cluster
                raise BadRequest(str(exc), 404) from None

    async def cleanup(self, request: web.Request) -> list:
        """Every non-priority model out of VRAM: {"nodes"?, "dry_run"?, "operation"?}."""
        body = await _body(request, {"nodes": list, "dry_run": bool, "operation": str})
        nodes = _strings(body, "nodes")
        dry_run = bool(body.get("dry_run", False))
        with self._operation(body.get("operation")) as cancel:
            try:
                return await self.call(
                    lambda: self.balancer.cleanup(cancel=cancel, nodes=nodes, dry_run=dry_run)
                )
            except ValueError as exc:  # a node not in the cluster
                raise BadRequest(str(exc), 404) from None

    async def optimizer_on(self, request: web.Request) -> dict:
        await _body(request, {})

        def start() -> dict:
            changed = self.balancer._start_gpu_optimization()  # public in the product spec (its name)
            return {"changed": bool(changed), "optimizer": self.balancer.optimizer_status()}

        return await self.call(start)

    async def optimizer_off(self, request: web.Request) -> dict:
        await _body(request, {})

        def stop() -> dict:
            was_running = self.balancer.optimization_running
            self.balancer.stop_gpu_optimization()
            return {"changed": was_running, "optimizer": self.balancer.optimizer_status()}

        return await self.call(stop)

    async def optimizer_now(self, request: web.Request) -> list:
        body = await _body(request, {"dry_run": bool, "operation": str})
        dry_run = bool(body.get("dry_run", False))
        with self._operation(body.get("operation")) as cancel:
            return await self.call(lambda: self.balancer.optimize_gpu_once(cancel=cancel, dry_run=dry_run))

    async def optimizer_interval(self, request: web.Request) -> dict:
        body = await _body(request, {"seconds": (int, float)})
        seconds = body.get("seconds")
        low, high = INTERVAL_RANGE_S
        if seconds is None:
            raise BadRequest("missing field `seconds`")
        if not math.isfinite(seconds) or not low <= seconds <= high:
            raise BadRequest(f"interval: seconds must be between {low:g} and {high:g}, got {seconds:g}")

        def change() -> dict:
            self.balancer.check_interval = float(seconds)
            return {"changed": True, "optimizer": self.balancer.optimizer_status()}

        return await self.call(change)

    async def routing(self, request: web.Request) -> dict:
        return {"routing": self.balancer.routing}

    async def route(self, request: web.Request) -> dict:
        """?model=NAME: `route MODEL`, which node would serve it next and why."""
        model = request.query.get("model") or None
        return await self.call(lambda: self.balancer.explain_route(model))

    async def set_routing(self, request: web.Request) -> dict:
        """PUT {"routing": STRATEGY}: until the serve restarts (its config's `routing` is the default)."""
        body = await _body(request, {"routing": str})
        if "routing" not in body:
            raise BadRequest("missing field `routing`")
        try:
            self.balancer.routing = body["routing"]
        except ValueError as exc:
            raise BadRequest(f"routing: {exc}") from None
        return {"routing": self.balancer.routing}

    async def set_priorities(self, request: web.Request) -> dict:
        """PUT {"models": [...]}: the whole list (names, globs, `*`)."""
        body = await _body(request, {"models": list})
        if "models" not in body:
            raise BadRequest("missing field `models`")
        models = _priority_names(_strings(body, "models") or [])
        self.balancer.gpu_priority_models = models  # a new list: the optimizer may be iterating the old
        return {"priority_models": list(models)}

    async def change_priorities(self, request: web.Request) -> dict:
        """POST {"add": [...], "remove": [...]}: a change, so two consoles changing the list both count."""
        body = await _body(request, {"add": list, "remove": list})
        add = _priority_names(_strings(body, "add") or [])
        remove = _strings(body, "remove") or []
        current = list(self.balancer.gpu_priority_models)
        for name in remove:
            if not any(same_name(name, c) for c in current):
                shown = ", ".join(current) or "none"
                raise BadRequest(f"{name} is not a priority model (priority: {shown})", 409)
        kept = [c for c in current if not any(same_name(c, name) for name in remove)]
        for name in add:
            if any(same_name(name, c) for c in kept):
                raise BadRequest(f"{name} is already a priority model", 409)
            kept.append(name)
        self.balancer.gpu_priority_models = kept
        return {"priority_models": kept}

    async def cancel(self, request: web.Request) -> dict:
        body = await _body(request, {"operation": str})
        operation = body.get("operation")
        if not operation:
            raise BadRequest("missing field `operation`")
        with self._operations_lock:
            cancel = self._operations.get(operation)
        if cancel is None:
            raise BadRequest(f"no running operation {operation}", 404)
        cancel.set()
        return {"cancelled": True}

    def _operation(self, operation: str | None) -> _Operation:
        if operation is not None and (
            not 0 < len(operation) <= OPERATION_ID_MAX or not operation.replace("-", "").isalnum()
        ):
            raise BadRequest(f"operation: an id of letters, digits and `-`, at most {OPERATION_ID_MAX}")
        return _Operation(self, operation)

    # ------------------------------------------------------------------ the event stream
    async def events(self, request: web.Request) -> web.StreamResponse:
        refused = self._refuse(request, mutating=False)
        if refused is not None:
            return refused
        response = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no",  # a reverse proxy must not buffer the stream
                INSTANCE_HEADER: self.instance,
            }
        )
        await response.prepare(request)
        client, backlog = self.hub.join(request.headers.get("Last-Event-ID"), request.transport)
        hello = {"instance": self.instance, "heartbeat_s": self.heartbeat_s, "seq": client.after}
        if backlog:
            hello["seq"] = backlog[0].seq - 1
        try:
            await self._send(response, b"retry: 1000\nevent: hello\ndata: %s\n\n" % _dumps(hello).encode())
            for item in backlog:
                await self._send(response, item.frame)
            while True:
                try:
                    item = await asyncio.wait_for(client.queue.get(), self.heartbeat_s)
                except TimeoutError:
                    await self._send(response, b": keepalive\n\n")
                    continue
                if item is None:
                    break
                await self._send(response, item.frame)
        except (ConnectionError, TimeoutError) as exc:  # it went away, or stopped reading: drop it
            logger.debug("event stream client %s ended: %s", request.remote, exc)
            client.drop()
        finally:
            self.hub.leave(client)
        return response

    async def _send(self, response: web.StreamResponse, frame: bytes) -> None:
        """A write that cannot finish within two heartbeats means the client stopped reading."""
        await asyncio.wait_for(response.write(frame), timeout=2 * self.heartbeat_s)


class _Operation:
    """A long call's cancel Event, findable by its id while it runs (POST /cancel, and the shutdown)."""

    def __init__(self, control: Control, operation: str | None) -> None:
        self.control, self.operation = control, operation or f"anonymous-{secrets.token_hex(8)}"
        self.cancel = threading.Event()

    def __enter__(self) -> threading.Event:
        with self.control._operations_lock:
            if self.operation in self.control._operations:
                raise BadRequest(f"operation {self.operation} is already running", 409)
            self.control._operations[self.operation] = self.cancel
        return self.cancel

    def __exit__(self, *exc_info: object) -> None:
        with self.control._operations_lock:
            self.control._operations.pop(self.operation, None)


def _dumps(value: Any) -> str:
    return json.dumps(value, default=str)


async def _body(request: web.Request, fields: dict[str, type | tuple[type, ...]]) -> dict:
    """The JSON object in the body (empty body: {}), with only `fields`, each of its type; else 400."""
    raw = await request.read()
    if len(raw) > MAX_BODY_BYTES:
        raise BadRequest(f"the request body is too large (over {MAX_BODY_BYTES // 1024} KiB)", 413)
    if not raw.strip():
        return {}
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise BadRequest(f"the body is not JSON: {str(exc).splitlines()[0][:120]}") from None
    if not isinstance(data, dict):
        raise BadRequest("the body must be a JSON object")
    for key, value in data.items():
        if key not in fields:
            known = ", ".join(f"`{name}`" for name in fields) or "none"
            raise BadRequest(f"unknown field `{key}` (fields: {known})")
        wanted = fields[key]
        if value is None or isinstance(value, bool) is not (wanted is bool) or not isinstance(value, wanted):
            raise BadRequest(f"field `{key}` must be {_type_word(wanted)}")
    return data


def _type_word(wanted: type | tuple[type, ...]) -> str:
    words = {str: "a string", bool: "true or false", list: "a list", int: "a number", float: "a number"}
    return words[wanted[0]] if isinstance(wanted, tuple) else words[wanted]


def _strings(body: dict, key: str) -> list[str] | None:
    values = body.get(key)
    if values is None:
        return None
    if not all(isinstance(value, str) for value in values):
        raise BadRequest(f"field `{key}` must be a list of strings")
    return list(values)


def _model_name(name: str) -> str:
    try:
        return check_model_name(name)
    except ModelNameError as exc:
        raise BadRequest(str(exc)) from None


def _priority_names(names: list[str]) -> list[str]:
    try:
        return unique_names(names, allow_glob=True)
    except ModelNameError as exc:
        raise BadRequest(str(exc)) from None
