#!/usr/bin/env python3
"""FlockParse console: keep an Ollama cluster's models on GPU, interactively or one command at a time.

    python3 flockparsecli.py [--nodes URL,...] [--config FILE]        # interactive console
    python3 flockparsecli.py [flags] COMMAND [ARGS] [--json]          # one command, for scripts and cron
    python3 flockparsecli.py --demo                                   # a simulated three-node cluster

The console is a client of the core (balancer.OllamaLoadBalancer): it renders what the core returns and
the Events it emits, and never reaches into private state.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import queue
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

from rich.console import Console
from rich.text import Text

from console import render
from console.commands import (
    REGISTRY,
    CommandError,
    Context,
    Outcome,
    check_arity,
    dispatch,
    parse_line,
    resolve,
)
from console.config import Config, ConfigError, config_dir, load_config
from flockparse.balancer import OllamaLoadBalancer
from gpu_controller import GPUController

__all__ = ["OllamaLoadBalancer", "GPUController", "main"]

PROMPT = "⚡ Enter command: "
ONE_SHOT_PIPE_WIDTH = 120  # columns when one-shot output goes to a pipe or file
ONE_SHOT_PROGRESS = ("move_started", "move_finished", "move_failed")  # event lines shown on stderr
EXIT_INTERRUPTED = 130  # what shells report for a command ended by Ctrl-C
HEALTH_POLL_S = 0.05
FIRST_ROUND_SLACK_S = 2.0  # on top of two per-request timeouts (a status and a tags request per node)
SHUTDOWN_DRAIN_S = 2.0  # at exit, how long queued event lines may take to print
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"

log = logging.getLogger("flockparsecli")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flockparsecli.py",
        description="Keep an Ollama cluster's models on GPU. Without COMMAND: the interactive console.",
        epilog=f"commands: {', '.join(REGISTRY)}. Config dir: $FLOCKPARSE_CONFIG_DIR or {config_dir()}.",
    )
    parser.add_argument(
        "--nodes",
        metavar="URL,...",
        help="comma-separated node URLs (default: config, $OLLAMA_HOST, localhost)",
    )
    parser.add_argument(
        "--priority", metavar="MODEL,...", help="comma-separated models the optimizer keeps on GPU (globs, *)"
    )
    parser.add_argument(
        "--interval", type=float, metavar="SECONDS", help="seconds between optimizer passes (default 300)"
    )
    parser.add_argument(
        "--health-interval",
        type=float,
        metavar="SECONDS",
        help="seconds between node health checks (default 5)",
    )
    parser.add_argument(
        "--timeout", type=float, metavar="SECONDS", help="seconds per request to a node (default 5)"
    )
    parser.add_argument("--no-optimizer", action="store_true", help="do not start the background optimizer")
    parser.add_argument(
        "--config", metavar="FILE", help="TOML config file (default: <config dir>/config.toml)"
    )
    parser.add_argument("--demo", action="store_true", help="start a simulated 3-node cluster in-process")
    parser.add_argument("--json", action="store_true", help="one-shot: print the result as JSON")
    parser.add_argument(
        "command", nargs="*", metavar="COMMAND", help="run one command and exit (e.g. vram_report --json)"
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
        controller=GPUController(timeout=config.timeout, keep_alive=config.keep_alive),
        start=False,
        on_gpu_lost=config.on_gpu_lost,
        remedy_timeout=config.remedy_timeout,
    )


class EventPrinter:
    """Core Events -> one rendered line each, printed by our own thread so the core never waits on a tty."""

    def __init__(self, console: Console, kinds: Sequence[str] | None = None) -> None:
        self.console, self.kinds = console, kinds
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._move_started: dict[tuple[str | None, str | None], float] = {}
        self._idle = threading.Event()
        self._idle.set()
        self._thread = threading.Thread(target=self._run, name="event-printer", daemon=True)
        self._thread.start()

    def __call__(self, event: Any) -> None:
        if (self.kinds is None or event.kind in self.kinds) and render.worth_showing(event):
            self._idle.clear()
            self._queue.put(event)

    def _duration(self, event: Any) -> float | None:
        """Seconds since the matching move_started: the number a user wants to see next to a move."""
        key = (event.node, event.model)
        if event.kind == "move_started":
            self._move_started[key] = event.time
        elif event.kind in ("move_finished", "move_failed") and key in self._move_started:
            return event.time - self._move_started.pop(key)
        return None

    def _run(self) -> None:
        while True:
            event = self._queue.get()
            if event is None:
                return
            line = render.event_line(event, self._duration(event))
            self.console.print(line, soft_wrap=True, highlight=False)
            if self._queue.empty():
                self._idle.set()

    def drain(self, timeout: float) -> None:
        """Wait (bounded) until queued lines are printed, e.g. the `optimizer stopped` line at exit."""
        self._idle.wait(timeout)

    def close(self) -> None:
        self._queue.put(None)


def first_round_timeout(config: Config) -> float:
    return 2 * config.timeout + FIRST_ROUND_SLACK_S


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


def warn_if_unreachable(balancer: OllamaLoadBalancer, config: Config, console: Console) -> None:
    hint = unreachable_hint(first_health_round(balancer, first_round_timeout(config)), config)
    if hint:
        console.print(render.error_line(hint))


def unreachable_hint(states: list[Any], config: Config) -> str | None:
    """One clear line when nothing answers, suggesting --demo (per-node lines come from node_down events)."""
    if not states or any(state.online for state in states):
        return None
    where = states[0].url if len(states) == 1 else f"any of the {len(states)} nodes"
    return (
        f"no Ollama answered at {where}: start Ollama, pass --nodes URL,..., or try `flockparsecli.py --demo`"
    )


def print_outcome(console: Console, outcome: Outcome) -> None:
    if outcome.renderable is not None:
        console.print(outcome.renderable)


def run_line(ctx: Context, line: str) -> Outcome:
    """Parse and dispatch one line; any failure becomes one red line and the console carries on."""
    try:
        outcome = dispatch(ctx, parse_line(line))
    except CommandError as exc:
        ctx.console.print(render.error_line(str(exc)))
        return Outcome(ok=False)
    except KeyboardInterrupt:  # Ctrl-C during a short command: nothing to cancel in the core
        ctx.console.print(render.error_line("cancelled"))
        return Outcome(ok=False)
    except Exception as exc:  # a core bug must not end the console the user lives in
        log.exception("command %r failed", line)
        where = config_dir() / "console.log"
        ctx.console.print(
            render.error_line(f"{line.split()[0]} failed: {type(exc).__name__}: {exc} (see {where})")
        )
        return Outcome(ok=False)
    print_outcome(ctx.console, outcome)
    return outcome


def one_shot(ctx: Context, words: list[str], as_json: bool) -> int:
    """Run one command; exit 0 on success, 1 when it failed or a node was unreachable, 2 on usage errors."""
    errors = Console(stderr=True, highlight=False, soft_wrap=True)
    try:
        outcome = dispatch(ctx, words)
    except CommandError as exc:
        errors.print(render.error_line(str(exc)))
        return exc.exit_code
    except KeyboardInterrupt:
        errors.print(render.error_line("cancelled"))
        return EXIT_INTERRUPTED
    except Exception as exc:
        log.exception("command %r failed", words)
        errors.print(render.error_line(f"{words[0]} failed: {type(exc).__name__}: {exc}"))
        return 1
    if as_json:
        sys.stdout.write(json.dumps(outcome.data, default=str, indent=2) + "\n")
    else:
        print_outcome(ctx.console, outcome)
    return 0 if outcome.ok else 1


def make_one_shot_console() -> Console:
    """The terminal's width on a tty; 120 columns into a pipe or file, so tables stay readable in logs."""
    return Console(highlight=False, width=None if sys.stdout.isatty() else ONE_SHOT_PIPE_WIDTH)


def make_interactive_console() -> Console:
    """Rich writes raw ANSI (colours detected on the real terminal) into patch_stdout's proxy."""
    probe = Console()
    return Console(force_terminal=True, color_system=probe.color_system or "standard", highlight=False)


def interactive(
    balancer: OllamaLoadBalancer,
    config: Config,
    banner: str | None = None,
    demo_script: Any = None,
    console: Console | None = None,
    pt_input: Any = None,
    pt_output: Any = None,
) -> int:
    """The prompt_toolkit loop; background lines appear above the prompt, the typed line stays intact.

    `console`, `pt_input` and `pt_output` let tests drive the real loop through a pipe.
    """
    from prompt_toolkit import PromptSession
    from prompt_toolkit.history import FileHistory
    from prompt_toolkit.patch_stdout import patch_stdout

    from console.completion import ConsoleCompleter, ModelNameRefresher
    from console.toolbar import TOOLBAR_STYLE, toolbar_fragments, toolbar_state

    console = console or make_interactive_console()
    ctx = Context(balancer=balancer, console=console, config=config)
    printer = EventPrinter(console)
    unsubscribe = balancer.subscribe(printer)
    refresher = ModelNameRefresher(balancer.known_models).start()
    history_dir = config_dir()
    history_dir.mkdir(parents=True, exist_ok=True)
    # tracebacks (a failing command, a failing event subscriber) go to a file, never into the prompt
    logging.basicConfig(filename=history_dir / "console.log", level=logging.WARNING, format=LOG_FORMAT)
    session: PromptSession[str] = PromptSession(
        history=FileHistory(str(history_dir / "history")),
        completer=ConsoleCompleter(
            {
                "MODEL": lambda: refresher.names,
                "NODE": lambda: balancer.nodes,
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
            balancer.start()  # after subscribing, so the "enabled" line and node_down lines are shown
            if demo_script is not None:
                demo_script.start(printer, ready=lambda: balancer.optimizer_status()["last_pass"] is not None)
            threading.Thread(
                target=warn_if_unreachable, args=(balancer, config, console), name="first-health", daemon=True
            ).start()  # the prompt comes up at once; the hint appears above it if nothing answers
            while True:
                try:
                    line = session.prompt(PROMPT)
                except KeyboardInterrupt:
                    continue  # Ctrl-C clears the half-typed line, like a shell
                except EOFError:
                    break
                if run_line(ctx, line).exit:
                    break
            balancer.stop_gpu_optimization()
            printer.drain(SHUTDOWN_DRAIN_S)
    finally:
        unsubscribe()
        printer.close()
        refresher.stop()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_intermixed_args(argv)
    cluster, banner, script = None, None, None
    try:
        if args.demo:
            from console.demo import DemoScript, demo_banner, demo_config, start_demo_cluster

            cluster = start_demo_cluster()
            config = demo_config(cluster.urls)
            banner = demo_banner(cluster.urls)
            script = DemoScript(cluster)
        else:
            config = load_config(
                args.config, args.nodes, args.priority, args.interval, args.health_interval, args.timeout
            )
    except ConfigError as exc:
        Console(stderr=True, soft_wrap=True).print(render.error_line(str(exc)))
        return 2
    words = list(args.command)
    balancer = make_balancer(config, optimize=not words and not args.no_optimizer)
    try:
        if words:
            return run_one_shot(balancer, config, words, args.json)
        return interactive(balancer, config, banner, script)
    finally:
        if script is not None:
            script.stop()
        balancer.close()
        if cluster is not None:
            cluster.stop()


def run_one_shot(balancer: OllamaLoadBalancer, config: Config, words: list[str], as_json: bool) -> int:
    """Health monitor only (no optimizer thread), one bounded health round, then the command."""
    errors = Console(stderr=True, highlight=False, soft_wrap=True)
    try:  # a mistyped command is told at once, before any node is contacted
        check_arity(resolve(words[0]), words[1:])
    except CommandError as exc:
        errors.print(render.error_line(str(exc)))
        return exc.exit_code
    ctx = Context(balancer=balancer, console=make_one_shot_console(), config=config, progress=errors)
    if not as_json:
        balancer.subscribe(EventPrinter(errors, ONE_SHOT_PROGRESS))
    balancer.start()
    hint = unreachable_hint(first_health_round(balancer, first_round_timeout(config)), config)
    if hint:
        errors.print(render.error_line(hint))
    return one_shot(ctx, words, as_json)


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
