"""What serve shows about the cluster beside Ollama's API: Prometheus metrics and the placement history.

- `GET /metrics`: flockparse/metrics.py's text exposition (prometheus_client's content type), with the
  control API's read rule for the token (required beyond loopback), so a scraper on loopback needs none.
- `GET /flockparse/v1/history?since=24h&target=MODEL|NODE&buckets=24`: `History.summary(...).as_dict()`,
  the same figures as the console's `history --json` (the dashboard's charts ask for finer `buckets`);
  404 when serve records no history (history_days = 0).

The collector and the SQLite read are blocking: both run on the control API's thread pool, never on the
event loop.
"""

from __future__ import annotations

import contextlib
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from flockparse.console.config import ConfigError, parse_duration
from flockparse.control_client import API_PREFIX
from flockparse.history import HistoryError
from flockparse.metrics import metrics_text
from flockparse.rules import ModelNameError, check_model_name, normalize_url
from flockparse.serve.control import CONTROL_KEY, BadRequest, Control

METRICS_PATH = "/metrics"
HISTORY_DEFAULT_S = 86400.0
HISTORY_RANGE_S = (60.0, 3650 * 86400.0)  # as the console's `history --since`
HISTORY_BUCKETS = 24  # as the console's sparkline
HISTORY_BUCKETS_MAX = 480  # the dashboard's chart asks for 96 (15 minutes a cell over a day)


def add_observe_routes(app: web.Application, services: Any = None) -> None:
    """Add /metrics and the history read to `app`, after `add_control_routes`. `services`: the running
    recorder, history and alerter (console/services.py `Services`), or None when serve runs none."""
    control = app[CONTROL_KEY]
    recorder = getattr(services, "recorder", None)
    history = getattr(services, "history", None)
    alerter = getattr(services, "alerter", None)

    async def metrics(request: web.Request) -> web.Response:
        refused = control.refuse_read(request)
        if refused is not None:
            return refused
        text = await control.call(lambda: metrics_text(control.balancer, recorder, alerter))
        return web.Response(body=text.encode("utf-8"), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def read_history(request: web.Request) -> dict:
        if history is None:
            raise BadRequest("this serve records no placement history (history_days = 0)", 404)
        seconds = _window(request.query.get("since"))
        node, model = _target(control, request.query.get("target"))
        buckets = _buckets(request.query.get("buckets"))
        try:
            summary = await control.call(
                lambda: history.summary(since_s=seconds, node=node, model=model, buckets=buckets)
            )
        except HistoryError as exc:  # an unreadable file: said in one line, serve carries on
            raise BadRequest(str(exc), 503) from None
        return summary.as_dict()

    app.router.add_get(METRICS_PATH, metrics)
    app.router.add_get(API_PREFIX + "/history", control.endpoint(read_history, mutating=False))


def _window(since: str | None) -> float:
    if since is None:
        return HISTORY_DEFAULT_S
    try:
        seconds = parse_duration(since, "since")
    except ConfigError as exc:
        raise BadRequest(str(exc)) from None
    low, high = HISTORY_RANGE_S
    if not low <= seconds <= high:
        raise BadRequest("since must be between 1m and 3650d")
    return seconds


def _buckets(text: str | None) -> int:
    if text is None:
        return HISTORY_BUCKETS
    if not text.isdigit() or not 1 <= int(text) <= HISTORY_BUCKETS_MAX:
        raise BadRequest(f"buckets must be a whole number from 1 to {HISTORY_BUCKETS_MAX}")
    return int(text)


def _target(control: Control, target: str | None) -> tuple[str | None, str | None]:
    """(node, model pattern), as the console's `history MODEL|NODE`: a node of the cluster or an address
    with a scheme is a node, anything else a model name or glob."""
    if target is None:
        return None, None
    with contextlib.suppress(ValueError):
        url = normalize_url(target)
        if url in control.balancer.nodes or "://" in target:
            return url, None
    try:
        return None, check_model_name(target, allow_glob=True)
    except ModelNameError as exc:
        raise BadRequest(f"target: {exc}") from None
