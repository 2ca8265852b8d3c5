"""serve's application on 127.0.0.1 in a thread of its own (its own event loop), for in-process tests.

The official `ollama` client is synchronous: the test thread drives it while serve's event loop runs here.
`stop()` goes through aiohttp's own shutdown (the listener closes, requests in flight get `grace`).
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from aiohttp import web

from flockparse.serve.app import PROXY_KEY, Proxy, build_app
from flockparse.serve.runner import stop_gracefully


class ServeThread:
    """`with ServeThread(balancer, token=None, **build_app_options) as serve: serve.url`."""

    def __init__(self, balancer: Any, token: str | None = None, grace: float = 5.0, **options: Any) -> None:
        self.app = build_app(balancer, token=token, **options)
        self.grace = grace
        self.url = ""
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="serve-test", daemon=True)

    @property
    def proxy(self) -> Proxy:
        return self.app[PROXY_KEY]

    def start(self) -> ServeThread:
        self._thread.start()
        if not self._ready.wait(10) or self._error is not None:
            raise RuntimeError(f"serve did not start: {self._error!r}")
        return self

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(self.grace + 10)

    def __enter__(self) -> ServeThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as error:  # handed to start() or seen by the test as a dead thread
            self._error = error
            self._ready.set()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        runner = web.AppRunner(self.app, handle_signals=False, shutdown_timeout=1.0, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        host, port = runner.addresses[0][:2]
        self.url = f"http://{host}:{port}"
        self._ready.set()
        await self._stop.wait()
        await stop_gracefully(runner, self.grace)
