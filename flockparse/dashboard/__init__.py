"""The live dashboard: one page under /flockparse/dashboard/, a client of the control API (issue 12).

The page's HTML, CSS and JavaScript modules ship as package data (`static/`) and are served by the
project itself: no build step, no CDN, no external font. They hold no data, so they are served without a
token; everything the page shows comes from `/flockparse/v1/...` (serve/control.py, serve/observe.py),
which applies the token rules, and its live updates from the event stream there.

`routes.add_dashboard_routes(app)` adds the page to any aiohttp app that has the control API: serve's
(serve/app.py `build_app`) and the console's `--dashboard` server (dashboard/server.py). The page is not
at `/`: Ollama answers `GET /` with "Ollama is running" and clients rely on it.

Every asset goes out with a strict Content-Security-Policy (scripts and styles from this origin only,
no inline script, no frames, network calls to this origin only) and `X-Content-Type-Options: nosniff`.
"""

from __future__ import annotations

DASHBOARD_PATH = "/flockparse/dashboard/"


def dashboard_url(base_url: str) -> str:
    """`http://host:port` -> the page's address on that server."""
    return base_url.rstrip("/") + DASHBOARD_PATH
