"""serve's HTTP application: Ollama's API in front of the cluster (aiohttp: one event loop, every stream).

What each path does (README "serve" says the same for users):
- `/api/generate`, `/api/chat`, `/api/embed`, `/api/embeddings`, `/api/show`: the request's bytes go, as
  they are, to the node routing chooses for its `model` (flockparse/routing.py through the balancer's
  `pick_node`); a streamed reply is relayed chunk by chunk as the node sends it, a whole one when whole.
  A request that failed before any byte reached the client (refused, reset, timed out, the node's 5xx or
  404, a redirect, a compressed or oversized reply) is sent to the next node, MAX_ATTEMPTS nodes at most;
  one that fails mid-stream ends with an Ollama-style `{"error": "..."}` line, never a silent cut. A 4xx
  other than 404 is the caller's own mistake: handed back as the node said it, not retried.
- `/api/tags`, `/api/ps`: the union over the nodes that answer within the timeout (serve/cluster.py).
- `/`, `/api/version`: as Ollama answers them (`Ollama is running`; the cluster's lowest version).
- `/api/status`: forwarded to one node. `/api/pull`, `/api/push`, `/api/create`, `/api/copy`,
  `/api/delete`, `/api/blobs/...`: 501 with what to do instead (they change one node's model store: run
  them against that node). Unknown paths: Ollama's `404 page not found`; a wrong method: `405 method not
  allowed`.
- With a token, every request must carry `Authorization: Bearer TOKEN` (401 otherwise); the token is never
  sent on to a node. Paths under CONTROL_PREFIX are the control API's (serve/control.py, added by
  `build_app`), which checks its token itself and ends its event streams at shutdown; they are not counted
  among the requests the shutdown's grace period waits for. `/metrics` (serve/observe.py) follows the
  control API's read rule: it needs the token only beyond loopback. The dashboard's page and assets
  (`/flockparse/dashboard/`, flockparse/dashboard/) hold no data and need no token.

The balancer's core is synchronous and thread-based; handlers call only its lock-only methods (pick_node,
request_started/finished, node_states) directly; every node call is asynchronous (serve/upstream.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import web

from flockparse.dashboard.routes import add_dashboard_routes
from flockparse.request_stats import Sample, eval_metrics
from flockparse.rules import canonical_name
from flockparse.serve import cluster, upstream
from flockparse.serve.control import add_control_routes
from flockparse.serve.observe import METRICS_PATH, add_observe_routes
from flockparse.transport import MIB, NodeError, reply_limit

CONTROL_PREFIX = "/flockparse/"  # the control API's paths (issue 10 item 5): guarded by its own routes
ROUTED_POSTS = ("/api/generate", "/api/chat", "/api/embed", "/api/embeddings", "/api/show")
NOT_BALANCED = {  # path -> methods: Ollama's model-store paths, which change one node, not the cluster
    "/api/pull": ("POST",),
    "/api/push": ("POST",),
    "/api/create": ("POST",),
    "/api/copy": ("POST",),
    "/api/delete": ("DELETE",),
    "/api/blobs/{digest}": ("POST", "HEAD"),
}
MAX_ATTEMPTS = 3  # nodes one request is tried on, at most
CUT_WAIT_S = 2.0  # at the end of the grace period, how long cut requests may take to say so
MAX_BODY_BYTES = 256 * MIB  # a request body (embedding batches, chat with images), at most
PARSE_OFF_LOOP_BYTES = 256 * 1024  # a larger body is parsed on a worker thread, not on the event loop
OLLAMA_RUNNING = "Ollama is running"
PROXY_KEY: web.AppKey[Proxy] = web.AppKey("flockparse_proxy")


@dataclass
class Failed:
    """One attempt that got no usable answer: why (one phrase), and the node's own error reply if any."""

    message: str
    status: int | None = None
    body: bytes = b""


class Proxy:
    """The data plane: routes each request to a node and relays the answer (see the module docstring)."""

    def __init__(
        self,
        balancer: Any,
        request_timeout: float,
        chunk_timeout: float,
        connect_timeout: float,
        read_timeout: float,
    ) -> None:
        self.balancer = balancer
        self.request_timeout = request_timeout  # headers of a reply (a model load) / a whole reply
        self.chunk_timeout = chunk_timeout  # between two chunks of a stream
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout  # /api/tags and /api/ps from every node (the core's --timeout)
        self.session: aiohttp.ClientSession | None = None
        self._handlers: set[asyncio.Task] = set()  # requests being handled (their tasks)
        self._idle: asyncio.Event | None = None  # set while no request is being handled
        self.cutting = False  # the shutdown grace period is over: requests still running are cut
        self.cut = 0  # requests cut at the end of the grace period

    @property
    def in_flight(self) -> int:
        return len(self._handlers)

    async def drain(self, grace: float) -> int:
        """Shutdown: let the requests in flight finish within `grace` seconds, then cut the others (a
        stream ends with an error line, a request not answered yet gets a 503); returns how many were cut.
        The caller has stopped accepting connections already."""
        assert self._idle is not None
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), grace)
        if not self._handlers:
            return 0
        self.cutting = True
        for task in list(self._handlers):
            task.cancel()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), CUT_WAIT_S)
        return self.cut

    def handling(self, task: asyncio.Task) -> None:
        """A request's handler began (the in-flight middleware)."""
        assert self._idle is not None
        self._handlers.add(task)
        self._idle.clear()

    def handled(self, task: asyncio.Task) -> None:
        assert self._idle is not None
        self._handlers.discard(task)
        if not self._handlers:
            self._idle.set()

    def cut_here(self) -> bool:
        """Inside a handler that got CancelledError: True (and the cancel is consumed) when it is the
        shutdown's cut, which the handler answers; False for any other cancel, which must propagate."""
        task = asyncio.current_task()
        if not self.cutting or task is None:
            return False
        task.uncancel()
        self.cut += 1
        return True

    # ------------------------------------------------------------------ lifecycle
    async def session_context(self, app: web.Application) -> AsyncIterator[None]:
        """aiohttp cleanup context: the one connection pool lives as long as the server."""
        self.session = upstream.new_session()
        self._idle = asyncio.Event()
        self._idle.set()
        yield
        await self.session.close()

    # ------------------------------------------------------------------ Ollama's own answers
    async def root(self, request: web.Request) -> web.Response:
        return web.Response(text=OLLAMA_RUNNING, content_type="text/plain", charset="utf-8")

    async def version(self, request: web.Request) -> web.Response:
        versions = [state.ollama_version for state in self.balancer.node_states()]
        return _json(200, {"version": cluster.cluster_version(versions)})

    async def tags(self, request: web.Request) -> web.Response:
        return await self._union(request, "/api/tags", cluster.union_tags)

    async def ps(self, request: web.Request) -> web.Response:
        return await self._union(request, "/api/ps", cluster.union_ps)

    async def not_balanced(self, request: web.Request) -> web.Response:
        what = request.path.removeprefix("/api/").split("/", 1)[0]
        return _json(
            501,
            {
                "error": f"flockparse serve does not {what} models: it changes one node's models, so run it "
                f"against that node (OLLAMA_HOST=http://NODE:11434 ollama {what} ...)"
            },
        )

    async def _union(
        self, request: web.Request, path: str, merge: Callable[[list[Any]], dict]
    ) -> web.Response:
        """Every node not known to be offline, read at once within the read timeout; the union of those
        that answered with Ollama's shape. No node answering is a 502 (Ollama never lists nothing by
        mistake: an empty list would claim the cluster holds no model)."""
        nodes = [state.url for state in self.balancer.node_states() if state.online is not False]
        replies = await asyncio.gather(*(self._read_json(node, path) for node in nodes))
        answered = [reply for reply in replies if isinstance(reply, dict)]
        if not nodes and self.balancer.nodes:  # every node known down: still not "the cluster holds none"
            return _json(502, {"error": f"no node is online to answer {path}"})
        if nodes and not answered:
            return _json(502, {"error": f"no node answered {path} within {self.read_timeout:g}s"})
        return _json(200, merge(answered))

    async def _read_json(self, node: str, path: str) -> Any:
        assert self.session is not None
        try:
            response = await upstream.open_reply(
                self.session, "GET", node, path, None, {}, connect_timeout=self.connect_timeout,
                timeout=self.read_timeout,
            )  # fmt: skip
            with contextlib.closing(response):
                if response.status != 200:
                    return None
                raw = await upstream.read_whole(response, node, path, self.read_timeout, reply_limit(path))
        except NodeError:
            return None
        try:
            return json.loads(raw)
        except (ValueError, RecursionError):
            return None

    # ------------------------------------------------------------------ routed requests
    async def routed(self, request: web.Request) -> web.StreamResponse:
        """POST generate/chat/embed/embeddings/show and GET /api/status: to the chosen node, retried on
        another before any byte reached the client (see the module docstring)."""
        body = await request.read() if request.method == "POST" else None
        model = await _model_of(body) if body else None
        headers = {"Accept": request.headers.get("Accept", "application/json")}
        if "User-Agent" in request.headers:
            headers["User-Agent"] = request.headers["User-Agent"]
        tried: list[str] = []
        failures: list[tuple[str, Failed]] = []
        while len(tried) < MAX_ATTEMPTS:
            node = self.balancer.pick_node(model, exclude=tried)
            if node is None:
                break
            tried.append(node)
            outcome = await self._attempt(request, node, model, body, headers)
            if not isinstance(outcome, Failed):
                return outcome
            failures.append((node, outcome))
            if outcome.status == 404 and not self._elsewhere(model, tried):
                break  # no other node is known to have the model: this 404 is the answer
        return _all_failed(model, failures)

    def _elsewhere(self, model: str | None, tried: list[str]) -> bool:
        """Another node, not tried yet and not offline, that has the model or may have it."""
        return any(
            node.url not in tried
            and node.online is not False
            and (node.installed is not False or node.placement is not None)
            for node in self.balancer.route_candidates(model)
        )

    async def _attempt(
        self, request: web.Request, node: str, model: str | None, body: bytes | None, headers: dict[str, str]
    ) -> web.StreamResponse | Failed:
        assert self.session is not None
        path = request.path
        if not self.balancer.request_started(node, model):
            return Failed(f"{node} was removed from the cluster")
        loop = asyncio.get_running_loop()
        sent = loop.time()
        try:
            response = await upstream.open_reply(
                self.session, request.method, node, path, body, headers,
                connect_timeout=self.connect_timeout, timeout=self.request_timeout,
            )  # fmt: skip
        except NodeError as exc:
            self._finished(node, model, path, sent, exc.message)
            return Failed(exc.message)
        except asyncio.CancelledError:  # cut at shutdown: neither an answer nor the node's failure
            self.balancer.request_finished(node, model=model)
            raise
        try:
            if response.status != 200:
                return await self._not_ok(response, node, model, path, sent)
            if response.content_type == "application/x-ndjson":
                return await self._relay(request, response, node, model, path, sent)
            left = max(0.0, sent + self.request_timeout - loop.time())
            raw = await upstream.read_whole(response, node, path, left, reply_limit(path))
            reply = await _parsed(raw)
            if not isinstance(reply, dict):  # Ollama's replies are JSON objects: this node is broken
                raise NodeError("error", f"{node}: {path} failed (the reply is not a JSON object)")
        except NodeError as exc:
            self._finished(node, model, path, sent, exc.message)
            return Failed(exc.message)
        except asyncio.CancelledError:
            response.close()
            self.balancer.request_finished(node, model=model)
            raise
        finally:
            response.release()
        count, duration = eval_metrics(reply)
        self._finished(node, model, path, sent, sample=Sample(loop.time() - sent, None, count, duration))
        return web.Response(status=200, body=raw, headers={"Content-Type": _content_type(response)})

    def _finished(
        self,
        node: str,
        model: str | None,
        path: str,
        sent: float,
        error: str | None = None,
        sample: Sample | None = None,
    ) -> None:
        """The node answered or failed: counted for lb_stats and the metrics' per-endpoint histogram."""
        seconds = asyncio.get_running_loop().time() - sent
        self.balancer.request_finished(node, error, sample, endpoint=path, seconds=seconds, model=model)

    async def _not_ok(
        self, response: aiohttp.ClientResponse, node: str, model: str | None, path: str, sent: float
    ) -> web.Response | Failed:
        """A node's error reply: 404 (not there) and 5xx (its own failure) go to the next node; any other
        4xx is the caller's mistake, handed back as the node said it."""
        raw = await upstream.read_whole(response, node, path, self.read_timeout, upstream.ERROR_BODY_MAX)
        status = response.status
        if status == 404 or status >= 500:
            error = None if status == 404 else f"HTTP {status}: {upstream.as_text(raw)}"
            self._finished(node, model, path, sent, error)
            return Failed(f"{node}: HTTP {status}: {upstream.as_text(raw)}", status, raw)
        self._finished(node, model, path, sent)
        return web.Response(status=status, body=raw, headers={"Content-Type": _content_type(response)})

    async def _relay(
        self,
        request: web.Request,
        response: aiohttp.ClientResponse,
        node: str,
        model: str | None,
        path: str,
        sent: float,
    ) -> web.StreamResponse:
        """A stream, chunk by chunk as the node sends it. Until its first bytes are in, a failure can still
        go to another node; afterwards it ends with an error line (Ollama's own mid-stream form)."""
        loop = asyncio.get_running_loop()
        reader = upstream.ChunkReader(response, node, path, self.chunk_timeout)
        first = await reader.next()  # NodeError: nothing reached the client yet, the caller retries
        if not first:
            raise NodeError("error", f"{node}: {path} failed (the stream ended before its first chunk)")
        first_byte = loop.time() - sent
        out = web.StreamResponse(status=200, headers={"Content-Type": "application/x-ndjson"})
        out.enable_chunked_encoding()
        error: str | None = None
        try:
            await out.prepare(request)
            await out.write(first)
            while chunk := await reader.next():
                await out.write(chunk)
            final = upstream.final_object(reader.final_line())
            error = _unfinished(final, node, path)
            if error is not None and not _is_error_object(final):  # the node's own error line is relayed
                await out.write(_error_line(error))
        except NodeError as exc:  # mid-stream: the client gets Ollama's error line, never a silent cut
            error = f"{exc.message} (mid-stream)"
            await _write_quietly(out, _error_line(error))
        except ConnectionError:  # the client went away: close the node's stream so it stops generating
            response.close()
            self.balancer.request_finished(node, model=model)
            return out
        except asyncio.CancelledError:
            response.close()
            self.balancer.request_finished(node, model=model)
            if not self.cut_here():
                raise
            await _write_quietly(out, _error_line("flockparse serve is shutting down: stream cut"))
            with contextlib.suppress(ConnectionError, RuntimeError):
                await out.write_eof()
            return out
        if error is not None:
            response.close()
            self._finished(node, model, path, sent, error)
        else:
            count, duration = eval_metrics(final)
            sample = Sample(loop.time() - sent, first_byte, count, duration)
            self._finished(node, model, path, sent, sample=sample)
        with contextlib.suppress(ConnectionError):
            await out.write_eof()
        return out


# --------------------------------------------------------------------------------------------- app
def build_app(
    balancer: Any,
    *,
    token: str | None,
    request_timeout: float | None = None,
    chunk_timeout: float = upstream.CHUNK_TIMEOUT_S,
    connect_timeout: float | None = None,
    read_timeout: float | None = None,
    control_reads_need_token: bool = False,
    services: Any = None,
) -> web.Application:
    """The serve application over an `OllamaLoadBalancer`: Ollama's API and the control API.

    `request_timeout`: a reply's headers, or a whole reply (default: the balancer's, 300 s: a model load);
    `chunk_timeout`: between two chunks of a stream; `connect_timeout` and `read_timeout` (the /api/tags
    and /api/ps reads): the controller's timeout (the console's `--timeout`). `control_reads_need_token`:
    the control API's GETs need the token too (its POSTs always do when there is one), and so does
    `/metrics`. `services`: the history recorder and alerter serve runs (console/services.py `Services`),
    reported by `/metrics` and read by the control API's `/history` (serve/observe.py).
    """
    node_timeout = float(getattr(balancer.controller, "timeout", 5.0))
    proxy = Proxy(
        balancer,
        request_timeout=balancer.request_timeout if request_timeout is None else request_timeout,
        chunk_timeout=chunk_timeout,
        connect_timeout=node_timeout if connect_timeout is None else connect_timeout,
        read_timeout=node_timeout if read_timeout is None else read_timeout,
    )
    app = web.Application(
        client_max_size=MAX_BODY_BYTES, middlewares=[_counting(proxy), _auth(token), _ollama_errors]
    )
    app[PROXY_KEY] = proxy
    app.cleanup_ctx.append(proxy.session_context)
    add = app.router.add_route
    for method in ("GET", "HEAD"):
        add(method, "/", proxy.root)
        add(method, "/api/version", proxy.version)
        add(method, "/api/tags", proxy.tags)
    add("GET", "/api/ps", proxy.ps)
    add("GET", "/api/status", proxy.routed)
    for path in ROUTED_POSTS:
        add("POST", path, proxy.routed)
    for path, methods in NOT_BALANCED.items():
        for method in methods:
            add(method, path, proxy.not_balanced)
    # the control API (issue 10 items 5-6) on the same app, under CONTROL_PREFIX; it checks its own token
    add_control_routes(app, balancer, token, require_token_for_reads=control_reads_need_token)
    add_observe_routes(app, services)  # /metrics and /flockparse/v1/history, the control API's token rule
    add_dashboard_routes(app)  # the page at /flockparse/dashboard/, a client of the control API (issue 12)
    return app


def _counting(proxy: Proxy) -> Any:
    """Keeps the set of requests in flight (shutdown waits for them, then cuts them); a request cut
    before its answer began gets a 503 in Ollama's error shape."""

    @web.middleware
    async def count(request: web.Request, handler: Callable[[web.Request], Awaitable[Any]]) -> Any:
        if request.path.startswith(CONTROL_PREFIX):  # its event streams end at shutdown by themselves
            return await handler(request)
        task = asyncio.current_task()
        assert task is not None
        proxy.handling(task)
        try:
            return await handler(request)
        except asyncio.CancelledError:
            if not proxy.cut_here():
                raise
            return _json(503, {"error": "flockparse serve is shutting down"})
        finally:
            proxy.handled(task)

    return count


def _auth(token: str | None) -> Any:
    """With a token: `Authorization: Bearer TOKEN` on every request (compared in constant time)."""
    expected = f"Bearer {token}".encode() if token else None

    @web.middleware
    async def auth(request: web.Request, handler: Callable[[web.Request], Awaitable[Any]]) -> Any:
        if expected is None or request.path.startswith(CONTROL_PREFIX) or request.path == METRICS_PATH:
            return await handler(request)
        given = request.headers.get("Authorization", "").encode("utf-8", "replace")
        if not hmac.compare_digest(given, expected):
            reply = _json(
                401, {"error": "unauthorized: this server needs the header Authorization: Bearer TOKEN"}
            )
            reply.headers["WWW-Authenticate"] = "Bearer"
            return reply
        return await handler(request)

    return auth


@web.middleware
async def _ollama_errors(request: web.Request, handler: Callable[[web.Request], Awaitable[Any]]) -> Any:
    """The router's own 404 and 405 in Ollama's words (gin's plain-text pages)."""
    try:
        return await handler(request)
    except web.HTTPNotFound:
        if request.match_info.http_exception is None:
            raise
        return web.Response(status=404, text="404 page not found", content_type="text/plain")
    except web.HTTPMethodNotAllowed:
        if request.match_info.http_exception is None:
            raise
        return web.Response(status=405, text="405 method not allowed", content_type="text/plain")


# --------------------------------------------------------------------------------------------- helpers
async def _parsed(raw: bytes) -> Any:
    """JSON, or None when it is not; a large body is parsed on a worker thread, not on the event loop."""
    if len(raw) <= PARSE_OFF_LOOP_BYTES:
        return upstream.final_object(raw)
    return await asyncio.to_thread(upstream.final_object, raw)


async def _model_of(body: bytes) -> str | None:
    """The request's `model` (or the older `name`); None when the body is not a JSON object with one
    (the node then answers Ollama's own 400)."""
    value = await _parsed(body)
    if not isinstance(value, dict):
        return None
    model = value.get("model") or value.get("name")
    return model if isinstance(model, str) and model.strip() else None


def _json(status: int, value: Any) -> web.Response:
    """Ollama's JSON replies: compact, `application/json; charset=utf-8`."""
    body = json.dumps(value, separators=(",", ":")).encode()
    return web.Response(status=status, body=body, content_type="application/json", charset="utf-8")


def _content_type(response: aiohttp.ClientResponse) -> str:
    return response.headers.get("Content-Type", "application/json; charset=utf-8")


def _error_line(message: str) -> bytes:
    return json.dumps({"error": message}).encode() + b"\n"


def _is_error_object(final: Any) -> bool:
    return isinstance(final, dict) and "error" in final


def _unfinished(final: Any, node: str, path: str) -> str | None:
    """Why a stream that ended did not finish (None when its last object says done): the node's own
    error line (Ollama's mid-stream failure, relayed as it is), or no final object at all."""
    if isinstance(final, dict) and final.get("done") is True:
        return None
    if _is_error_object(final):
        return f"{node}: {path} failed mid-stream: {str(final['error'])[:200]}"
    return f"{node} ended {path} without its final chunk"


async def _write_quietly(out: web.StreamResponse, data: bytes) -> None:
    """Best effort: the client may be gone already."""
    with contextlib.suppress(ConnectionError, RuntimeError):
        await out.write(data)


def _all_failed(model: str | None, failures: list[tuple[str, Failed]]) -> web.Response:
    """No node could serve it: a node's own error reply when one said why (every node's 404 for an unknown
    model is Ollama's 404), else 502 naming each node's failure, or 503 when no node is up."""
    if not failures:
        what = canonical_name(model) if model else "the request"
        return _json(503, {"error": f"no node is online to serve {what}"})
    replies = [f for _, f in failures if f.status is not None]
    if replies and all(f.status == 404 for f in replies) and len(replies) == len(failures):
        return web.Response(
            status=404, body=replies[-1].body, content_type="application/json", charset="utf-8"
        )
    tried = "; ".join(failure.message for _, failure in failures)
    what = canonical_name(model) if model else "the request"
    return _json(502, {"error": f"no node could serve {what}: {tried}"})
