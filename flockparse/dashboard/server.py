"""The console's `--dashboard HOST:PORT`: the dashboard and the control API over the console's own balancer.

The same aiohttp routes as serve's (serve/control.py, serve/observe.py, the page of dashboard/__init__.py),
without Ollama's API, on an event loop of their own in a daemon thread: the prompt never waits on it and
it never waits on the prompt. The token rules are serve's: beyond loopback it refuses to start without a
token (`check_listen`), and the reads then need the token too.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from concurrent.futures import Future
from typing import Any

from aiohttp import web

from flockparse.dashboard import dashboard_url
from flockparse.dashboard.routes import add_dashboard_routes
from flockparse.serve.control import add_control_routes
from flockparse.serve.observe import add_observe_routes
from flockparse.serve.runner import check_listen, is_loopback

START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 5.0


def parse_dashboard_address(text: str) -> tuple[str, int]:
    """`8080` -> 127.0.0.1:8080 (loopback unless a host is named); `0.0.0.0:8080`; `[::1]:8080`.
    A ValueError says what is wrong in one line."""
    from flockparse.metrics import parse_address

    return parse_address(text, flag="--dashboard")


class DashboardServer:
    """A running dashboard: `url` (the page's address) and `close()`."""

    def __init__(self, balancer: Any, host: str, port: int, token: str | None, services: Any = None) -> None:
        check_listen(host, token)  # ServeError (a ValueError): beyond loopback only with a token
        self.app = web.Application()
        add_control_routes(self.app, balancer, token, require_token_for_reads=not is_loopback(host))
        add_observe_routes(self.app, services)
        add_dashboard_routes(self.app)
        self.host, self.port = host, port
        self.base_url = ""
        self._loop = asyncio.new_event_loop()
        self._runner: web.AppRunner | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, name="dashboard-http", daemon=True)

    @property
    def url(self) -> str:
        return dashboard_url(self.base_url)

    def start(self) -> DashboardServer:
        """Listen, or raise OSError (the port in use, an address not on this machine) with nothing left
        running."""
        self._thread.start()
        started: Future[None] = asyncio.run_coroutine_threadsafe(self._start(), self._loop)
        try:
            started.result(START_TIMEOUT_S)
        except BaseException:
            self.close()
            raise
        return self

    async def _start(self) -> None:
        runner = web.AppRunner(self.app, handle_signals=False, shutdown_timeout=1.0, access_log=None)
        await runner.setup()
        self._runner = runner
        site = web.TCPSite(runner, self.host, self.port, reuse_address=True)
        await site.start()
        host, port = runner.addresses[0][:2]
        shown = f"[{host}]" if ":" in str(host) else str(host)
        self.base_url = f"http://{shown}:{port}"

    def close(self) -> None:
        """Stop listening, end the event streams, stop the loop; safe to call twice."""
        if self._loop.is_closed():
            return
        if self._thread.is_alive():
            if self._runner is not None:
                cleanup = asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop)
                with contextlib.suppress(Exception):  # already stopping, or a stuck client: we leave anyway
                    cleanup.result(STOP_TIMEOUT_S)
                self._runner = None
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(STOP_TIMEOUT_S)
        if not self._loop.is_running():
            self._loop.close()


def start_dashboard(
    balancer: Any, address: tuple[str, int], token: str | None, services: Any = None
) -> DashboardServer:
    """The dashboard on `address` over `balancer`; ServeError (no token beyond loopback) or OSError."""
    host, port = address
    return DashboardServer(balancer, host, port, token, services).start()
