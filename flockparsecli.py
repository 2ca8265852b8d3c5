#!/usr/bin/env python3
"""FlockParse console: keep an Ollama cluster's models on GPU, interactively or one command at a time.

    python3 flockparsecli.py [--nodes URL,...] [--config FILE]        # interactive console
    python3 flockparsecli.py [flags] COMMAND [ARGS] [--json]          # one command, for scripts and cron
    python3 flockparsecli.py --demo                                   # a simulated three-node cluster
    python3 flockparsecli.py --connect http://HOST:11435 [COMMAND]    # the console of a running serve

The console is a client of the core (balancer.OllamaLoadBalancer): it renders what the core returns and
the Events it emits, and never reaches into private state.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import logging
import os
import queue
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn

from rich.console import Console
from rich.text import Text

from flockparse.balancer import OllamaLoadBalancer
from flockparse.console import __version__, render
from flockparse.console.commands import (
    EXIT_INTERRUPTED,
    REGISTRY,
    CommandError,
    Context,
    Outcome,
    UsageError,
    check_arity,
    dispatch,
    parse_line,
    resolve,
    unknown_model_hint,
)
from flockparse.console.config import Config, ConfigError, apply_flags, config_dir, load_config
from flockparse.console.names import is_glob, same_name
from flockparse.console.tty import unbuffered_keys
from flockparse.dashboard import dashboard_url
from flockparse.remote import TOKEN_ENV, RemoteCluster, RemoteError
from flockparse.routing import STRATEGIES
from flockparse.serve.registry import DEFAULT_SERVE_URL, ServeInfo, serves_managing
from gpu_controller import GPUController

__all__ = ["OllamaLoadBalancer", "GPUController", "main"]

PROMPT = "⚡ Enter command: "
ONE_SHOT_PIPE_WIDTH = 120  # columns when one-shot output goes to a pipe or file
EXIT_USAGE = 2
HEALTH_POLL_S = 0.05
FIRST_ROUND_SLACK_S = 1.0  # on top of one request timeout: a hung node is marked down by then
SHUTDOWN_DRAIN_S = 2.0  # at exit, how long queued event lines may take to print
EVENT_DRAIN_S = 0.5  # before a command's own output, how long earlier event lines may take to print
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"

log = logging.getLogger("flockparsecli")


class ArgumentError(Exception):
    """A flag argparse refuses; reported like every other usage error (JSON too with --json)."""


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise ArgumentError(f"{message} (try --help)")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog=program_name(),
        description="Keep an Ollama cluster's models on GPU. Without COMMAND: the interactive console "
        "(or, with stdin not a terminal, one command per line read from stdin).",
        epilog=f"commands: {', '.join(REGISTRY)}; `serve` (--listen, --token, --grace) puts the "
        "cluster behind one Ollama-compatible address. "
        f"Config dir: $FLOCKPARSE_CONFIG_DIR or {config_dir()}. "
        "Exit codes: 0 ok, 1 failed or a node unreachable, 2 usage or config error, 130 Ctrl-C. "
        "`gpu-exporter [--listen HOST:PORT]` serves this machine's GPU memory from NVML (its own program).",
        allow_abbrev=False,  # `--node` must never silently mean `--nodes`
    )
    parser.add_argument(
        "--nodes",
        metavar="URL,...",
        help="comma-separated node URLs (default: config, $OLLAMA_HOST, localhost); never saved",
    )
    parser.add_argument(
        "--priority", metavar="MODEL,...", help="comma-separated models the optimizer keeps on GPU (globs, *)"
    )
    parser.add_argument(
        "--interval", metavar="SECONDS", help="seconds between optimizer passes (default 300, 5 .. 2592000)"
    )
    parser.add_argument(
        "--health-interval",
        metavar="SECONDS",
        help="seconds between node health checks (default 5, 0.1 .. 3600)",
    )
    parser.add_argument(
        "--timeout", metavar="SECONDS", help="seconds per request to a node (default 5, 0.1 .. 600)"
    )
    parser.add_argument(
        "--load-timeout",
        metavar="SECONDS",
        help="seconds a model load may take on a node (default 300, 5 .. 3600)",
    )
    parser.add_argument(
        "--gpu-metrics",
        action="append",
        metavar="NODE_URL=EXPORTER_URL",
        help="read NODE's real VRAM figures from its GPU exporter (dcgm-exporter, nvidia_gpu_exporter, "
        "nvitop-exporter), e.g. gpu1=http://gpu1:9400/metrics (repeatable)",
    )
    parser.add_argument("--no-optimizer", action="store_true", help="do not start the background optimizer")
    parser.add_argument(
        "--connect",
        metavar="URL",
        help="attach to a running serve (e.g. http://127.0.0.1:11435): its nodes, its optimizer, its events",
    )
    parser.add_argument(
        "--token",
        metavar="TOKEN",
        help=f"the serve's token (default: ${TOKEN_ENV}): with --connect, sent to it; with `serve` and "
        "--dashboard, what clients must send as `Authorization: Bearer TOKEN` (required beyond loopback)",
    )
    parser.add_argument(
        "--own-optimizer",
        action="store_true",
        help="start this console's optimizer even when a serve already manages these nodes",
    )
    parser.add_argument(
        "--node",
        action="append",
        metavar="URL",
        help="force_gpu/force_cpu/unload/cleanup: only this node (repeatable)",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="force_*/unload/cleanup/optimizer now: say what would be done, change nothing",
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="force_gpu: load even where the model does not fit (see README: Room on the GPU)",
    )
    parser.add_argument(
        "--since", metavar="DURATION", help="history: the window, e.g. 30m, 24h (default), 7d"
    )
    parser.add_argument(
        "--metrics",
        metavar="[HOST:]PORT",
        help="the interactive console serves Prometheus metrics at http://HOST:PORT/metrics (host 127.0.0.1)",
    )
    parser.add_argument(
        "--dashboard",
        metavar="[HOST:]PORT",
        help="the interactive console serves the live dashboard at http://HOST:PORT/flockparse/dashboard/ "
        "(host 127.0.0.1; beyond loopback only with --token)",
    )
    parser.add_argument(
        "--config", metavar="FILE", help="TOML config file (default: <config dir>/config.toml)"
    )
    parser.add_argument("--demo", action="store_true", help="start a simulated 3-node cluster in-process")
    parser.add_argument("--json", action="store_true", help="one-shot: print the result (or error) as JSON")
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="show nodes' raw error texts in move results"
    )
    parser.add_argument("--no-color", action="store_true", help="no colours (as NO_COLOR=1)")
    parser.add_argument(
        "--watch",
        nargs="?",
        const="2",
        metavar="SECONDS",
        help="with vram_report: redraw it every SECONDS (default 2) until q or Ctrl-C",
    )
    parser.add_argument(
        "--routing",
        metavar="NAME",
        help="how requests are routed: adaptive (default), round_robin, least_loaded, lowest_latency",
    )
    parser.add_argument(
        "--listen", metavar="HOST:PORT", help="serve: the address to listen on (default 127.0.0.1:11435)"
    )
    parser.add_argument(
        "--grace",
        metavar="SECONDS",
        help="serve: at SIGTERM/SIGINT, how long requests in flight may take to finish (default 10)",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument(
        "command",
        nargs="*",
        metavar="COMMAND",
        help="run one command and exit (e.g. vram_report --json); `serve` runs the cluster behind one "
        "Ollama-compatible address until SIGTERM",
    )
    return parser


def make_balancer(config: Config, optimize: bool) -> OllamaLoadBalancer:
    """The core, built from the effective config; the optimizer is started by the caller if wanted."""
    return OllamaLoadBalancer(
        config.nodes,
        auto_optimize_gpu=optimize,
        gpu_priority_models=config.priority_models,
        check_interval=config.interval,
        health_interval=config.health_interval,
        gpu_capability=config.gpu or None,
        keep_alive=config.keep_alive,
        controller=GPUController(
            timeout=config.timeout, load_timeout=config.load_timeout, keep_alive=config.keep_alive
        ),
        start=False,
        on_gpu_lost=config.on_gpu_lost,
        remedy_timeout=config.remedy_timeout,
        gpu_metrics={node: url for node, url in config.gpu_metrics.items() if node in config.nodes},
        routing=config.routing,
        evict_to=config.evict_to,
        request_timeout=config.load_timeout,  # a routed request may wait for a model load
    )


class EventPrinter:
    """Core Events -> one rendered line each, printed by our own thread so the core never waits on a tty.

    While a command reports its own moves (`quiet`), their event lines are left out: one line per node
    per move, and never a line printed after the command's summary and the next prompt.
    """

    def __init__(self, console: Console, kinds: Sequence[str] | None = None, verbose: bool = False) -> None:
        self.console, self.kinds, self.verbose = console, kinds, verbose
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._move_started: dict[tuple[str | None, str | None], float] = {}
        self._pass_nodes: int | None = None
        self._muted: dict[str, int] = {}
        self._lock = threading.Lock()
        self._idle = threading.Event()
        self._idle.set()
        self._thread = threading.Thread(target=self._run, name="event-printer", daemon=True)
        self._thread.start()

    def _is_muted(self, event: Any) -> bool:
        with self._lock:
            muted = {what for what, count in self._muted.items() if count}
        source = (event.data or {}).get("source")
        if "user" in muted and event.kind.startswith("move_") and source == "user":
            return True
        return "pass" in muted and (event.kind.startswith("pass_") or source == "optimizer")

    @contextlib.contextmanager
    def quiet(self, what: str) -> Iterator[None]:
        """Leave out `user` moves, or (`pass`) the optimizer's pass and moves, while the block runs."""
        with self._lock:
            self._muted[what] = self._muted.get(what, 0) + 1
        try:
            yield
        finally:
            with self._lock:
                self._muted[what] -= 1

    def __call__(self, event: Any) -> None:
        if self._is_muted(event):
            return
        if event.kind == "pass_started":  # the finished line says over how many nodes
            self._pass_nodes = (event.data or {}).get("nodes")
        if event.kind == "move_started":  # one line per move: the result, with its duration
            with self._lock:
                self._move_started[(event.node, event.model)] = event.time
            return
        if (self.kinds is None or event.kind in self.kinds) and render.worth_showing(event):
            self._idle.clear()
            self._queue.put((event, self._pass_nodes))

    def _duration(self, event: Any) -> float | None:
        """Seconds since the matching move_started: the number a user wants to see next to a move."""
        with self._lock:
            started = self._move_started.pop((event.node, event.model), None)
        if event.kind in ("move_finished", "move_failed") and started is not None:
            return event.time - started
        return None

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            event, pass_nodes = item
            line = render.event_line(event, self._duration(event), pass_nodes, self.verbose)
            self.console.print(line, highlight=False)  # word-wrapped: an address is never split
            if self._queue.empty():
                self._idle.set()

    def drain(self, timeout: float) -> None:
        """Wait (bounded) until queued lines are printed, e.g. the `optimizer stopped` line at exit."""
        self._idle.wait(timeout)

    def close(self) -> None:
        self._queue.put(None)


def first_round_timeout(config: Config) -> float:
    return config.timeout + FIRST_ROUND_SLACK_S


def first_health_round(balancer: OllamaLoadBalancer, timeout: float) -> list[Any]:
    """Poll (with a deadline) until the monitor has checked every node once, installed models included."""
    deadline = time.monotonic() + timeout
    states = balancer.node_states()
    while any(not checked(state) for state in states) and time.monotonic() < deadline:
        threading.Event().wait(HEALTH_POLL_S)
        states = balancer.node_states()
    return states


def checked(state: Any) -> bool:
    """Down, or up with its installed list read (known_models() needs it to accept a model name)."""
    if state.online is None:
        return False
    return state.online is False or getattr(state, "installed_checked_at", 1.0) > 0


def warn_at_start(balancer: OllamaLoadBalancer, config: Config, console: Console) -> None:
    """After the first health round: nothing answers -> suggest --demo; a priority name no node has."""
    states = first_health_round(balancer, first_round_timeout(config))
    hint = unreachable_hint(states, config)
    if hint:
        console.print(render.error_line(hint))
        return
    known = balancer.known_models()
    for name in config.priority_models or []:
        if known and not is_glob(name) and not any(same_name(name, model) for model in known):
            console.print(
                render.safe_text(
                    f"note: priority model {name} is on no node ({unknown_model_hint(name, known)})",
                    style="yellow",
                )
            )


def unreachable_hint(states: list[Any], config: Config) -> str | None:
    """One clear line when nothing answers, suggesting --demo (per-node lines come from node_down events)."""
    if not states or any(state.online for state in states):
        return None
    where = states[0].url if len(states) == 1 else f"any of the {len(states)} nodes"
    return (
        f"no Ollama answered at {where}: start Ollama, pass --nodes URL,..., or try `{program_name()} --demo`"
    )


def print_outcome(console: Console, outcome: Outcome) -> None:
    if outcome.renderable is not None:
        console.print(outcome.renderable)


def run_line(ctx: Context, line: str, log_path: Path | None = None) -> Outcome:
    """Parse and dispatch one line; any failure becomes one red line and the console carries on."""
    try:
        outcome = dispatch(ctx, parse_line(line))
    except CommandError as exc:
        ctx.console.print(render.error_line(str(exc)))
        return Outcome(ok=False, data={"error": str(exc), "exit_code": exc.exit_code})
    except KeyboardInterrupt:  # Ctrl-C during a short command: nothing to cancel in the core
        ctx.console.print(render.error_line("cancelled"))
        return Outcome(ok=False, data={"error": "cancelled", "exit_code": EXIT_INTERRUPTED})
    except Exception as exc:  # a core bug must not end the console the user lives in
        log.exception("command %r failed", line)
        where = f" (see {log_path})" if log_path else ""
        message = f"{line.split()[0]} failed: {type(exc).__name__}: {exc}{where}"
        ctx.console.print(render.error_line(message))
        return Outcome(ok=False, data={"error": message, "exit_code": 1})
    if ctx.flush_events is not None:
        ctx.flush_events()
    print_outcome(ctx.console, outcome)
    return outcome


class Reporter:
    """Where one-shot results and errors go: people read stderr/stdout, `--json` scripts read stdout."""

    def __init__(self, as_json: bool, json_lines: bool = False) -> None:
        self.as_json, self.json_lines = as_json, json_lines
        self.errors = Console(stderr=True, highlight=False, soft_wrap=True)

    def json(self, value: Any) -> None:
        indent = None if self.json_lines else 2
        sys.stdout.write(json.dumps(value, default=str, indent=indent) + "\n")
        sys.stdout.flush()

    def error(self, message: str, code: int) -> int:
        """One red line on stderr; with --json also `{"error": ..., "exit_code": ...}` on stdout."""
        self.errors.print(render.error_line(message))
        if self.as_json:
            self.json({"error": message, "exit_code": code})
        return code


def one_shot(ctx: Context, words: list[str], reporter: Reporter) -> int:
    """Run one command; exit 0 on success, 1 when it failed or a node was unreachable, 2 on usage errors."""
    try:
        outcome = dispatch(ctx, words)
    except CommandError as exc:
        return reporter.error(str(exc), exc.exit_code)
    except KeyboardInterrupt:
        return reporter.error("cancelled", EXIT_INTERRUPTED)
    except Exception as exc:
        log.exception("command %r failed", words)
        return reporter.error(f"{words[0]} failed: {type(exc).__name__}: {exc}", 1)
    if reporter.as_json:
        reporter.json(outcome.data)
    else:
        print_outcome(ctx.console, outcome)
    return 0 if outcome.ok else 1


def make_one_shot_console() -> Console:
    """The terminal's width on a tty; 120 columns into a pipe or file, so tables stay readable in logs."""
    return Console(highlight=False, width=None if sys.stdout.isatty() else ONE_SHOT_PIPE_WIDTH)


def make_interactive_console() -> Console:
    """Rich writes raw ANSI (colours detected on the real terminal) into patch_stdout's proxy."""
    probe = Console()
    if probe.no_color:
        return Console(force_terminal=True, no_color=True, highlight=False)
    return Console(force_terminal=True, color_system=probe.color_system or "standard", highlight=False)


@contextlib.contextmanager
def keep_typeahead(stream: Any = None) -> Iterator[None]:
    """While a command runs, keys typed ahead (Ctrl-D too) wait for the next prompt instead of being lost.

    In the tty's cooked mode a Ctrl-D is consumed by the line discipline (an empty read) before the prompt
    comes back; with ICANON and ECHO off it stays a byte in the queue that prompt_toolkit reads.
    """
    with unbuffered_keys(stream):
        yield


def interactive(
    balancer: OllamaLoadBalancer,
    config: Config,
    banner: str | None = None,
    demo_script: Any = None,
    console: Console | None = None,
    pt_input: Any = None,
    pt_output: Any = None,
    files_dir: Path | None = None,
    verbose: bool = False,
    optimizer_guard: Any = None,
    serve_of_nodes: Any = None,
    metrics_address: tuple[str, int] | None = None,
    dashboard_address: tuple[str, int] | None = None,
    dashboard_token: str | None = None,
) -> int:
    """The prompt_toolkit loop; background lines appear above the prompt, the typed line stays intact.

    `files_dir` holds the history and console.log (None: the config dir; --demo passes a temp dir).
    `console`, `pt_input` and `pt_output` let tests drive the real loop through a pipe.
    `balancer` may be a RemoteCluster (`--connect`): the serve's events, and no optimizer of our own.
    `optimizer_guard()` says why this console must not start an optimizer (a serve manages its nodes).
    `metrics_address`: serve Prometheus metrics there (`--metrics`).
    `dashboard_address`: serve the dashboard and the control API there (`--dashboard`), `dashboard_token`
    required by its control API (and for its reads beyond loopback); a failure to listen is one line.
    """
    from prompt_toolkit import PromptSession
    from prompt_toolkit.patch_stdout import patch_stdout

    from flockparse.console.completion import ConsoleCompleter, ModelNameRefresher
    from flockparse.console.history import open_history, open_log
    from flockparse.console.services import start_services
    from flockparse.console.toolbar import TOOLBAR_STYLE, toolbar_fragments, toolbar_state

    console = console or make_interactive_console()
    printer = EventPrinter(console, verbose=verbose)
    attached = attached_to(balancer)
    ctx = Context(
        balancer=balancer,
        console=console,
        config=config,
        verbose=verbose,
        quiet_events=printer.quiet,
        flush_events=lambda: printer.drain(EVENT_DRAIN_S),
        attached=attached,
        optimizer_guard=optimizer_guard,
        serve_of_nodes=serve_of_nodes,
    )
    unsubscribe = balancer.subscribe(printer)
    refresher = ModelNameRefresher(balancer.known_models).start()
    files_dir = files_dir or config_dir()
    told: list[str] = []  # file problems, said once each (printed above the prompt)

    def tell(message: str) -> None:
        told.append(message)
        console.print(render.safe_text(message + " (the console carries on)", style="yellow"))

    # tracebacks (a failing command, a failing event subscriber) go to a file, never into the prompt
    log_path = open_log(files_dir, LOG_FORMAT, tell)
    try:  # history, alerts and metrics, before the first health check so that it is recorded
        services = start_services(balancer, config, files_dir, metrics_address)
    except OSError as exc:
        host, port = metrics_address or ("?", 0)
        console.print(render.error_line(f"--metrics: cannot listen on {host}:{port} ({exc.strerror or exc})"))
        unsubscribe()
        printer.close()
        refresher.stop()
        return 1
    ctx.history, ctx.alerter = services.history, services.alerter
    if services.metrics is not None:
        host, port = services.metrics.address
        console.print(Text(f"Prometheus metrics at http://{host}:{port}/metrics", style="dim"))
    if dashboard_address is not None:
        start_dashboard(console, balancer, services, dashboard_address, dashboard_token)
    session: PromptSession[str] = PromptSession(
        history=open_history(files_dir, tell),
        completer=ConsoleCompleter(
            {
                "MODEL": lambda: refresher.names,
                "NODE": lambda: balancer.nodes,
                "PRIORITY": lambda: list(balancer.gpu_priority_models),
                "MODEL|NODE": lambda: [*refresher.names, *balancer.nodes],
                "STRATEGY": lambda: list(STRATEGIES),
            }
        ),
        complete_while_typing=True,
        bottom_toolbar=lambda: toolbar_fragments(toolbar_state(balancer)),
        style=TOOLBAR_STYLE,
        refresh_interval=1.0,
        input=pt_input,
        output=pt_output,
    )
    try:
        with patch_stdout(raw=True):
            if banner:
                console.print(Text(banner, style="cyan"))
            refusal = optimizer_guard() if optimizer_guard and balancer.auto_optimize_gpu else None
            if refusal:  # a serve runs these nodes' optimizer: a second one would undo its pins
                balancer.auto_optimize_gpu = False
                console.print(render.safe_text(refusal, style="yellow"))
            balancer.start()  # after subscribing, so the "enabled" line and node_down lines are shown
            if demo_script is not None:
                demo_script.start(printer, ready=lambda: balancer.optimizer_status()["last_pass"] is not None)
            if attached is None:  # a serve has checked its nodes already
                threading.Thread(
                    target=warn_at_start, args=(balancer, config, console), name="first-health", daemon=True
                ).start()  # the prompt comes up at once; the hint appears above it if nothing answers
            while True:
                try:
                    line = session.prompt(PROMPT)
                except KeyboardInterrupt:
                    continue  # Ctrl-C clears the half-typed line, like a shell
                except EOFError:
                    break
                with keep_typeahead(None if pt_input is None else pt_input):
                    if run_line(ctx, line, log_path).exit:
                        break
            if attached is None:  # a serve's optimizer is the cluster's: it runs on for the others
                balancer.stop_gpu_optimization()
            printer.drain(SHUTDOWN_DRAIN_S)
    finally:
        services.close()
        unsubscribe()
        printer.close()
        refresher.stop()
    return 0


def start_dashboard(
    console: Console, balancer: Any, services: Any, address: tuple[str, int], token: str | None
) -> None:
    """`--dashboard`: the page and the control API over this console's balancer, from a thread of their
    own (flockparse/dashboard/server.py). A port in use is one line; the console carries on without it."""
    from flockparse.dashboard.server import start_dashboard as serve_dashboard

    host, port = address
    try:
        services.dashboard = serve_dashboard(balancer, address, token, services)
    except (OSError, ValueError) as exc:  # ValueError: beyond loopback without a token (checked at start)
        why = os.strerror(exc.errno) if isinstance(exc, OSError) and exc.errno else str(exc)
        console.print(render.error_line(f"--dashboard: cannot listen on {host}:{port} ({why}); no dashboard"))
        return
    guard = "the token is required" if token else "no token: loopback only"
    console.print(Text(f"dashboard at {services.dashboard.url}; {guard}", style="dim"))


def run_script(
    balancer: OllamaLoadBalancer,
    config: Config,
    reporter: Reporter,
    verbose: bool,
    lines: Any = None,
    files_dir: Path | None = None,
    serve_of: Any = None,
) -> int:
    """stdin is not a terminal: run each line as a command (like `sqlite3 < file`), no prompt, no
    optimizer thread, no escape codes into a pipe. Blank lines and `#` comments are skipped. Exit code:
    the highest of the lines' (0 all ok, 1 a command failed, 2 a usage error); 130 at once on Ctrl-C."""
    ctx = batch_context(balancer, config, reporter, verbose, files_dir, serve_of)
    started = False
    worst = 0
    for raw in sys.stdin if lines is None else lines:
        try:
            words = parse_line(raw)
        except UsageError as exc:
            worst = max(worst, reporter.error(str(exc), exc.exit_code))
            continue
        if not words or words[0].startswith("#"):
            continue
        try:
            cmd = resolve(words[0])
            check_arity(cmd, words[1:])
        except UsageError as exc:
            worst = max(worst, reporter.error(str(exc), exc.exit_code))
            continue
        if cmd.name == "exit":
            break
        if cmd.wants_nodes(words[1:]) and not started:
            started = True
            start_and_check(balancer, config, reporter)
        code = one_shot(ctx, words, reporter)
        if code == EXIT_INTERRUPTED:
            return code
        worst = max(worst, code)
    return worst


def start_and_check(balancer: OllamaLoadBalancer, config: Config, reporter: Reporter) -> None:
    """Start the health monitor and wait (at most one timeout and a second) for its first round.
    Attached to a serve there is nothing to start: the serve checks its nodes."""
    if isinstance(balancer, RemoteCluster):
        return
    balancer.start()
    hint = unreachable_hint(first_health_round(balancer, first_round_timeout(config)), config)
    if hint:
        reporter.errors.print(render.error_line(hint))


def attached_to(balancer: Any) -> str | None:
    """The serve's URL when the console is attached to one (--connect), else None."""
    return balancer.url if isinstance(balancer, RemoteCluster) else None


def optimizer_refusal(
    nodes: list[str], token: str | None, probe_url: str | None = DEFAULT_SERVE_URL
) -> str | None:
    """One line when a serve this machine can see manages any of `nodes` (its registry file in the config
    directory, or the default address asked with a short deadline): how to attach instead."""
    found = serves_managing(nodes, config_dir(), probe_url, token)
    return refusal_line(*found[0]) if found else None


def serve_of_nodes(
    nodes: list[str], token: str | None, probe_url: str | None = DEFAULT_SERVE_URL
) -> str | None:
    """The address of a serve this machine can see that manages any of `nodes`, else None."""
    found = serves_managing(nodes, config_dir(), probe_url, token)
    return found[0][0].url if found else None


def refusal_line(info: ServeInfo, shared: list[str]) -> str:
    who = f" (pid {info.pid})" if info.pid else ""
    return (
        f"the serve at {info.url}{who} runs the optimizer of {len(shared)} of these nodes, so this console "
        f"starts none: attach with `{program_name()} --connect {info.url}` (or pass --own-optimizer)"
    )


def program_name() -> str:
    """`flockparse` when run as the installed command, else `flockparsecli.py`."""
    return "flockparse" if Path(sys.argv[0]).name == "flockparse" else "flockparsecli.py"


ON_TERMINATION: list[Any] = []  # what SIGTERM/SIGHUP must still do before the process ends


def exit_on_termination() -> None:
    """SIGTERM and SIGHUP (a closed terminal) end the console at once, after what must not be left behind:
    the terminal's modes restored (prompt_toolkit's raw mode), --demo's temporary files removed and its
    simulated nodes stopped. An exception raised in the handler could land inside prompt_toolkit's event
    loop and be swallowed there, so the handler does the clean-up itself and exits. Main thread only."""
    import signal

    saved_tty = _tty_modes()

    def leave(signum: int, _frame: Any) -> None:
        for step in ON_TERMINATION:
            try:
                step()
            except Exception:  # the process is ending: log it, go on with the others
                logging.getLogger(__name__).exception("clean-up at termination failed")
        if saved_tty is not None:
            import termios

            termios.tcsetattr(sys.stdin.fileno(), termios.TCSANOW, saved_tty)
        exit_without_joining_core_threads(128 + signum)

    if threading.current_thread() is threading.main_thread():
        for name in ("SIGTERM", "SIGHUP"):
            if hasattr(signal, name):
                signal.signal(getattr(signal, name), leave)


def _tty_modes() -> Any:
    try:
        import termios

        return termios.tcgetattr(sys.stdin.fileno()) if sys.stdin.isatty() else None
    except (ImportError, OSError, ValueError):
        return None


def main(argv: Sequence[str] | None = None) -> int:
    """Parse flags, build the config and the core, run the console, one command, or stdin's lines."""
    exit_on_termination()
    words = list(sys.argv[1:] if argv is None else argv)
    if words[:1] == ["gpu-exporter"]:  # a program of its own: no nodes, no config, its own flags
        from flockparse.console.gpu_exporter import main as gpu_exporter

        return gpu_exporter(words[1:])
    try:
        return _main(argv)
    except KeyboardInterrupt:  # Ctrl-C before or between commands (e.g. during the first health round)
        Console(stderr=True).print(render.error_line("cancelled"))
        return EXIT_INTERRUPTED


def _main(argv: Sequence[str] | None) -> int:
    try:
        args = build_parser().parse_intermixed_args(argv)
    except ArgumentError as exc:
        as_json = "--json" in (sys.argv[1:] if argv is None else argv)
        return Reporter(as_json).error(str(exc), EXIT_USAGE)
    if args.no_color:
        os.environ["NO_COLOR"] = "1"  # rich and prompt_toolkit both honour it
    words = list(args.command)
    script = not words and not sys.stdin.isatty()
    reporter = Reporter(args.json, json_lines=script)
    if (args.node or args.dry_run or args.since or args.force) and not words:
        return reporter.error(
            "--node, --dry-run, --force and --since go with a command (e.g. `force_gpu MODEL --dry-run`, "
            "`history --since 7d`)",
            EXIT_USAGE,
        )
    if args.metrics and (words or script):
        return reporter.error(
            "--metrics goes with the interactive console (no COMMAND, no stdin)", EXIT_USAGE
        )
    if args.dashboard and (words or script):
        return reporter.error(
            "--dashboard goes with the interactive console (no COMMAND, no stdin)", EXIT_USAGE
        )
    metrics_address = None
    if args.metrics:
        from flockparse.metrics import parse_address

        try:
            metrics_address = parse_address(args.metrics)
        except ValueError as exc:
            return reporter.error(str(exc), EXIT_USAGE)
    dashboard_address = None
    if args.dashboard and not args.connect:  # attached: the serve serves it already
        problem, dashboard_address = dashboard_usage(args.dashboard, args.token or os.environ.get(TOKEN_ENV))
        if problem:
            return reporter.error(problem, EXIT_USAGE)
    words += [word for node in args.node or () for word in ("--node", node)]
    words += ["--dry-run"] if args.dry_run else []
    words += ["--force"] if args.force else []
    words += ["--since", args.since] if args.since else []
    if args.watch is not None:
        if words[:1] != ["vram_report"]:
            return reporter.error("--watch goes with vram_report (or use the `watch` command)", EXIT_USAGE)
        words = ["watch", args.watch, *words[1:]]
    if args.json and not words and not script:
        return reporter.error("--json needs a COMMAND (e.g. `vram_report --json`)", EXIT_USAGE)
    serving = words[:1] == ["serve"]
    problem = serve_usage_problem(args, words) if serving else unused_serve_flag(args)
    if problem:
        return reporter.error(problem, EXIT_USAGE)
    if args.demo and (args.nodes or args.config or args.gpu_metrics):
        flag = "--nodes" if args.nodes else "--config" if args.config else "--gpu-metrics"
        return reporter.error(f"--demo starts its own nodes and saves nothing: drop {flag}", EXIT_USAGE)
    if args.connect:
        return run_attached(args, words, script, reporter)
    cluster, banner, files_dir, demo_script = None, None, None, None
    try:
        if args.demo:
            from flockparse.console.demo import (
                DemoScript,
                demo_banner,
                demo_config,
                demo_files_dir,
                remove_demo_files,
                start_demo_cluster,
            )

            flags = apply_flags(
                Config(),
                args.priority,
                args.interval,
                args.health_interval,
                args.timeout,
                args.load_timeout,
                args.routing,
            )
            cluster = start_demo_cluster()
            config = demo_config(cluster.urls, flags, cluster.gpu_metrics)
            banner = demo_banner(cluster.urls)
            files_dir = demo_files_dir()
            demo_script = DemoScript(cluster)
            ON_TERMINATION.extend([cluster.stop, lambda: remove_demo_files(files_dir)])
        else:
            config = load_config(
                args.config,
                args.nodes,
                args.priority,
                args.interval,
                args.health_interval,
                args.timeout,
                load_timeout_flag=args.load_timeout,
                routing_flag=args.routing,
                gpu_metrics_flag=args.gpu_metrics,
            )
    except ConfigError as exc:
        return reporter.error(str(exc), EXIT_USAGE)
    if serving:
        return serve(args, config, reporter)
    interactive_mode = not words and not script
    balancer = make_balancer(config, optimize=interactive_mode and not args.no_optimizer)
    guard = serve_of = None
    if not (args.demo or args.own_optimizer):  # --demo's nodes are its own
        token = args.token or os.environ.get(TOKEN_ENV) or None
        guard = functools.partial(optimizer_refusal, list(config.nodes), token)
        serve_of = functools.partial(serve_of_nodes, list(config.nodes), token)
    try:
        if words:
            return run_one_shot(balancer, config, words, reporter, args.verbose, files_dir, serve_of)
        if script:
            return run_script(
                balancer, config, reporter, args.verbose, files_dir=files_dir, serve_of=serve_of
            )
        return interactive(
            balancer,
            config,
            banner,
            files_dir=files_dir,
            verbose=args.verbose,
            demo_script=demo_script,
            optimizer_guard=guard,
            serve_of_nodes=serve_of,
            metrics_address=metrics_address,
            dashboard_address=dashboard_address,
            dashboard_token=args.token or os.environ.get(TOKEN_ENV) or None,
        )
    finally:
        if demo_script is not None:
            demo_script.stop()
        balancer.close()
        if cluster is not None:
            cluster.stop()
        if files_dir is not None:
            from flockparse.console.demo import remove_demo_files

            remove_demo_files(files_dir)


def dashboard_usage(text: str, token: str | None) -> tuple[str | None, tuple[str, int] | None]:
    """(problem, None) or (None, (host, port)): the address, and a token when it is beyond loopback."""
    from flockparse.dashboard.server import parse_dashboard_address
    from flockparse.serve.runner import check_listen

    try:
        host, port = parse_dashboard_address(text)
        check_listen(host, token)
    except ValueError as exc:
        return f"--dashboard: {exc}" if not str(exc).startswith("--dashboard") else str(exc), None
    return None, (host, port)


SERVE_ONLY_FLAGS = ("listen", "grace")


def unused_serve_flag(args: argparse.Namespace) -> str | None:
    """--listen and --grace belong to `serve`: elsewhere they would be silently ignored."""
    given = [f"--{name}" for name in SERVE_ONLY_FLAGS if getattr(args, name) is not None]
    if not given:
        return None
    return f"{', '.join(given)}: only with `serve` (e.g. `serve --listen 127.0.0.1:11435`)"


def serve_usage_problem(args: argparse.Namespace, words: list[str]) -> str | None:
    if len(words) > 1:
        return f"serve takes no argument, got `{words[1]}` (flags: --listen HOST:PORT, --token, --grace S)"
    if args.demo:
        return (
            "serve runs in front of real nodes: drop --demo (`python3 -m ollama_sim` starts a simulated node)"
        )
    if args.json or args.watch is not None or args.node or args.dry_run or args.force:
        return "serve takes no --json, --watch, --node, --dry-run or --force"
    if args.connect:
        return "serve runs a cluster; --connect attaches a console to one: use one or the other"
    return None


def serve_state_dir(config: Config) -> Path:
    """Where serve registers itself and keeps its state: the config file's directory (the config dir)."""
    return config.path.parent if config.path is not None else config_dir()


def serve(args: argparse.Namespace, config: Config, reporter: Reporter) -> int:
    """`serve`: the health monitor, the optimizer (unless --no-optimizer) and the HTTP server, headless,
    until SIGTERM/SIGINT (flockparse/serve). Usage problems exit 2 before any node is contacted."""
    from flockparse.serve.runner import (
        DEFAULT_GRACE_S,
        DEFAULT_LISTEN,
        ServeError,
        check_grace,
        check_listen,
        parse_listen,
        run_serve,
    )

    token = args.token or os.environ.get(TOKEN_ENV) or None
    try:
        host, port = parse_listen(args.listen or DEFAULT_LISTEN)
        grace = DEFAULT_GRACE_S if args.grace is None else check_grace(args.grace)
        check_listen(host, token)
    except ServeError as exc:
        return reporter.error(str(exc), EXIT_USAGE)
    logging.basicConfig(stream=sys.stderr, level=logging.WARNING, format=LOG_FORMAT)  # the core's warnings
    balancer = make_balancer(config, optimize=not args.no_optimizer)
    try:
        return run_serve(
            balancer,
            host=host,
            port=port,
            token=token,
            grace=grace,
            state_dir=serve_state_dir(config),
            config=config,
        )
    except ServeError as exc:
        return reporter.error(str(exc), 1)
    finally:
        balancer.close()


def batch_context(
    balancer: OllamaLoadBalancer,
    config: Config,
    reporter: Reporter,
    verbose: bool,
    files_dir: Path | None = None,
    serve_of: Any = None,
) -> Context:
    """The context of one-shot and stdin modes: plain output, progress on stderr; history is read from
    `files_dir` (the config directory unless --demo), never recorded. `serve_of()`: a serve managing these
    nodes (cleanup refuses to act behind its back)."""
    from flockparse.console.services import history_reader

    return Context(
        balancer=balancer,
        console=make_one_shot_console(),
        config=config,
        progress=reporter.errors,
        verbose=verbose,
        history=history_reader(config, files_dir or config_dir()),
        attached=attached_to(balancer),
        serve_of_nodes=serve_of,
    )


SERVE_FLAGS = ("nodes", "config", "demo", "priority", "interval", "health_interval", "load_timeout")


def run_attached(args: argparse.Namespace, words: list[str], script: bool, reporter: Reporter) -> int:
    """`--connect URL`: the same console on a running serve. Every command goes through its control API,
    its events appear above the prompt; no health monitor and no optimizer run here."""
    given = [f"--{name.replace('_', '-')}" for name in (*SERVE_FLAGS, "own_optimizer") if getattr(args, name)]
    if given:
        return reporter.error(
            f"{', '.join(given)}: the serve's settings, not an attached console's (set them on the serve)",
            EXIT_USAGE,
        )
    try:
        timeout = apply_flags(Config(), timeout_flag=args.timeout).timeout
        remote = RemoteCluster(
            args.connect, token=args.token or os.environ.get(TOKEN_ENV) or None, timeout=timeout
        )
    except ValueError as exc:  # ConfigError too: a bad --timeout or address
        return reporter.error(str(exc), EXIT_USAGE)
    try:
        remote.connect()
        config = Config(
            nodes=remote.nodes,
            priority_models=remote.gpu_priority_models,
            interval=remote.check_interval or Config().interval,
            timeout=remote.node_timeout,
            path=None,  # nothing of the serve's is saved by a console
            nodes_from="serve",
        )
        if words:
            return run_one_shot(remote, config, words, reporter, args.verbose)
        if script:
            return run_script(remote, config, reporter, args.verbose)
        return interactive(
            remote, config, attached_banner(remote, bool(args.dashboard)), verbose=args.verbose
        )
    except RemoteError as exc:  # the serve could not be read at start
        return reporter.error(str(exc), 1)
    finally:
        remote.close()


def attached_banner(remote: RemoteCluster, dashboard: bool = False) -> str:
    """What an attached console says first; with --dashboard, where the serve's dashboard is (one per
    cluster: the serve's, not a second one here)."""
    state = "on" if remote.optimization_running else "off"
    banner = (
        f"attached to the serve at {remote.url} (flockparse {remote.version}, {len(remote.nodes)} node(s), "
        f"optimizer {state}): commands run there, its events show here; this console runs no optimizer"
    )
    if dashboard:
        page = dashboard_url(remote.url)
        banner += f"\n--dashboard: the serve already serves the dashboard at {page} (no second one here)"
    return banner


def run_one_shot(
    balancer: OllamaLoadBalancer,
    config: Config,
    words: list[str],
    reporter: Reporter,
    verbose: bool = False,
    files_dir: Path | None = None,
    serve_of: Any = None,
) -> int:
    """No optimizer thread; the health monitor and its first round (bounded) only if the command needs it."""
    try:  # a mistyped command is told at once, before any node is contacted
        cmd = resolve(words[0])
        check_arity(cmd, words[1:])
    except CommandError as exc:
        return reporter.error(str(exc), exc.exit_code)
    ctx = batch_context(balancer, config, reporter, verbose, files_dir, serve_of)
    if cmd.wants_nodes(words[1:]):
        start_and_check(balancer, config, reporter)
    return one_shot(ctx, words, reporter)


def exit_without_joining_core_threads(code: int) -> None:
    """Leave at once, after main() has closed everything: do not join the core's pool threads.

    Python joins ThreadPoolExecutor workers at exit, so a cancelled `force_gpu` whose node is still
    loading (a blocking HTTP request with a long timeout) would hold `exit` for minutes.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def cli() -> None:
    """The installed `flockparse` command: the same as `python3 flockparsecli.py`."""
    exit_without_joining_core_threads(main())


if __name__ == "__main__":
    cli()
