"""The command registry and its handlers: one table drives dispatch, `help`, arity errors and completion.

A handler is `handler(ctx, args) -> Outcome`; it calls the balancer's public API and returns the core's
value (`data`, printed as JSON by `--json`) plus a renderable built by render.py. Bad input raises
CommandError / UsageError with a one-line message; the caller prints it and carries on.
"""

from __future__ import annotations

import dataclasses
import difflib
import shlex
import signal
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console, RenderableType
from rich.text import Text

from console import render
from console.config import Config, ConfigError, normalize_url, save_nodes
from flockparse.rules import model_key

CANCEL_GRACE_S = 0.5  # after Ctrl-C, how long we give the core to notice the cancel Event


class CommandError(Exception):
    """The command could not do its job; one line for the user. One-shot exit code 1."""

    exit_code = 1


class UsageError(CommandError):
    """The line itself is wrong (unknown command, arity, bad number). One-shot exit code 2."""

    exit_code = 2


class Cancelled(CommandError):
    """Ctrl-C during a long command: the cancel Event was set and we returned to the prompt."""


@dataclass
class Outcome:
    """What a handler produced: `data` for --json, `renderable` for people, `ok` for the exit code."""

    data: Any = None
    renderable: RenderableType | None = None
    ok: bool = True
    exit: bool = False


@dataclass
class Context:
    """What handlers may touch: the balancer's public API, the console, the config, a cancel Event."""

    balancer: Any
    console: Console
    config: Config
    cancel: threading.Event = field(default_factory=threading.Event)
    progress: Console | None = None  # where "working..." notes go (stderr in one-shot, so --json stays clean)

    def note(self, message: str) -> None:
        (self.progress or self.console).print(Text(message, style="dim"))

    def run_cancellable(self, work: Callable[[threading.Event], Any]) -> Any:
        """Run a long core call in a worker thread; Ctrl-C sets its cancel Event and returns to the prompt."""
        self.cancel = threading.Event()
        done = threading.Event()
        box: dict[str, Any] = {}

        def worker() -> None:
            try:
                box["value"] = work(self.cancel)
            except BaseException as exc:  # handed to the main thread below, never swallowed
                box["error"] = exc
            finally:
                done.set()

        with ctrl_c_sets(self.cancel):
            threading.Thread(target=worker, name="console-command", daemon=True).start()
            while not (done.wait(0.1) or self.cancel.is_set()):  # the SIGINT handler runs between waits
                continue
        if self.cancel.is_set():  # the core stops at its next check point
            if done.wait(CANCEL_GRACE_S):
                raise Cancelled("cancelled")
            raise Cancelled("cancelled (a step already under way finishes in the background)")
        if "error" in box:
            raise box["error"]
        return box.get("value")


@contextmanager
def ctrl_c_sets(event: threading.Event) -> Iterator[None]:
    """While a long command runs, SIGINT sets `event` instead of raising KeyboardInterrupt.

    A KeyboardInterrupt lands wherever the main thread happens to be, including inside a lock taken
    by a print; an Event set by the handler cannot leave anything half done.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, lambda signum, frame: event.set())
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


@dataclass(frozen=True)
class Command:
    """One console command: name, help text, argument spec (names in CAPS), optional subcommands."""

    name: str
    handler: Callable[[Context, list[str]], Outcome]
    description: str
    args: tuple[str, ...] = ()
    optional: tuple[str, ...] = ()
    aliases: tuple[str, ...] = ()
    subcommands: Mapping[str, tuple[str, ...]] | None = None

    @property
    def usage(self) -> str:
        if self.subcommands:
            subs = "|".join(f"{sub} {' '.join(args)}".strip() for sub, args in self.subcommands.items())
            return f"{self.name} {subs}"
        spec = list(self.args) + [f"[{name}]" for name in self.optional]
        return " ".join([self.name, *spec])


REGISTRY: dict[str, Command] = {}


def command(
    name: str,
    description: str,
    args: tuple[str, ...] = (),
    optional: tuple[str, ...] = (),
    aliases: tuple[str, ...] = (),
    subcommands: Mapping[str, tuple[str, ...]] | None = None,
) -> Callable[[Callable[[Context, list[str]], Outcome]], Callable[[Context, list[str]], Outcome]]:
    """Register a handler (litecli's special-command pattern)."""

    def register(handler: Callable[[Context, list[str]], Outcome]) -> Callable[[Context, list[str]], Outcome]:
        REGISTRY[name] = Command(name, handler, description, args, optional, aliases, subcommands)
        return handler

    return register


def all_names() -> list[str]:
    return [name for cmd in REGISTRY.values() for name in (cmd.name, *cmd.aliases)]


def resolve(name: str) -> Command:
    """Find a command by name or alias; else a one-line error with a did-you-mean."""
    for cmd in REGISTRY.values():
        if name == cmd.name or name in cmd.aliases:
            return cmd
    close = difflib.get_close_matches(name, all_names(), n=1, cutoff=0.6)
    hint = f"did you mean `{close[0]}`? " if close else ""
    raise UsageError(f"unknown command `{name}` ({hint}try `help`)")


def check_arity(cmd: Command, args: list[str]) -> None:
    """Uniform `missing argument` / `extra argument` errors from the declared spec."""
    if cmd.subcommands:
        if not args:
            raise UsageError(f"missing argument: usage: {cmd.usage}")
        if args[0] not in cmd.subcommands:
            close = difflib.get_close_matches(args[0], list(cmd.subcommands), n=1, cutoff=0.5)
            hint = f" (did you mean `{close[0]}`?)" if close else ""
            raise UsageError(f"{cmd.name}: unknown subcommand `{args[0]}`{hint}: usage: {cmd.usage}")
        required, optional, rest = cmd.subcommands[args[0]], (), args[1:]
        usage = " ".join([cmd.name, args[0], *required])
    else:
        required, optional, rest, usage = cmd.args, cmd.optional, args, cmd.usage
    if len(rest) < len(required):
        raise UsageError(f"missing argument {required[len(rest)]}: usage: {usage}")
    if len(rest) > len(required) + len(optional):
        raise UsageError(f"extra argument `{rest[len(required) + len(optional)]}`: usage: {usage}")


def parse_line(line: str) -> list[str]:
    try:
        return shlex.split(line)
    except ValueError as exc:
        raise UsageError(f"cannot parse the line: {exc}") from None


def dispatch(ctx: Context, words: list[str]) -> Outcome:
    """Resolve, check arity, run. Raises CommandError/UsageError with a one-line message."""
    if not words:
        return Outcome()
    cmd = resolve(words[0])
    check_arity(cmd, words[1:])
    return cmd.handler(ctx, words[1:])


# ---------------------------------------------------------------- helpers


def as_dict(value: Any) -> dict[str, Any]:
    """NodeState snapshots (dataclasses or objects) -> plain dicts for render and --json."""
    if isinstance(value, Mapping):
        return dict(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    return {key: val for key, val in vars(value).items() if not key.startswith("_")}


def check_known_model(ctx: Context, name: str) -> None:
    """Refuse a model no node knows, before touching any node."""
    known = ctx.balancer.known_models()
    if model_key(name) in {model_key(model) for model in known}:
        return
    if not known:
        raise CommandError(
            f"unknown model {name} (no models known yet: are the nodes reachable? try `nodes`)"
        )
    shown = ", ".join(sorted(known)[:5]) + (", ..." if len(known) > 5 else "")
    raise CommandError(f"unknown model {name} (known: {shown})")


def persist_nodes(ctx: Context, extra_gpu: dict[str, bool] | None = None) -> str:
    """Write the current node list to the config file atomically; returns a note for the user."""
    ctx.config.gpu.update(extra_gpu or {})
    if ctx.config.path is None:
        return "(not saved: no config file in this mode)"
    try:
        save_nodes(ctx.config.path, list(ctx.balancer.nodes), ctx.config.gpu)
    except (OSError, ConfigError) as exc:
        return f"(could not save to {ctx.config.path}: {exc})"
    return f"(saved to {ctx.config.path})"


def _moves_ok(results: list[dict[str, Any]]) -> bool:
    """Failed if a move failed or a node was unreachable; a node without a GPU is not a failure."""
    for item in results:
        result = item["result"]
        if result.get("reason") in ("offline", "unreachable", "timeout"):
            return False
        if not (result.get("success") or result.get("skipped") or result.get("reason") == "no_gpu"):
            return False
    return True


# ---------------------------------------------------------------- commands


@command("help", "show the commands, or one command's usage", optional=("COMMAND",), aliases=("?",))
def cmd_help(ctx: Context, args: list[str]) -> Outcome:
    if args:
        cmd = resolve(args[0])
        return Outcome(data={"usage": cmd.usage}, renderable=Text(f"{cmd.usage}\n  {cmd.description}"))
    return Outcome(
        data=[cmd.usage for cmd in REGISTRY.values()], renderable=render.help_table(REGISTRY.values())
    )


@command("nodes", "list the nodes: online, GPU, latency, last error")
def cmd_nodes(ctx: Context, args: list[str]) -> Outcome:
    states = [as_dict(state) for state in ctx.balancer.node_states()]
    return Outcome(
        data=states, renderable=render.nodes_table(states), ok=all(s.get("online") for s in states)
    )


@command(
    "add_node",
    "add a node (and save it); optionally declare it gpu or cpu",
    args=("URL",),
    optional=("gpu|cpu",),
)
def cmd_add_node(ctx: Context, args: list[str]) -> Outcome:
    flags = {"gpu": True, "cpu": False}
    if len(args) > 1 and args[1].lower() not in flags:
        raise UsageError(f"add_node: expected `gpu` or `cpu` after the URL, got `{args[1]}`")
    has_gpu = flags[args[1].lower()] if len(args) > 1 else None
    try:
        url = normalize_url(args[0])
        if url in ctx.balancer.nodes:
            raise CommandError(f"{url} is already a node")
        state = ctx.balancer.add_node(url, has_gpu=has_gpu)
    except ValueError as exc:
        raise CommandError(str(exc)) from None
    note = persist_nodes(ctx, {url: has_gpu} if has_gpu is not None else None)
    return Outcome(data=as_dict(state), renderable=Text(f"added {url} {note}"))


@command("remove_node", "remove a node (and save the change)", args=("NODE",), aliases=("rm_node",))
def cmd_remove_node(ctx: Context, args: list[str]) -> Outcome:
    try:
        url = normalize_url(args[0])
    except ValueError as exc:
        raise CommandError(str(exc)) from None
    if not ctx.balancer.remove_node(url):
        raise CommandError(f"{url} is not a node (nodes: {', '.join(ctx.balancer.nodes) or 'none'})")
    return Outcome(data={"removed": url}, renderable=Text(f"removed {url} {persist_nodes(ctx)}"))


@command("vram_report", "where every model sits on every node: GPU, CPU or split; VRAM, RAM, expiry")
def cmd_vram_report(ctx: Context, args: list[str]) -> Outcome:
    report = ctx.run_cancellable(lambda cancel: ctx.balancer.vram_report())
    ok = not any(render.is_offline(entry) for entry in report)
    return Outcome(data=report, renderable=render.vram_report(report), ok=ok)


@command("lb_stats", "per node: online, GPU, latency, requests, errors, in flight; optimizer state")
def cmd_lb_stats(ctx: Context, args: list[str]) -> Outcome:
    stats = ctx.balancer.get_stats()
    models = {state.url: state.models for state in ctx.balancer.node_states()}
    for node in stats.get("nodes", []):  # get_stats counts models; the table names the ones in VRAM
        node.setdefault("models_in_vram", render.vram_model_names(models.get(render.node_of(node), [])))
    ok = all(node.get("online") for node in stats.get("nodes", []))
    return Outcome(data=stats, renderable=render.lb_stats(stats), ok=ok)


def _force(ctx: Context, model: str, target: str) -> Outcome:
    check_known_model(ctx, model)
    method = ctx.balancer.force_gpu_all_nodes if target == "GPU" else ctx.balancer.force_cpu_all_nodes
    ctx.note(f"forcing {model} to {target} on all nodes... (Ctrl-C cancels)")
    results = ctx.run_cancellable(lambda cancel: method(model, cancel=cancel))
    return Outcome(
        data=results, renderable=render.move_results(model, target, results), ok=_moves_ok(results)
    )


@command("force_gpu", "load MODEL fully on GPU on every GPU node, verified", args=("MODEL",))
def cmd_force_gpu(ctx: Context, args: list[str]) -> Outcome:
    return _force(ctx, args[0], "GPU")


@command(
    "force_cpu",
    "move MODEL to CPU (RAM) on every node, verified; the optimizer leaves it there",
    args=("MODEL",),
)
def cmd_force_cpu(ctx: Context, args: list[str]) -> Outcome:
    return _force(ctx, args[0], "CPU")


OPTIMIZER_SUBCOMMANDS = {"on": (), "off": (), "status": (), "now": (), "interval": ("SECONDS",)}


@command(
    "optimizer",
    "the background optimizer: start, stop, status, one pass now, interval",
    subcommands=OPTIMIZER_SUBCOMMANDS,
)
def cmd_optimizer(ctx: Context, args: list[str]) -> Outcome:
    balancer, sub = ctx.balancer, args[0]
    if sub == "on":
        balancer.auto_optimize_gpu = True
        balancer._start_gpu_optimization()  # public in the product spec despite the underscore
    elif sub == "off":
        balancer.stop_gpu_optimization()
    elif sub == "interval":
        try:
            seconds = float(args[1])
        except ValueError:
            raise UsageError(f"optimizer interval: `{args[1]}` is not a number of seconds") from None
        if not seconds > 0:
            raise UsageError("optimizer interval: must be more than 0 seconds")
        balancer.check_interval = seconds
    elif sub == "now":
        ctx.note("running one optimizer pass over all nodes... (Ctrl-C cancels)")
        actions = ctx.run_cancellable(lambda cancel: balancer.optimize_gpu_once(cancel=cancel))
        ok = not any(action.get("action") == "failed" for action in actions)
        return Outcome(data=actions, renderable=render.pass_actions(actions), ok=ok)
    status = balancer.optimizer_status()
    return Outcome(data=status, renderable=render.optimizer_status(status))


PRIORITY_SUBCOMMANDS = {"list": (), "add": ("MODEL",), "remove": ("MODEL",)}


@command(
    "priority", "the models the optimizer keeps on GPU (names, globs, `*`)", subcommands=PRIORITY_SUBCOMMANDS
)
def cmd_priority(ctx: Context, args: list[str]) -> Outcome:
    balancer, sub = ctx.balancer, args[0]
    current = list(balancer.gpu_priority_models)
    if sub == "add":
        name = args[1]
        if not any(char in name for char in "*?[") and name.lower() not in {c.lower() for c in current}:
            check_known_model(ctx, name)
        if name.lower() in {c.lower() for c in current}:
            raise CommandError(f"{name} is already a priority model")
        balancer.gpu_priority_models = [*current, name]  # a new list: the optimizer may be iterating
    elif sub == "remove":
        keep = [c for c in current if c.lower() != args[1].lower() and model_key(c) != model_key(args[1])]
        if len(keep) == len(current):
            raise CommandError(
                f"{args[1]} is not a priority model (priority: {', '.join(current) or 'none'})"
            )
        balancer.gpu_priority_models = keep
    models = list(balancer.gpu_priority_models)
    return Outcome(data=models, renderable=render.string_list("priority models", models))


@command("exit", "stop the optimizer and leave (Ctrl-D too)", aliases=("quit",))
def cmd_exit(ctx: Context, args: list[str]) -> Outcome:
    return Outcome(exit=True)
