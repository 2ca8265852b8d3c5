"""`flockparsecli.py [flags] serve`: the balancer (health monitor, optimizer) and the HTTP server in one
headless process, until SIGTERM or SIGINT.

- It logs one time-stamped line per event to stderr (the console's own event text, `render.event_line`,
  without colour codes), plus its own `serve` lines: listening, stopping, stopped. Lines are written by a
  thread of their own, so the core never waits on a slow stderr.
- SIGTERM/SIGINT: the listener closes (no new connections; idle keep-alive connections are closed, busy
  ones after their answer), the requests in flight get the grace period to finish, then the rest are cut
  (a stream ends with an error line, a request not answered yet gets a 503: serve/app.py `Proxy.drain`),
  and `run_serve` returns 0 (the caller closes the balancer).
- It refuses to listen on an address that is not loopback without a token: the cluster would be open to
  the network (`check_listen`); beyond loopback the control API's reads need the token too.
- With a state directory (the config directory) it loads its saved state before the first optimizer pass
  and keeps it (serve/state.py), and registers itself while it listens (serve/registry.py: a local console
  on these nodes then starts no optimizer of its own and says how to attach).
- With the config it records placement history and sends alerts as a local console does
  (console/services.py), and serves Prometheus metrics at `/metrics` (serve/observe.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import queue
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any, TextIO

from aiohttp import web

from flockparse.console import render
from flockparse.console.config import Config
from flockparse.console.services import Services, start_services
from flockparse.dashboard import dashboard_url
from flockparse.serve.app import PROXY_KEY, build_app
from flockparse.serve.registry import register_serve, unregister_serve
from flockparse.serve.state import StateError, StateKeeper, state_path

DEFAULT_LISTEN = "127.0.0.1:11435"
DEFAULT_GRACE_S = 10.0
GRACE_RANGE = (0.0, 3600.0)
STAMP_FORMAT = "%Y-%m-%d %H:%M:%S"
LOG_DRAIN_S = 2.0  # at exit, how long queued log lines may take to be written
SHUTDOWN_TIMEOUT_S = 1.0  # aiohttp's own wait after our grace period and cut (nothing should be left)


class ServeError(ValueError):
    """Why serve cannot start, in one line (a usage error: exit 2)."""


def parse_listen(text: str) -> tuple[str, int]:
    """`HOST:PORT`, `[::1]:PORT` or `:PORT` (= 127.0.0.1) -> (host, port); port 0 picks a free one."""
    value = text.strip()
    host, sep, port_text = value.rpartition(":")
    if not sep or not port_text.isdigit() or int(port_text) > 65535:
        raise ServeError(f"--listen {text}: expected HOST:PORT (e.g. {DEFAULT_LISTEN})")
    host = host.strip()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not host:
        host = "127.0.0.1"
    if any(ch.isspace() for ch in host) or "/" in host:
        raise ServeError(f"--listen {text}: `{host}` is not a host name or address")
    return host, int(port_text)


def is_loopback(host: str) -> bool:
    """True when every address `host` names is a loopback one (127.0.0.0/8, ::1); names are resolved."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        return False
    addresses = {info[4][0] for info in infos}
    return bool(addresses) and all(ipaddress.ip_address(a.split("%", 1)[0]).is_loopback for a in addresses)


def check_listen(host: str, token: str | None) -> None:
    """Refuse to open the cluster to the network without a token."""
    if not token and not is_loopback(host):
        raise ServeError(
            f"refusing to listen on {host} without a token: anyone who can reach it could use the cluster; "
            "set FLOCKPARSE_TOKEN (or --token) or listen on 127.0.0.1"
        )


def check_grace(text: str | float) -> float:
    try:
        seconds = float(text)
    except ValueError:
        raise ServeError(f"--grace: `{text}` is not a number of seconds") from None
    low, high = GRACE_RANGE
    if not low <= seconds <= high:  # also refuses nan
        raise ServeError(f"--grace must be between {low:g} and {high:g} seconds, got {seconds:g}")
    return seconds


class EventLog:
    """Core events and serve's own lines -> one time-stamped plain line each on `stream`, from a thread."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self._queue: queue.SimpleQueue[str | None] = queue.SimpleQueue()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="serve-log", daemon=True)
        self._thread.start()

    def event(self, event: Any) -> None:
        if render.worth_showing(event):  # quiet optimizer passes stay quiet, as in the console
            self._queue.put(render.event_line(event, stamp_format=STAMP_FORMAT).plain)

    def line(self, message: str) -> None:
        """One of serve's own status lines (tag `serve`)."""
        stamp = time.strftime(STAMP_FORMAT)
        self._queue.put(f"{stamp} {'serve':<9} {render.clean(message)}")

    def _run(self) -> None:
        while (text := self._queue.get()) is not None:
            with contextlib.suppress(OSError, ValueError):  # a closed or full stderr must not end serve
                self.stream.write(text + "\n")
                self.stream.flush()
        self._done.set()

    def close(self) -> None:
        """Write what is queued (bounded wait), then stop the thread."""
        self._queue.put(None)
        self._done.wait(LOG_DRAIN_S)


def run_serve(
    balancer: Any,
    *,
    host: str,
    port: int,
    token: str | None,
    grace: float = DEFAULT_GRACE_S,
    stream: TextIO | None = None,
    state_dir: Path | None = None,
    config: Config | None = None,
) -> int:
    """Start the balancer's monitor (and optimizer, if enabled), serve until SIGTERM/SIGINT, then stop
    within the grace period. Returns 0; raises ServeError when it cannot listen or its state file is
    unusable. The balancer must not be started yet (its first pass must see the saved pins); it is closed
    here before the history recorder and alerter (so they get its last events); the caller may close it
    again. Main thread only (signal handlers).

    `state_dir` (the config directory): the serve's state file (pins, priorities, back-offs: they survive a
    restart, serve/state.py) and its registry file (a local console then starts no second optimizer on
    these nodes, serve/registry.py). None: neither.
    `config`: the history recorder (in `state_dir`) and the alerter it asks for, started as a local
    console starts them (console/services.py), served at `/metrics` and `/flockparse/v1/history`."""
    check_listen(host, token)
    log = EventLog(stream or sys.stderr)
    unsubscribe = balancer.subscribe(log.event)
    keeper: StateKeeper | None = None
    services = Services()
    try:
        if state_dir is not None:
            candidate = StateKeeper(balancer, state_path(state_dir, f"{_url_host(host)}:{port}"))
            try:
                notes = candidate.load()  # before the optimizer's first pass
            except StateError as exc:  # never overwritten: the operator decides what it should hold
                raise ServeError(f"{exc}; move it away to start without it") from None
            keeper = candidate
            for note in notes:
                log.line(note)
        if config is not None:  # before the first health check, so that its node_up are recorded
            services = start_services(balancer, config, state_dir, None)
        balancer.start()  # after subscribing: the optimizer's and the first checks' lines are logged
        if keeper is not None:
            keeper.start()
        asyncio.run(_serve(balancer, host, port, token, grace, log, state_dir, services))
    finally:
        if keeper is not None:
            keeper.stop()  # the last write
        balancer.close()  # no event after this: the recorder and the alerter have seen them all
        services.close()
        unsubscribe()
        log.close()
    return 0


async def _serve(
    balancer: Any,
    host: str,
    port: int,
    token: str | None,
    grace: float,
    log: EventLog,
    state_dir: Path | None,
    services: Services,
) -> None:
    # beyond loopback the control API's reads need the token too (the cluster's state is not the network's)
    app = build_app(balancer, token=token, control_reads_need_token=not is_loopback(host), services=services)
    runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=SHUTDOWN_TIMEOUT_S, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port, reuse_address=True)
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise ServeError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    address = runner.addresses[0]
    url = f"http://{_url_host(str(address[0]))}:{address[1]}"
    nodes = len(balancer.nodes)
    guard = "token required" if token else "no token (loopback only)"
    log.line(
        f"listening on {url} for {nodes} node(s); routing {balancer.routing}; "
        f"optimizer {'on' if balancer.auto_optimize_gpu else 'off'}; {guard}"
    )
    page = dashboard_url(url)
    if str(address[0]) in ("0.0.0.0", "::"):  # every address: a browser needs one of them, the host's name
        page = dashboard_url(f"http://{socket.gethostname()}:{address[1]}") + " (on every address)"
    log.line(f"dashboard at {page}")
    registered = None
    if state_dir is not None:
        try:
            registered = register_serve(state_dir, url, balancer.nodes)
        except OSError as exc:  # consoles on this machine may then start an optimizer of their own
            log.line(f"not registered in {state_dir} ({exc.strerror or exc}): local consoles cannot see it")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        await stop.wait()
        proxy = app[PROXY_KEY]
        log.line(
            f"stopping: no new connections; {proxy.in_flight} request(s) in flight get up to {grace:g}s "
            "to finish"
        )
        cut = await stop_gracefully(runner, grace)
    finally:
        unregister_serve(registered)
    log.line(f"stopped; {cut} request(s) cut at the end of the grace period" if cut else "stopped")


def _url_host(host: str) -> str:
    """A host as it goes in a URL (`[::1]` for an IPv6 address)."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


async def stop_gracefully(runner: web.AppRunner, grace: float) -> int:
    """Stop listening and close idle keep-alive connections (busy ones close after their answer), give the
    requests in flight `grace` seconds, cut the rest (serve/app.py `Proxy.drain`), then clean up.
    Returns how many requests were cut."""
    for site in list(runner.sites):
        await site.stop()
    if runner.server is not None:
        runner.server.pre_shutdown()
    cut = await runner.app[PROXY_KEY].drain(grace)
    await runner.cleanup()
    return cut
