"""An aiohttp app served on 127.0.0.1 (ephemeral port) from an event loop on a background thread, so the
synchronous tests (and the consoles they start) talk to it over real sockets, as to a running `serve`.

Until the serve subcommand exists here, `control_app(balancer, token)` is an app with only the control
routes; the `served` fixture in conftest.py starts it and stops it at teardown.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from aiohttp import web

from flockparse.serve.control import add_control_routes


def control_app(balancer: Any, token: str | None = None, **options: Any) -> web.Application:
    app = web.Application()
    add_control_routes(app, balancer, token, **options)
    return app


class ServedApp:
    """`start()` returns the URL; `stop()` shuts the server down (streams end, handlers finish)."""

    def __init__(self, app: web.Application, port: int = 0) -> None:
        self.app = app
        self.port = port
        self.url = ""
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="served-app", daemon=True)
        self._runner: web.AppRunner | None = None

    def start(self) -> str:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self.url

    async def _start(self) -> None:
        self._runner = web.AppRunner(self.app, shutdown_timeout=2.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port)
        await site.start()
        host, port = self._runner.addresses[0][:2]
        self.port = port
        self.url = f"http://{host}:{port}"

    def stop(self) -> None:
        """Safe to call twice (a test that restarts the serve stops it itself)."""
        if self._loop.is_closed():
            return
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
            self._runner = None
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()

    def __enter__(self) -> ServedApp:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
