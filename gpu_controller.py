"""GPUController: read and change where models sit on one Ollama node at a time.

Ollama has no "move to GPU" call. A model is placed when it is loaded, and a load with an explicit
`options.num_gpu` (layers to offload) that differs from the loaded runner's value forces a reload.
So a move is: a load-only request (empty prompt, or empty embed input) with `num_gpu` = all layers
(GPU) or 0 (CPU), then polling `/api/ps` until the placement is seen. Nothing here trusts a reply
code alone: success means `/api/ps` shows the model where it was asked to go.

Facts used here are in shared/spec/ollama-api.md (sections 1-3); the mistakes avoided are in
shared/spec/prior-art.md.
"""

from __future__ import annotations

import functools
import logging
import math
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from flockparse.poller import PollReply, StatusPoller
from flockparse.results import MoveResult, Reason
from flockparse.rules import (  # noqa: F401 - re-exported: the design card's names live here too
    LOCATION_CPU,
    LOCATION_GPU,
    LOCATION_UNKNOWN,
    canonical_name,
    model_key,
    normalize_url,
    parse_expires_at,
    placement,
    same_model,
)
from flockparse.transport import NodeError, NodeTransport, Reply, clock_offset, parse_json
from flockparse.transport import clock_offset as _clock_offset  # noqa: F401  (kept importable from here)

log = logging.getLogger(__name__)

MIB = 1024 * 1024
MAX_VERSION_CHARS = 40  # "0.33.0-rc2" and the like; a node sending more is not shown more
FOREVER_AFTER = timedelta(days=365 * 20)  # `ollama ps` shows "Forever" beyond 20 years
ALL_LAYERS_FALLBACK = 999  # llama.cpp clamps an explicit layer count to the model's layers
DEFAULT_ESTIMATE_CTX = 4096  # a model never seen loaded is estimated for Ollama's smallest default context
ESTIMATE_GRAPH_BYTES = 256 * MIB  # compute buffers on top of weights and KV cache (an estimate)
POLLER_GRACE_S = 1.0  # a read through the poller is waited for this long past its deadline, at most
POLL_INTERVAL = 0.025  # seconds between /api/ps polls while verifying a placement
MIN_KEEP_ALIVE_S = 30  # a model moved with seconds left must live long enough to be verified
_MEMORY_ERROR = re.compile(r"memory|cudamalloc|\boom\b|vram|signal: killed", re.IGNORECASE)
# Contexts Ollama picks by itself (>= 0.15.5, by total VRAM: ollama-api.md "vram-based default context"); a
# loaded model showing one of these, or its trained context, was most likely loaded without num_ctx.
AUTOMATIC_CONTEXTS = frozenset({4096, 32768, 262144})
FORMAT_SAFETENSORS = "safetensors"  # MLX models: Ollama ignores num_gpu for them (sched.go:1425)
_BARE_NUMBER = re.compile(r"-?\d+(\.\d+)?")


@functools.lru_cache(maxsize=1 << 16)  # called on every health check: parsing the URL each time costs more
def _node_key(node_url: str) -> str:
    """normalize_url, or the text as given: a bad address then fails as a reply-less call, never raises."""
    try:
        return normalize_url(node_url)
    except ValueError:
        return str(node_url).strip()


@dataclass(frozen=True)
class RawStatus:
    """One /api/ps read as received: the body's bytes tell an unchanged node without parsing them."""

    node_url: str
    started: float  # time.monotonic() the request was sent
    http_status: int = 0
    body: bytes = b""
    date: str | None = None  # the node's Date header (its clock, for expiry times)
    latency_ms: float | None = None
    error: NodeError | None = None


def _reply(raw: RawStatus, path: str) -> Reply:
    """A raw GET reply as the transport's Reply (JSON parsed safely); its NodeError when it failed."""
    if raw.error is not None:
        raise raw.error
    text = raw.body.decode("utf-8", "replace")
    return Reply(
        raw.http_status, parse_json(text, raw.node_url, path), text, clock_offset(raw.date), raw.date
    )


def _json_or_error(node_url: str, path: str, reply: Reply) -> Reply:
    """A 200 with a JSON body, else a one-line NodeError (503 busy, other statuses, not JSON)."""
    if reply.status == 503:
        raise NodeError("error", f"{node_url} is busy (503)")
    if reply.status != 200:
        raise NodeError("error", f"{node_url} answered {path} with {reply.status}: {reply.error_text()}")
    if reply.body is None:
        raise NodeError("error", f"{node_url} returned a malformed {path} reply (not JSON)")
    return reply


@dataclass
class _Loaded:
    """One /api/ps entry, checked for shape."""

    name: str
    size: int
    size_vram: int
    expires: datetime | None
    expires_at: str | None
    context_length: int | None
    digest: str
    clock_offset: timedelta = field(default=timedelta(0))
    format: str = ""  # details.format: "gguf", or "safetensors" for MLX models

    @property
    def controllable(self) -> bool:
        """MLX (safetensors) models ignore num_gpu and always report size == size_vram."""
        return self.format != FORMAT_SAFETENSORS

    def remaining(self) -> timedelta | None:
        """Time left before expiry, by the node's clock (expires_at is node time; clocks drift)."""
        if self.expires is None:
            return None
        return self.expires - (datetime.now(UTC) + self.clock_offset)

    @property
    def stopping(self) -> bool:
        """Unload requested (expiry now or past): it is about to leave /api/ps."""
        left = self.remaining()
        return left is not None and left <= timedelta(0)

    @property
    def keep_forever(self) -> bool:
        left = self.remaining()
        return left is not None and left > FOREVER_AFTER

    @property
    def on_gpu(self) -> bool:
        return self.size > 0 and self.size_vram >= self.size

    @property
    def on_cpu(self) -> bool:
        return self.size_vram == 0


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _parse_ps(body: Any, clock_offset: timedelta = timedelta(0)) -> list[_Loaded]:
    """Validate an /api/ps body; raise ValueError (with the reason) on any wrong shape."""
    if not isinstance(body, dict):
        raise ValueError("not a JSON object")
    entries = body.get("models")
    if entries is None:
        entries = [] if "models" in body else None
    if not isinstance(entries, list):
        raise ValueError("no 'models' list")
    loaded = []
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise ValueError(f"entry {index} is not an object")
        name = entry.get("name") or entry.get("model")
        if not isinstance(name, str) or not name:
            raise ValueError(f"entry {index} has no name")
        if not _is_int(entry.get("size")) or not _is_int(entry.get("size_vram")):
            raise ValueError(f"entry {index} lacks integer size/size_vram")
        context_length = entry.get("context_length")
        details = entry.get("details") if isinstance(entry.get("details"), dict) else {}
        loaded.append(
            _Loaded(
                name=name,
                size=entry["size"],
                size_vram=entry["size_vram"],
                expires=parse_expires_at(entry.get("expires_at")),
                expires_at=entry.get("expires_at") if isinstance(entry.get("expires_at"), str) else None,
                context_length=context_length if _is_int(context_length) else None,
                digest=entry.get("digest") if isinstance(entry.get("digest"), str) else "",
                clock_offset=clock_offset,
                format=details.get("format") if isinstance(details.get("format"), str) else "",
            )
        )
    return loaded


def _find(loaded: list[_Loaded], model: str, include_stopping: bool = False) -> _Loaded | None:
    """The live entry for `model` by canonical name (never by substring)."""
    for entry in loaded:
        if same_model(entry.name, model) and (include_stopping or not entry.stopping):
            return entry
    return None


def _model_row(entry: _Loaded) -> dict:
    location, gpu_percent, processor = placement(entry.size, entry.size_vram)
    ram = max(entry.size - entry.size_vram, 0) if location != LOCATION_UNKNOWN else 0
    return {
        "name": entry.name,
        "location": location,
        "processor": processor,
        "gpu_percent": gpu_percent,
        "size_mb": round(entry.size / MIB, 1),
        "vram_mb": round(entry.size_vram / MIB, 1),
        "ram_mb": round(ram / MIB, 1),
        "expires_at": entry.expires_at,
        "keep_forever": entry.keep_forever,
        "stopping": entry.stopping,
        "context_length": entry.context_length,
        "digest": entry.digest,
        "format": entry.format,
        "controllable": entry.controllable,
    }


def _go_keep_alive(value: str | int | float) -> str | int | float:
    """Ollama reads a JSON number as seconds, a string as a Go duration: `"300"` is a 400."""
    if isinstance(value, str) and _BARE_NUMBER.fullmatch(value.strip()):
        number = float(value)
        return int(number) if number.is_integer() else number
    return value


@dataclass(frozen=True)
class _PendingRestore:
    """A model a failed move unloaded and could not load back yet: how to load it back, and until when."""

    name: str
    num_gpu: int | None  # 0 for a model that was on CPU, else automatic placement
    keep_alive: str | int | float | None
    num_ctx: int | None
    until: float | None  # time.monotonic() its keep_alive would have ended; None = forever


@dataclass
class _ModelInfo:
    """What /api/show tells us that a load needs."""

    embedding_only: bool
    all_layers: int
    trained_context: int | None = None
    format: str = ""
    modelfile: dict[str, str] = field(default_factory=dict)  # PARAMETER lines: they apply to every request
    kv_bytes_per_token: int | None = None  # f16 K and V of every layer (None: /api/show did not say)


def parse_parameters(text: Any) -> dict[str, str]:
    """/api/show `parameters` -> {name: value}, one `name   value` a line (routes.go ShowHandler).

    A repeated name (e.g. `stop`) keeps its first value; values lose their Go quotes.
    """
    options: dict[str, str] = {}
    if not isinstance(text, str):
        return options
    for line in text.splitlines():
        name, _, value = line.strip().partition(" ")
        value = value.strip()
        if len(value) > 1 and value[0] == value[-1] == '"':
            value = value[1:-1]
        if name and value:
            options.setdefault(name, value)
    return options


def _modelfile_int(info: _ModelInfo, name: str) -> int | None:
    try:
        return int(float(info.modelfile[name]))
    except (KeyError, ValueError):
        return None


class GPUController:
    """One node at a time: status, and verified moves to GPU or CPU.

    Thread-safe. One connection pool per node (reuse; flockparse/transport.py); every call has a total
    deadline and a reply size cap; only one move of a given model on a given node runs at once.
    """

    def __init__(
        self,
        timeout: float = 5.0,
        load_timeout: float = 300.0,
        verify_timeout: float = 30.0,
        keep_alive: str | int | float | None = None,
    ) -> None:
        self.timeout = timeout
        self.load_timeout = load_timeout
        self.verify_timeout = verify_timeout
        self.keep_alive = keep_alive
        self._transport = NodeTransport()  # one connection pool per node, shared with the balancer's routing
        self._moves: dict[tuple[str, str], threading.Event] = {}  # moves under way; set when one ends
        self._unloading: dict[str, int] = {}  # node -> unloads under way
        self._pending_restores: dict[str, dict[str, _PendingRestore]] = {}  # node -> model key -> what
        self._last_change: dict[str, float] = {}  # node -> time.monotonic() a move or unload last ended
        self._closed = False  # after close() nothing is sent
        self._poller: StatusPoller | None = None  # /api/ps reads without a thread each (made on first use)
        self._lock = threading.Lock()  # guards the registries above, never held during I/O

    # ----------------------------------------------------------------------------- transport

    def call(
        self, node_url: str, method: str, path: str, payload: dict | None = None, read_timeout: float = 0
    ) -> Reply:
        """One HTTP call on the node's connection pool; raises NodeError when no usable reply came.

        The whole call (connect, send, headers, body) ends within `read_timeout` (default: `timeout`);
        connecting alone within `timeout`. Replies are capped by path and never redirected
        (flockparse/transport.py). The balancer routes requests through here too, so each node has one
        pool and one error vocabulary.
        """
        if self._closed:
            raise NodeError("cancelled", f"{node_url}: not sent, the controller is closed")
        return self._transport.call(
            node_url,
            method,
            path,
            payload,
            timeout=read_timeout or self.timeout,
            connect_timeout=self.timeout,
        )

    def _get_json(self, node_url: str, path: str) -> Reply:
        """GET a JSON document; any non-200 or non-JSON reply becomes a one-line NodeError."""
        return _json_or_error(node_url, path, _reply(self.get_raw(node_url, path), path))

    def _ps(self, node_url: str) -> list[_Loaded]:
        return self._loaded(self.read_status_raw(node_url))

    def _loaded(self, raw: RawStatus) -> list[_Loaded]:
        """The models of an /api/ps read; NodeError when it failed or is malformed."""
        reply = _json_or_error(raw.node_url, "/api/ps", _reply(raw, "/api/ps"))
        try:
            return _parse_ps(reply.body, reply.clock_offset)
        except ValueError as exc:
            raise NodeError("error", f"{raw.node_url} returned a malformed /api/ps reply ({exc})") from exc

    # ----------------------------------------------------------------------------- /api/ps, the hot path

    def poll_status(self, node_url: str, done: Callable[[RawStatus], None], path: str = "/api/ps") -> bool:
        """Read /api/ps (or another GET) without a thread: `done(RawStatus)` is called once, on the status
        poller's thread (flockparse/poller.py; keep it short). False when this node cannot be read that
        way (https, or no descriptor for the poller): then use `read_status_raw` on a thread."""
        node_url = _node_key(node_url)
        poller = self._status_poller()
        if poller is None:
            return False
        started = time.monotonic()

        def deliver(reply: PollReply) -> None:
            done(RawStatus(node_url, started, reply.status, reply.body, reply.date,
                           round(reply.latency_s * 1000, 1), reply.error))  # fmt: skip

        return poller.get(node_url, path, self.timeout, deliver, connect_timeout=self.timeout)

    def read_status_raw(self, node_url: str) -> RawStatus:
        """One /api/ps read on this thread (through the poller when it can): the body as received."""
        return self.get_raw(_node_key(node_url), "/api/ps")

    def get_raw(self, node_url: str, path: str) -> RawStatus:
        """A GET on this thread: through the poller (one connection per node for every GET) when it can,
        else through the transport; the reply as received, or its NodeError."""
        node_url = _node_key(node_url)
        started = time.monotonic()
        if self._closed:
            return RawStatus(node_url, started, error=NodeError("cancelled", f"{node_url}: not sent, closed"))
        box: list[RawStatus] = []
        ready = threading.Event()
        if self.poll_status(node_url, lambda raw: (box.append(raw), ready.set()), path):
            if ready.wait(self.timeout + POLLER_GRACE_S):
                return box[0]
            error = NodeError("timeout", f"{node_url} did not answer {path} within {self.timeout:g}s")
            return RawStatus(node_url, started, error=error)  # the poller is stuck: never seen, but bounded
        try:
            reply = self.call(node_url, "GET", path)
        except NodeError as exc:
            return RawStatus(node_url, started, error=exc)
        latency_ms = round((time.monotonic() - started) * 1000, 1)
        return RawStatus(node_url, started, reply.status, reply.text.encode(), reply.date, latency_ms)

    def _status_poller(self) -> StatusPoller | None:
        if self._closed:
            return None
        with self._lock:
            if self._poller is None:
                try:
                    self._poller = StatusPoller(self._transport)
                except OSError:  # no descriptor left for its selector: threads still work, retried later
                    return None
            return self._poller

    def forget_node(self, node_url: str) -> None:
        """Close one node's connections (it was removed from the cluster)."""
        self._transport.forget(_node_key(node_url))
        with self._lock:
            poller = self._poller
        if poller is not None:
            poller.forget(_node_key(node_url))

    def shutdown(self) -> None:
        """Close, and send nothing from now on (a call ends as `cancelled`): a move still running in another
        thread stops at its next step instead of loading, verifying or restoring. For an owner going away."""
        self._closed = True
        self.close()

    def close(self) -> None:
        """Close every node's connections. The controller can still be used afterwards."""
        with self._lock:
            poller, self._poller = self._poller, None
        if poller is not None:
            poller.close()
        self._transport.close()

    # ----------------------------------------------------------------------------- reading

    def get_model_status(self, node_url: str) -> dict:
        """Where each loaded model sits on one node. Never raises: failures give 'error'."""
        node_url = _node_key(node_url)
        return self.status_from_raw(self.read_status_raw(node_url))

    def status_from_raw(self, raw: RawStatus) -> dict:
        """The `get_model_status` dict of one /api/ps read (read_status_raw or poll_status)."""
        status: dict[str, Any] = {
            "node_url": raw.node_url,
            "models": [],
            "gpu_count": 0,
            "cpu_count": 0,
            "split_count": 0,
            "latency_ms": None,
            "requested_at": raw.started,  # time.monotonic(): lets a caller order replies
        }
        try:
            loaded = self._loaded(raw)
        except NodeError as exc:
            status["error"] = exc.message
            status["reason"] = exc.reason
            return status
        status["latency_ms"] = raw.latency_ms
        status["models"] = [_model_row(entry) for entry in loaded]
        for row in status["models"]:
            if row["location"] == LOCATION_GPU:
                status["gpu_count"] += 1
            elif row["location"] == LOCATION_CPU:
                status["cpu_count"] += 1
            elif row["location"].startswith("Split"):
                status["split_count"] += 1
        return status

    def list_installed(self, node_url: str) -> dict:
        """Canonical names of the models on the node's disk (/api/tags). Never raises."""
        return self.installed_from_raw(self.get_raw(_node_key(node_url), "/api/tags"))

    def installed_from_raw(self, raw: RawStatus) -> dict:
        """`list_installed`'s dict from one /api/tags read (get_raw or poll_status)."""
        node_url = raw.node_url
        try:
            body = _json_or_error(node_url, "/api/tags", _reply(raw, "/api/tags")).body
        except NodeError as exc:
            return {"models": [], "error": exc.message}
        entries = body.get("models") if isinstance(body, dict) else None
        if entries is None and isinstance(body, dict) and "models" in body:
            entries = []
        if not isinstance(entries, list):
            return {"models": [], "error": f"{node_url} returned a malformed /api/tags reply"}
        names = [e.get("name") or e.get("model") for e in entries if isinstance(e, dict)]
        return {"models": [canonical_name(n) for n in names if isinstance(n, str) and n]}

    def _show(self, node_url: str, model: str) -> _ModelInfo:
        """Embedding-only or not, the all-layers count, trained context, format and Modelfile options."""
        reply = self.call(node_url, "POST", "/api/show", {"model": model})
        if reply.status == 404:
            raise NodeError("not_found", f"{model} is not installed on {node_url}")
        if reply.status != 200 or not isinstance(reply.body, dict):
            what = reply.error_text() if reply.status != 200 else "malformed reply"
            raise NodeError("error", f"{node_url} could not describe {model} ({reply.status}: {what})")
        body = reply.body
        capabilities = body.get("capabilities") or []
        embedding_only = "embedding" in capabilities and "completion" not in capabilities
        info = body.get("model_info") if isinstance(body.get("model_info"), dict) else {}
        details = body.get("details") if isinstance(body.get("details"), dict) else {}
        arch = info.get("general.architecture")
        block_count = info.get(f"{arch}.block_count") if isinstance(arch, str) else None
        trained = info.get(f"{arch}.context_length") if isinstance(arch, str) else None
        all_layers = block_count + 1 if _is_int(block_count) and block_count > 0 else ALL_LAYERS_FALLBACK
        kv = _kv_bytes_per_token(info, arch, block_count)
        return _ModelInfo(
            embedding_only=embedding_only,
            all_layers=all_layers,
            trained_context=trained if _is_int(trained) and trained > 0 else None,
            format=details.get("format") if isinstance(details.get("format"), str) else "",
            modelfile=parse_parameters(body.get("parameters")),
            kv_bytes_per_token=kv,
        )

    def estimate_vram_mb(
        self, node_url: str, model_name: str, num_ctx: int = DEFAULT_ESTIMATE_CTX
    ) -> float | None:
        """A model never seen loaded: the VRAM it would need, as Ollama predicts it (llama_server.go
        PredictServerVRAM: the file's size plus an f16 KV cache for `num_ctx`, plus compute buffers), from
        /api/tags and /api/show. None when the node cannot say. Never raises."""
        node_url, model = _node_key(node_url), canonical_name(model_name)
        try:
            sizes = {name: size for name, size, _ in self._installed_sizes(node_url)}
            info = self._show(node_url, model)
        except NodeError:
            return None
        if model not in sizes:
            return None
        context = min(num_ctx, info.trained_context or num_ctx)
        kv = (info.kv_bytes_per_token or 0) * context
        return (sizes[model] + kv + ESTIMATE_GRAPH_BYTES) / MIB

    def version(self, node_url: str) -> str | None:
        """The node's Ollama version (/api/version), None when it does not say."""
        return self.version_from_raw(self.get_raw(_node_key(node_url), "/api/version"))

    def version_from_raw(self, raw: RawStatus) -> str | None:
        """`version` from one /api/version read, shown at most MAX_VERSION_CHARS long."""
        try:
            body = _json_or_error(raw.node_url, "/api/version", _reply(raw, "/api/version")).body
        except NodeError:
            return None
        version = body.get("version") if isinstance(body, dict) else None
        if not isinstance(version, str) or not version:
            return None
        return version if len(version) <= MAX_VERSION_CHARS else version[: MAX_VERSION_CHARS - 1] + "…"

    def _installed_sizes(self, node_url: str) -> list[tuple[str, int, str]]:
        """(name, bytes on disk, format) of every installed model, from /api/tags."""
        body = self._get_json(node_url, "/api/tags").body
        entries = body.get("models") if isinstance(body, dict) else None
        found = []
        for entry in entries if isinstance(entries, list) else []:
            if not isinstance(entry, dict):
                continue
            name, size = entry.get("name") or entry.get("model"), entry.get("size")
            details = entry.get("details") if isinstance(entry.get("details"), dict) else {}
            if isinstance(name, str) and name and _is_int(size):
                found.append((canonical_name(name), size, str(details.get("format") or "")))
        return found

    # ----------------------------------------------------------------------------- moving

    def force_gpu_load(
        self,
        node_url: str,
        model_name: str,
        cancel: threading.Event | None = None,
        load_if_absent: bool = True,
    ) -> dict:
        """Reload `model_name` with all layers on the GPU and verify it in /api/ps.

        Success only when /api/ps shows it 100% in VRAM. If it does not fit, the model is put
        back where it was (see 'restored'), so a failed move never loses a loaded model; a model that
        was not loaded before and landed in RAM is unloaded again. `load_if_absent=False` only moves a
        model that is loaded (else reason 'not_loaded', nothing sent).
        """
        return self.move(node_url, model_name, "gpu", cancel, load_if_absent).as_dict()

    def force_cpu_load(
        self,
        node_url: str,
        model_name: str,
        cancel: threading.Event | None = None,
        load_if_absent: bool = True,
    ) -> dict:
        """Reload `model_name` with num_gpu 0 (all in RAM, frees its VRAM) and verify it."""
        return self.move(node_url, model_name, "cpu", cancel, load_if_absent).as_dict()

    def move(
        self,
        node_url: str,
        model_name: str,
        target: str,
        cancel: threading.Event | None = None,
        load_if_absent: bool = True,
    ) -> MoveResult:
        """The typed move behind force_gpu_load ("gpu") and force_cpu_load ("cpu"), for the core's own use."""
        return self._move(
            _node_key(node_url), model_name, target, cancel or threading.Event(), load_if_absent
        )

    def probe_gpu(
        self, node_url: str, cancel: threading.Event | None = None, trust_vram: bool = True
    ) -> dict:
        """Does this node's Ollama have a usable GPU? {'gpu': True|False|None, 'model', 'message'}.

        A model already in VRAM answers at once (unless `trust_vram` is False: runners from before a GPU
        was lost may still hold it). Otherwise the smallest installed model that is not loaded is loaded
        with all layers on the GPU, judged, and unloaded again: a few MB, and the node is left as it was.
        """
        node_url = _node_key(node_url)
        cancel = cancel or threading.Event()
        try:
            loaded = self._ps(node_url)
            if trust_vram and any(e.size_vram > 0 for e in loaded):
                return {"gpu": True, "model": None, "message": f"a model is in VRAM on {node_url}"}
            taken = {model_key(e.name) for e in loaded}
            sizes = [x for x in self._installed_sizes(node_url) if x[2] != FORMAT_SAFETENSORS]
        except NodeError as exc:
            return {"gpu": None, "model": None, "message": exc.message}
        candidates = sorted((size, name) for name, size, _ in sizes if model_key(name) not in taken)
        if not candidates:
            return {"gpu": None, "model": None, "message": f"no model on {node_url} is free to probe with"}
        probe = candidates[0][1]
        result = self._move(node_url, probe, "gpu", cancel, load_if_absent=True)
        if result.success:
            unloaded = self.unload(node_url, probe, cancel)
            message = f"{probe} loaded into VRAM on {node_url}"
            if not unloaded["success"]:
                message += f"; {unloaded['message']}"
            return {"gpu": True, "model": probe, "message": message}
        gpu = False if result.reason == Reason.NO_GPU else None
        return {"gpu": gpu, "model": probe, "message": result.message}

    def unload(self, node_url: str, model_name: str, cancel: threading.Event | None = None) -> dict:
        """Unload a model (keep_alive 0, like `ollama stop`) and wait until /api/ps no longer lists it."""
        node_url, model = _node_key(node_url), canonical_name(model_name)
        with self._lock:
            self._unloading[node_url] = self._unloading.get(node_url, 0) + 1
        try:
            return self._unload(node_url, model, cancel or threading.Event()).as_dict()
        finally:
            with self._lock:
                self._unloading[node_url] -= 1
                self._last_change[node_url] = time.monotonic()

    def _unload(self, node_url: str, model: str, cancel: threading.Event) -> MoveResult:
        payload = {"model": model, "prompt": "", "keep_alive": 0, "stream": False}
        try:
            reply = self.call(node_url, "POST", "/api/generate", payload)
            if reply.status == 404:
                return _result(False, f"{model} is not installed on {node_url}", "not_found")
            if reply.status != 200:
                return _result(False, f"{node_url} refused to unload {model} ({reply.error_text()})", "error")
            deadline = time.monotonic() + self.verify_timeout
            while _find(self._ps(node_url), model, include_stopping=True) is not None:
                if time.monotonic() >= deadline:
                    message = (
                        f"{model} is still listed on {node_url} {self.verify_timeout:g}s after its unload"
                    )
                    return _result(False, message, "timeout")
                if cancel.wait(POLL_INTERVAL):
                    return _result(
                        False, f"waiting for {model} to unload on {node_url} cancelled", "cancelled"
                    )
        except NodeError as exc:
            return _result(False, exc.message, exc.reason)
        return _result(True, f"{model} unloaded on {node_url}", "unloaded")

    def _claim_move(self, node_url: str, model: str) -> threading.Event | None:
        """Register a move of (node, model); None if one is already under way (its Event says when it ends).

        The lock only guards the registry: nobody holds a lock during a load, they wait on an Event.
        """
        key = (node_url, model_key(model))
        with self._lock:
            if key in self._moves:
                return None
            self._moves[key] = done = threading.Event()
            return done

    def _running_move(self, node_url: str, model: str) -> threading.Event | None:
        with self._lock:
            return self._moves.get((node_url, model_key(model)))

    def _end_move(self, node_url: str, model: str, done: threading.Event) -> None:
        with self._lock:
            del self._moves[(node_url, model_key(model))]
            self._last_change[node_url] = time.monotonic()
        done.set()

    def changed_models_since(self, node_url: str, since: float) -> bool:
        """Did this controller unload or reload models on the node after `since` (time.monotonic()), or is
        it doing so now? Models vanishing then are our own doing, not a restart."""
        node_url = _node_key(node_url)
        with self._lock:
            busy = self._unloading.get(node_url, 0) > 0 or any(node == node_url for node, _ in self._moves)
            return busy or self._last_change.get(node_url, -math.inf) >= since

    def _move(
        self,
        node_url: str,
        model_name: str,
        target: str,
        cancel: threading.Event,
        load_if_absent: bool = True,
    ) -> MoveResult:
        model = canonical_name(model_name)
        if not model:
            return _result(False, "no model name given", "error")
        # One move of a model on a node at a time: a second caller waits for the first to end,
        # then finds the model already in place. Waits are polled so that `cancel` is honoured.
        deadline = time.monotonic() + self.load_timeout + 3 * self.verify_timeout
        while (done := self._claim_move(node_url, model)) is None:
            running = self._running_move(node_url, model)
            if running is not None:
                running.wait(POLL_INTERVAL)
            if cancel.is_set():
                return _result(False, f"move of {model} on {node_url} cancelled", "cancelled")
            if time.monotonic() > deadline:
                return _result(False, f"another move of {model} on {node_url} is still running", "timeout")
        try:
            return self._move_claimed(node_url, model, target, cancel, load_if_absent)
        except NodeError as exc:
            return _result(False, exc.message, exc.reason)
        finally:
            self._end_move(node_url, model, done)

    def _move_claimed(
        self, node_url: str, model: str, target: str, cancel: threading.Event, load_if_absent: bool
    ) -> MoveResult:
        where = "GPU" if target == "gpu" else "CPU"
        if cancel.is_set():
            return _result(False, f"move of {model} to {where} on {node_url} cancelled", "cancelled")
        before_all = self._ps(node_url)
        before = _find(before_all, model)
        if before is not None:
            model = before.name  # the spelling Ollama uses
            if not before.controllable:
                return _not_controllable(node_url, model, before)
            if (target == "gpu" and before.on_gpu) or (target == "cpu" and before.on_cpu):
                return _result(True, f"{model} is already on {where} on {node_url}", "already", before)
        elif not load_if_absent:
            return _result(False, f"{model} is not loaded on {node_url}", "not_loaded")
        info = self._show(node_url, model)
        if info.format == FORMAT_SAFETENSORS:
            return _not_controllable(node_url, model, before)
        num_gpu = self._num_gpu_for(info, target)
        if isinstance(num_gpu, MoveResult):  # the Modelfile sets another num_gpu: every request would undo it
            if before is not None:
                _set_location(num_gpu, before)
            return num_gpu
        keep_alive = self._keep_alive_for(before)
        num_ctx = _num_ctx_to_keep(info, before)
        if cancel.is_set():
            return _result(False, f"move of {model} to {where} on {node_url} cancelled", "cancelled")
        log.debug("moving %s to %s on %s (num_gpu=%s)", model, where, node_url, num_gpu)
        try:
            reply = self._load(node_url, model, info, num_gpu, keep_alive, num_ctx)
        except NodeError as exc:
            if exc.reason == "timeout":  # not restored: the node may still be loading it
                exc.message += f"; {model} may still be loading there, see its status"
            raise
        if reply.status != 200:
            return self._failed_load(node_url, model, target, reply, before, before_all, keep_alive, num_ctx)
        after = self._wait_listed(node_url, model, cancel)
        if isinstance(after, MoveResult):  # cancelled or timed out while verifying
            return after
        result = self._judge(node_url, model, target, after)
        if not result.success and before is None:
            self._undo_load(node_url, model, result)
        elif result.success:
            self._note_evicted(node_url, model, before_all, result)
        return result

    def _note_evicted(self, node_url: str, model: str, before_all: list[_Loaded], result: MoveResult) -> None:
        """Ollama may unload other models to make room (sched.go:547-575): a move says which it cost."""
        others = [e for e in before_all if not e.stopping and not same_model(e.name, model)]
        if not others:
            return
        try:
            now = self._ps(node_url)
        except NodeError:
            return
        gone = [e for e in others if _find(now, e.name, include_stopping=False) is None]
        if gone:
            result.evicted = [e.name for e in gone]
            result.held_before_mb = sum(e.size_vram for e in others) / MIB
            result.evicted_vram_mb = [e.size_vram / MIB for e in gone]
            result.in_vram_before = [e.name for e in others if e.size_vram > 0]
            result.message += f"; Ollama unloaded {', '.join(result.evicted)} to make room"

    @staticmethod
    def _num_gpu_for(info: _ModelInfo, target: str) -> int | MoveResult:
        """The layer count to send, or a `pinned_by_modelfile` result when the Modelfile's own num_gpu
        (applied to every request, routes.go:141-146) contradicts the move."""
        pinned = _modelfile_int(info, "num_gpu")
        wanted = info.all_layers if target == "gpu" else 0
        if pinned is None or pinned < 0:
            return wanted
        if (target == "gpu" and pinned >= info.all_layers) or (target == "cpu" and pinned == 0):
            return pinned  # the same value every ordinary request sends: no reload afterwards
        where = "GPU" if target == "gpu" else "CPU"
        message = (  # short enough for one console line; README says how to re-create a model
            f"its Modelfile sets num_gpu {pinned} for every request: re-create the model without that "
            f"PARAMETER to move it to {where}"
        )
        result = _result(False, message, Reason.PINNED_BY_MODELFILE)
        result.modelfile_num_gpu = pinned
        return result

    def _undo_load(self, node_url: str, model: str, result: MoveResult) -> None:
        """Do no harm: a model that was not loaded before the move and is not where asked goes away again."""
        unloaded = self.unload(node_url, model)
        if unloaded["success"]:
            result.message += "; unloaded it again (it was not loaded before)"
            result.location, result.vram_mb = None, 0.0
        else:
            result.message += f"; could not unload it again: {unloaded['message']}"

    def _keep_alive_for(self, before: _Loaded | None) -> str | int | float | None:
        """Keep the model's lifetime across a move: forever stays forever (-1)."""
        if before is not None and before.keep_forever:
            return -1
        if self.keep_alive is not None:
            return _go_keep_alive(self.keep_alive)
        remaining = before.remaining() if before is not None else None
        if remaining is not None:
            return f"{max(math.ceil(remaining.total_seconds()), MIN_KEEP_ALIVE_S)}s"
        return None

    def _load(
        self,
        node_url: str,
        model: str,
        info: _ModelInfo,
        num_gpu: int | None,
        keep_alive: str | int | float | None,
        num_ctx: int | None,
    ) -> Reply:
        """Send one load-only request (no generation). `num_gpu` None = automatic placement."""
        options: dict[str, int] = {}
        if num_gpu is not None:
            options["num_gpu"] = num_gpu
        if num_ctx:
            options["num_ctx"] = num_ctx
        if info.embedding_only:
            path, payload = "/api/embed", {"model": model, "input": ""}
        else:
            path, payload = "/api/generate", {"model": model, "prompt": "", "stream": False}
        if keep_alive is not None:
            payload["keep_alive"] = keep_alive
        if options:
            payload["options"] = options
        reply = self.call(node_url, "POST", path, payload, read_timeout=self.load_timeout)
        if path == "/api/generate" and reply.status == 400 and "does not support" in reply.error_text():
            # capabilities were missing from /api/show (older Ollama): it is an embedding model
            as_embedding = replace(info, embedding_only=True)
            return self._load(
                node_url, model, as_embedding, num_gpu, keep_alive, None
            )  # no num_ctx: see below
        return reply

    def _wait_listed(self, node_url: str, model: str, cancel: threading.Event) -> _Loaded | MoveResult:
        """Poll /api/ps until the model is listed (and not stopping), bounded by verify_timeout."""
        deadline = time.monotonic() + self.verify_timeout
        last_problem = "it was not listed"
        while True:
            try:
                entry = _find(self._ps(node_url), model)
                if entry is not None:
                    return entry
            except NodeError as exc:
                last_problem = exc.message
            if time.monotonic() >= deadline:
                message = (
                    f"{model} was loaded on {node_url} but its placement could not be verified "
                    f"within {self.verify_timeout:g}s: {last_problem}"
                )
                return _result(False, message, "timeout")
            if cancel.wait(POLL_INTERVAL):
                message = f"verification of {model} on {node_url} cancelled; the load was already sent"
                return _result(False, message, "cancelled")

    def _judge(self, node_url: str, model: str, target: str, after: _Loaded) -> MoveResult:
        """Turn the verified placement into a result: success only if it is where we asked."""
        location, gpu_percent, _ = placement(after.size, after.size_vram)
        if target == "cpu":
            if after.on_cpu:
                return _result(True, f"{model} now on CPU on {node_url}", "moved", after)
            message = f"{model} still holds {after.size_vram / MIB:.0f} MB of VRAM on {node_url} ({location})"
            return _result(False, message, "error", after)
        if after.on_gpu:
            message = f"{model} now on GPU on {node_url} ({after.size_vram / MIB:.0f} MB VRAM)"
            return _result(True, message, "moved", after)
        if after.on_cpu:
            message = f"{node_url} has no usable GPU: {model} landed in RAM"
            return _result(False, message, "no_gpu", after)
        message = (
            f"{model} does not fit in VRAM on {node_url}: only {gpu_percent}% fits in VRAM; "
            f"left as Ollama placed it ({location})"
        )
        return _result(False, message, "out_of_memory", after)

    def _failed_load(
        self,
        node_url: str,
        model: str,
        target: str,
        reply: Reply,
        before: _Loaded | None,
        before_all: list[_Loaded],
        keep_alive: str | int | float | None,
        num_ctx: int | None,
    ) -> MoveResult:
        """A load was refused: say why, then put back whatever the attempt unloaded."""
        error = reply.error_text()
        if reply.status == 404:
            return _result(False, f"{model} is not installed on {node_url}", "not_found")
        if reply.status == 503:
            reason, message = "error", f"{node_url} is busy (503), {model} was not moved"
        elif reply.status >= 500 and _MEMORY_ERROR.search(error):
            where = "VRAM" if target == "gpu" else "RAM"
            reason, message = "out_of_memory", f"{model} does not fit in {where} on {node_url} ({error})"
        else:
            reason, message = "error", f"{node_url} refused to load {model} ({reply.status}: {error})"
        result = _result(False, message, reason)
        self._restore(node_url, model, before, keep_alive, num_ctx, result)
        self._restore_evicted(node_url, before_all, exclude=model, result=result)
        if result.not_restored:
            result.message += (
                f"; not restored yet: {', '.join(result.not_restored)} (retried at the next check)"
            )
        return result

    def _restore(
        self,
        node_url: str,
        model: str,
        before: _Loaded | None,
        keep_alive: str | int | float | None,
        num_ctx: int | None,
        result: MoveResult,
    ) -> None:
        """Put a model that a failed move unloaded back where it was; update `result` to say so. What cannot
        be put back now is listed in `not_restored` and remembered (`restore_pending` tries again)."""
        try:
            now = _find(self._ps(node_url), model)
        except NodeError as exc:
            result.message += f"; could not check where it is now: {exc.message}"
            if before is not None:
                self._remember_restore(node_url, before, keep_alive, num_ctx, result)
            return
        if now is not None:
            _set_location(result, now)
            result.message += f"; it is still loaded ({result.location})"
            return
        if before is None:
            result.message += "; it was not loaded before and is not loaded now"
            return
        num_gpu = 0 if before.on_cpu else None  # a split or GPU model goes back to automatic placement
        restored = self._reload(node_url, model, num_gpu, keep_alive, num_ctx)
        if isinstance(restored, _Loaded):
            _set_location(result, restored)
            result.restored = True
            result.message += f"; restored to {result.location}"
        else:
            result.message += f"; could not restore it: {restored}"
            self._remember_restore(node_url, before, keep_alive, num_ctx, result)

    def _remember_restore(
        self,
        node_url: str,
        entry: _Loaded,
        keep_alive: str | int | float | None,
        num_ctx: int | None,
        result: MoveResult,
    ) -> None:
        """A model a failed move unloaded and could not load back: listed, and kept to be tried again."""
        result.not_restored = [*(result.not_restored or []), entry.name]
        remaining = entry.remaining()
        until = (
            None if entry.keep_forever or remaining is None else time.monotonic() + remaining.total_seconds()
        )
        with self._lock:
            self._pending_restores.setdefault(node_url, {})[model_key(entry.name)] = _PendingRestore(
                entry.name, 0 if entry.on_cpu else None, keep_alive, num_ctx, until
            )

    def has_pending_restores(self, node_url: str) -> bool:
        with self._lock:
            return bool(self._pending_restores.get(_node_key(node_url)))

    def restore_pending(self, node_url: str, cancel: threading.Event | None = None) -> dict:
        """Load back the models a failed move could not restore (the node blipped, or refused).

        A model loaded again meanwhile, or whose time has run out, is dropped. {'restored', 'missing'}.
        """
        node_url = _node_key(node_url)
        with self._lock:
            pending = dict(self._pending_restores.get(node_url, {}))
        restored, missing = [], []
        try:
            loaded = self._ps(node_url)
        except NodeError:
            return {"restored": [], "missing": [item.name for item in pending.values()]}
        for key, item in pending.items():
            done = item.until is not None and time.monotonic() >= item.until
            if not done and _find(loaded, item.name) is None and not (cancel and cancel.is_set()):
                claim = self._claim_move(node_url, item.name)
                if claim is None:  # a move of it runs now: that move owns it
                    missing.append(item.name)
                    continue
                try:
                    back = self._reload(node_url, item.name, item.num_gpu, item.keep_alive, item.num_ctx)
                finally:
                    self._end_move(node_url, item.name, claim)
                if not isinstance(back, _Loaded):
                    missing.append(item.name)
                    continue
                restored.append(item.name)
            with self._lock:
                self._pending_restores.get(node_url, {}).pop(key, None)
        return {"restored": restored, "missing": missing}

    def _reload(
        self,
        node_url: str,
        model: str,
        num_gpu: int | None,
        keep_alive: str | int | float | None,
        num_ctx: int | None,
    ) -> _Loaded | str:
        """Load a model back and wait until it is listed; the entry, or why not."""
        try:
            info = self._show(node_url, model)
            reply = self._load(node_url, model, info, num_gpu, keep_alive, num_ctx)
        except NodeError as exc:
            return exc.message
        if reply.status != 200:
            return f"{reply.status}: {reply.error_text()}"
        listed = self._wait_listed(node_url, model, threading.Event())
        return listed if isinstance(listed, _Loaded) else listed.message

    def load_back(self, node_url: str, model_name: str, on_cpu: bool = False) -> dict:
        """Load a model this tool unloaded to make room back as Ollama places it (automatic; num_gpu 0 for
        one that was in RAM), verified: {'success', 'message', 'location'}. Never raises."""
        node_url, model = _node_key(node_url), canonical_name(model_name)
        done = self._claim_move(node_url, model)
        if done is None:
            return {"success": False, "message": f"{model} is being moved on {node_url}", "location": None}
        try:
            back = self._reload(node_url, model, 0 if on_cpu else None, None, None)
        finally:
            self._end_move(node_url, model, done)
        if isinstance(back, _Loaded):
            location = _model_row(back)["location"]
            return {"success": True, "message": f"{model} loaded back ({location})", "location": location}
        return {
            "success": False,
            "message": f"could not load {model} back on {node_url}: {back}",
            "location": None,
        }

    def _restore_evicted(
        self, node_url: str, before_all: list[_Loaded], exclude: str, result: MoveResult
    ) -> None:
        """A failed big load makes Ollama evict every other model first: load those back.

        A model another thread is moving right now is left to that thread (no waiting here,
        so two failing moves can never wait on each other).
        """
        try:
            now = self._ps(node_url)
        except NodeError:  # the node blipped: none of them is known to be back
            for entry in before_all:
                if not entry.stopping and not same_model(entry.name, exclude):
                    self._remember_restore(
                        node_url, entry, self._keep_alive_for(entry), entry.context_length, result
                    )
            return
        missing = [
            e
            for e in before_all
            if not e.stopping and not same_model(e.name, exclude) and _find(now, e.name) is None
        ]  # `stopping` is re-judged now: a model whose time ran out meanwhile is not brought back
        brought_back = []
        for entry in missing:
            done = self._claim_move(node_url, entry.name)
            if done is None:  # another thread is moving it: that thread owns it
                continue
            try:
                keep_alive = -1 if entry.keep_forever else self._keep_alive_for(entry)
                num_gpu = 0 if entry.on_cpu else None
                if isinstance(
                    self._reload(node_url, entry.name, num_gpu, keep_alive, entry.context_length), _Loaded
                ):
                    brought_back.append(entry.name)
                else:
                    self._remember_restore(node_url, entry, keep_alive, entry.context_length, result)
            finally:
                self._end_move(node_url, entry.name, done)
        if missing:
            result.restored_others = brought_back
            result.message += f"; reloaded {len(brought_back)} of {len(missing)} models it evicted"


def _kv_bytes_per_token(info: dict, arch: Any, block_count: Any) -> int | None:
    """2 (K and V) x layers x KV heads x head size x 2 bytes (f16), from the GGUF keys /api/show lists."""
    if not isinstance(arch, str) or not _is_int(block_count):
        return None
    heads, kv_heads = info.get(f"{arch}.attention.head_count"), info.get(f"{arch}.attention.head_count_kv")
    width = info.get(f"{arch}.embedding_length")
    if not all(_is_int(v) and v > 0 for v in (heads, kv_heads, width)):
        return None
    return 2 * block_count * kv_heads * (width // heads) * 2


def _num_ctx_to_keep(info: _ModelInfo, before: _Loaded | None) -> int | None:
    """The context to send with a move, or None to let Ollama choose it as for any ordinary request.

    An explicit num_ctx the next ordinary request does not send makes Ollama reload the model with
    automatic placement (sched.go:1398-1425), undoing the move. So it is sent only when the model was
    clearly loaded with a client's own context: never for embedding models (their batch follows the
    requested num_ctx and is compared literally, routes.go:151,217), never when the Modelfile sets it,
    and not when the context is the trained one or one Ollama picks by itself.
    """
    if before is None or not before.context_length or info.embedding_only or "num_ctx" in info.modelfile:
        return None
    if before.context_length == info.trained_context or before.context_length in AUTOMATIC_CONTEXTS:
        return None
    return before.context_length


def _not_controllable(node_url: str, model: str, entry: _Loaded | None) -> MoveResult:
    message = f"{model} is a safetensors (MLX) model on {node_url}: Ollama places it, ignoring num_gpu"
    return _result(False, message, Reason.NOT_CONTROLLABLE, entry)


def _set_location(result: MoveResult, entry: _Loaded) -> None:
    result.location = placement(entry.size, entry.size_vram)[0]
    result.vram_mb = round(entry.size_vram / MIB, 1)


def _result(success: bool, message: str, reason: str, entry: _Loaded | None = None) -> MoveResult:
    """A move's result; where the model now sits when known."""
    result = MoveResult(success, message, Reason(reason))
    if entry is not None:
        _set_location(result, entry)
    return result
