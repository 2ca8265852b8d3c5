"""The command registry and its handlers: one table drives dispatch, `help`, arity errors and completion.

A handler is `handler(ctx, args) -> Outcome`; it calls the balancer's public API and returns the core's
value (`data`, printed as JSON by `--json`) plus a renderable built by render.py. Bad input raises
CommandError / UsageError with a one-line message; the caller prints it and carries on.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import fnmatch
import math
import os
import shlex
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console, Group, RenderableType
from rich.text import Text

from flockparse.console import render
from flockparse.console.config import (
    Config,
    ConfigError,
    check_seconds,
    normalize_url,
    parse_duration,
    update_nodes,
)
from flockparse.console.names import ModelNameError, check_name, is_glob, same_name, suggestions, unique_names
from flockparse.console.tty import unbuffered_keys
from flockparse.remote import RemoteError, RemoteRejected
from flockparse.routing import STRATEGY_WORDS

CANCEL_GRACE_S = 0.5  # after Ctrl-C, how long we give the core to notice the cancel Event
SLOW_NOTE_S = 0.5  # a command that waits on nodes longer than this says what it waits for
INTERNAL_KEYS = ("installed_checked_at",)  # core bookkeeping (a monotonic clock): not for users or scripts
EXIT_INTERRUPTED = 130  # what shells report for a command ended by Ctrl-C


class CommandError(Exception):
    """The command could not do its job; one line for the user. One-shot exit code 1."""

    exit_code = 1


class UsageError(CommandError):
    """The line itself is wrong (unknown command, arity, bad number). One-shot exit code 2."""

    exit_code = 2


class Cancelled(CommandError):
    """Ctrl-C during a long command: the cancel Event was set and we returned to the prompt."""

    exit_code = EXIT_INTERRUPTED


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
    verbose: bool = False  # show nodes' raw error texts in move results
    quiet_events: Callable[[str], Any] | None = None  # mutes event lines a command reports itself
    flush_events: Callable[[], None] | None = None  # prints queued event lines before a command's output
    options: dict[str, Any] = field(default_factory=dict)  # this call's --node / --dry-run
    attached: str | None = None  # the serve's URL when the console is attached to one (--connect)
    optimizer_guard: Callable[[], str | None] | None = None  # why this console must not start an optimizer
    serve_of_nodes: Callable[[], str | None] | None = None  # the address of a serve managing these nodes
    history: Any = None  # flockparse.history.History (None: history is off)
    alerter: Any = None  # the running flockparse.alerts.Alerter (interactive console only)

    def note(self, message: str) -> None:
        (self.progress or self.console).print(render.safe_text(message, style="dim"))

    def run_cancellable(self, work: Callable[[threading.Event], Any], slow_note: str | None = None) -> Any:
        """Run a long core call in a worker thread; Ctrl-C sets its cancel Event and returns to the prompt.

        `slow_note` is printed if the call has not returned within SLOW_NOTE_S, so a wait is never silent.
        """
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
            if slow_note and not done.wait(SLOW_NOTE_S) and not self.cancel.is_set():
                self.note(slow_note)
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
    needs_nodes: bool | Callable[[list[str]], bool] = True  # False: answered without any node (no wait)
    complete_as: Mapping[str, str] | None = None  # subcommand -> completion source for its argument
    options: tuple[str, ...] = ()  # e.g. ("--node URL", "--dry-run"): anywhere after the command name
    local_only: str | None = None  # why it is refused when attached to a serve (None: it works there too)

    def wants_nodes(self, args: list[str]) -> bool:
        """Whether this call needs the first health round (one-shot mode waits for it, bounded)."""
        return self.needs_nodes(args) if callable(self.needs_nodes) else self.needs_nodes

    @property
    def usage(self) -> str:
        if self.subcommands:
            subs = "|".join(f"{sub} {' '.join(args)}".strip() for sub, args in self.subcommands.items())
            return f"{self.name} {subs}"
        spec = list(self.args) + [f"[{name}]" for name in (*self.optional, *self.options)]
        return " ".join([self.name, *spec])


REGISTRY: dict[str, Command] = {}


def command(
    name: str,
    description: str,
    args: tuple[str, ...] = (),
    optional: tuple[str, ...] = (),
    aliases: tuple[str, ...] = (),
    subcommands: Mapping[str, tuple[str, ...]] | None = None,
    needs_nodes: bool | Callable[[list[str]], bool] = True,
    complete_as: Mapping[str, str] | None = None,
    options: tuple[str, ...] = (),
    local_only: str | None = None,
) -> Callable[[Callable[[Context, list[str]], Outcome]], Callable[[Context, list[str]], Outcome]]:
    """Register a handler (litecli's special-command pattern)."""

    def register(handler: Callable[[Context, list[str]], Outcome]) -> Callable[[Context, list[str]], Outcome]:
        REGISTRY[name] = Command(
            name,
            handler,
            description,
            args,
            optional,
            aliases,
            subcommands,
            needs_nodes,
            complete_as,
            options,
            local_only,
        )
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


def split_options(cmd: Command, args: list[str]) -> tuple[list[str], dict[str, Any]]:
    """The command's declared options (`--node URL`, `--dry-run`) taken out of its arguments."""
    takes_value = {spec.split()[0]: len(spec.split()) > 1 for spec in cmd.options}
    rest: list[str] = []
    options: dict[str, Any] = {}
    words = iter(args)
    for word in words:
        if word not in takes_value:
            if word.startswith("--") and cmd.options:
                raise UsageError(f"{cmd.name}: unknown option `{word}`: usage: {cmd.usage}")
            rest.append(word)
            continue
        key = word[2:].replace("-", "_")
        if takes_value[word]:
            value = next(words, None)
            if value is None:
                raise UsageError(f"{cmd.name}: {word} needs a value: usage: {cmd.usage}")
            options.setdefault(key, []).append(value)
        else:
            options[key] = True
    return rest, options


def check_arity(cmd: Command, args: list[str]) -> None:
    """Uniform `missing argument` / `extra argument` errors from the declared spec."""
    args, _ = split_options(cmd, args)
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
    if cmd.local_only and ctx.attached:
        where = f"the serve at {ctx.attached}"
        raise CommandError(f"{cmd.name} is not available when attached to {where}: {cmd.local_only}")
    args, ctx.options = split_options(cmd, words[1:])
    try:
        return cmd.handler(ctx, args)
    except RemoteError as exc:  # attached: the serve could not be reached or refused; one line
        if isinstance(exc, RemoteRejected) and exc.status in (400, 404, 413, 422):  # a bad name, node...
            raise UsageError(str(exc)) from None
        raise CommandError(str(exc)) from None


# ---------------------------------------------------------------- helpers


def as_dict(value: Any) -> dict[str, Any]:
    """NodeState snapshots (dataclasses or objects) -> plain dicts for render and --json, minus internals."""
    if isinstance(value, Mapping):
        data = dict(value)
    elif callable(getattr(value, "as_dict", None)):  # the core's own public view
        data = value.as_dict()
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        data = dataclasses.asdict(value)
    else:
        data = {key: val for key, val in vars(value).items() if not key.startswith("_")}
    for key in INTERNAL_KEYS:
        data.pop(key, None)
    return data


def model_name(name: str, allow_glob: bool = False) -> str:
    """The console's one name rule (console.names) as a usage error."""
    try:
        return check_name(name, allow_glob)
    except ModelNameError as exc:
        raise UsageError(str(exc)) from None


def unknown_model_hint(name: str, known: list[str]) -> str:
    """`did you mean `llama3.1:latest`?`, else a few of the known names."""
    close = suggestions(name, known)
    if close:
        return f"did you mean `{close[0]}`?"
    shown = ", ".join(sorted(known)[:5]) + (f", ... ({len(known)} in all)" if len(known) > 5 else "")
    return f"known: {shown}"


def check_known_model(ctx: Context, name: str) -> None:
    """Refuse a model no node knows (exit 2, with a did-you-mean), before touching any node."""
    known = ctx.balancer.known_models()
    if any(same_name(name, model) for model in known):
        return
    if not known:
        raise CommandError(
            f"unknown model {name} (no models known yet: are the nodes reachable? try `nodes`)"
        )
    raise UsageError(f"unknown model {name} ({unknown_model_hint(name, known)})")


def persist_nodes(
    ctx: Context, add: str | None = None, remove: str | None = None, gpu: bool | None = None
) -> str:
    """Apply one node change to the config file's own list (locked, merged with disk); a note for the user.

    A failure raises CommandError: the change holds for this session, but a script must see exit 1.
    """
    url = add or remove
    if gpu is not None and url is not None:
        ctx.config.gpu[url] = gpu
    if ctx.config.path is None:
        return "(not saved: no config file in this mode)"
    # a file without `nodes` starts from the default list in use (e.g. localhost), never a flag's or env's
    base = list(ctx.config.nodes) if ctx.config.nodes_from == "default" else []
    try:
        update_nodes(
            ctx.config.path, add=add, remove=remove, gpu={url: gpu} if gpu is not None and url else None,
            base=base, base_gpu=dict(ctx.config.gpu) if base else None,
        )  # fmt: skip
    except (OSError, ConfigError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise CommandError(
            f"{'added' if add else 'removed'} {url} for this session, but could not save to "
            f"{ctx.config.path}: {reason}"
        ) from None
    if ctx.config.nodes_from in ("flag", "env"):
        source = "--nodes" if ctx.config.nodes_from == "flag" else "$OLLAMA_HOST"
        return f"(saved to {ctx.config.path}; the {source} list of this run is not saved)"
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


def _muted(ctx: Context, what: str) -> Any:
    """While a command reports its own moves, the event printer leaves them out (no line twice)."""
    return ctx.quiet_events(what) if ctx.quiet_events else contextlib.nullcontext()


# ---------------------------------------------------------------- commands


@command(
    "help",
    "show the commands, or one command's usage",
    optional=("COMMAND",),
    aliases=("?",),
    needs_nodes=False,
)
def cmd_help(ctx: Context, args: list[str]) -> Outcome:
    if args:
        cmd = resolve(args[0])
        return Outcome(data={"usage": cmd.usage}, renderable=Text(f"{cmd.usage}\n  {cmd.description}"))
    return Outcome(
        data=[cmd.usage for cmd in REGISTRY.values()], renderable=render.help_table(REGISTRY.values())
    )


SERVE_NODES = "the serve's nodes come from its --nodes or config file (change them there and restart it)"


@command("nodes", "list the nodes: online, GPU, latency, last error (the full text of the last failure)")
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
    needs_nodes=False,
    local_only=SERVE_NODES,
)
def cmd_add_node(ctx: Context, args: list[str]) -> Outcome:
    flags = {"gpu": True, "cpu": False}
    if len(args) > 1 and args[1].lower() not in flags:
        raise UsageError(f"add_node: expected `gpu` or `cpu` after the URL, got `{args[1]}`")
    has_gpu = flags[args[1].lower()] if len(args) > 1 else None
    try:
        url = normalize_url(args[0])
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if url in ctx.balancer.nodes:
        raise CommandError(f"{url} is already a node")
    try:
        state = ctx.balancer.add_node(url, has_gpu=has_gpu)
    except ValueError as exc:
        raise CommandError(str(exc)) from None
    note = persist_nodes(ctx, add=url, gpu=has_gpu)
    return Outcome(data=as_dict(state), renderable=Text(f"added {url} {note}"))


@command(
    "remove_node",
    "remove a node (and save the change)",
    args=("NODE",),
    aliases=("rm_node",),
    needs_nodes=False,
    local_only=SERVE_NODES,
)
def cmd_remove_node(ctx: Context, args: list[str]) -> Outcome:
    try:
        url = normalize_url(args[0])
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if not ctx.balancer.remove_node(url):
        raise CommandError(f"{url} is not a node (nodes: {', '.join(ctx.balancer.nodes) or 'none'})")
    ctx.config.gpu.pop(url, None)
    return Outcome(data={"removed": url}, renderable=Text(f"removed {url} {persist_nodes(ctx, remove=url)}"))


def filter_report(ctx: Context, report: list[dict[str, Any]], what: str) -> list[dict[str, Any]]:
    """`vram_report NODE` keeps that node; `vram_report MODEL` (name or glob) keeps the nodes holding it,
    with only the matching models. A filter that matches nothing is a one-line error with a did-you-mean."""
    with contextlib.suppress(ConfigError):
        url = normalize_url(what)
        if url in ctx.balancer.nodes:
            return [entry for entry in report if render.node_of(entry) == url]
    pattern = model_name(what, allow_glob=True)

    def matches(name: str) -> bool:
        if is_glob(pattern):
            key = name.casefold()
            return fnmatch.fnmatchcase(key, pattern.casefold()) or fnmatch.fnmatchcase(
                key.removesuffix(":latest"), pattern.casefold()
            )
        return same_name(pattern, name)

    kept = []
    for entry in report:
        models = [m for m in entry.get("models") or [] if matches(str(m.get("name", "")))]
        if models:
            kept.append({**entry, "models": models})
    if not kept:
        known = sorted({str(m.get("name")) for e in report for m in e.get("models") or []})
        hint = unknown_model_hint(pattern, known) if known else "no model is loaded"
        nodes = ", ".join(render.short_url(n) for n in ctx.balancer.nodes)
        raise UsageError(f"no node or loaded model matches {pattern} ({hint}; nodes: {nodes})")
    return kept


def _chosen_node(ctx: Context, what: str | None) -> str | None:
    """The node `vram_report NODE` names (then only that node is asked), else None."""
    if not what:
        return None
    with contextlib.suppress(ConfigError):
        url = normalize_url(what)
        if url in ctx.balancer.nodes:
            return url
    return None


def _report(ctx: Context, what: str | None) -> Outcome:
    node = _chosen_node(ctx, what)
    report = ctx.balancer.vram_report(nodes=[node] if node else None)
    if what:
        report = filter_report(ctx, report, what)
    ok = not any(render.is_offline(entry) for entry in report)
    return Outcome(data=report, renderable=render.vram_report(report), ok=ok)


@command(
    "vram_report",
    "where every model sits on every node: GPU, CPU or split; VRAM, RAM, context, expiry; one model or node",
    optional=("MODEL|NODE",),
    needs_nodes=False,  # it asks every node itself, bounded by the timeout
)
def cmd_vram_report(ctx: Context, args: list[str]) -> Outcome:
    what = args[0] if args else None
    if what is not None and not what.strip():
        raise UsageError("vram_report: the filter is empty: usage: vram_report [MODEL|NODE]")
    if what and "://" not in what:
        model_name(what, allow_glob=True)  # a name no model can have is told before any node is asked
    waiting = f"asking {len(ctx.balancer.nodes)} node(s), up to {ctx.config.timeout:g}s... (Ctrl-C cancels)"
    return ctx.run_cancellable(lambda cancel: _report(ctx, what), slow_note=waiting)


WATCH_RANGE = (0.5, 3600.0)


def watch_seconds(text: str | float) -> float:
    try:
        seconds = float(text)
    except ValueError:
        raise UsageError(f"watch: `{text}` is not a number of seconds") from None
    low, high = WATCH_RANGE
    if not math.isfinite(seconds) or not low <= seconds <= high:
        raise UsageError(f"watch: SECONDS must be between {low:g} and {high:g}, got {seconds:g}")
    return seconds


@command(
    "watch",
    "a live vram_report, redrawn every SECONDS (default 2), like `gpustat -i`; q or Ctrl-C leaves",
    optional=("SECONDS", "MODEL|NODE"),
    needs_nodes=False,
)
def cmd_watch(ctx: Context, args: list[str]) -> Outcome:
    return watch(ctx, *watch_args(args))


def watch_args(args: list[str]) -> tuple[float, str | None]:
    """`watch`, `watch 5`, `watch 5 llama*` and `watch llama*` (a filter alone: every 2 s)."""
    if len(args) == 1 and not _is_number(args[0]):
        return 2.0, args[0]
    return (watch_seconds(args[0]) if args else 2.0), (args[1] if len(args) > 1 else None)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def watch(ctx: Context, seconds: float, what: str | None = None) -> Outcome:
    """Redraw the report in place until q (on a terminal) or Ctrl-C; returns the last report."""
    from rich.live import Live

    stop = threading.Event()
    last = Outcome()
    with (
        ctrl_c_sets(stop),
        key_pressed("q", stop),
        Live(console=ctx.console, auto_refresh=False, transient=False, redirect_stdout=False) as live,
    ):
        while not stop.is_set():
            last = _report(ctx, what)
            header = Text(
                f"every {seconds:g}s, {time.strftime('%H:%M:%S')}  (q or Ctrl-C leaves)", style="dim"
            )
            live.update(Group(header, last.renderable or Text("")), refresh=True)
            stop.wait(seconds)
    return Outcome(data=last.data, ok=last.ok)


@contextmanager
def key_pressed(key: str, event: threading.Event) -> Iterator[None]:
    """On a terminal, set `event` when `key` is typed (the tty is in no-echo, no-line mode meanwhile)."""
    import select

    with unbuffered_keys() as fd:
        if fd is None:
            yield
            return
        done = threading.Event()

        def reader() -> None:
            while not done.is_set() and not event.is_set():
                ready, _, _ = select.select([fd], [], [], 0.1)
                if ready and os.read(fd, 1).decode(errors="replace").lower() == key:
                    event.set()

        thread = threading.Thread(target=reader, name="watch-keys", daemon=True)
        thread.start()
        try:
            yield
        finally:
            done.set()
            thread.join(1.0)


@command(
    "lb_stats",
    "per node: online, GPU, latency, requests, errors, in flight, p50/p95 latency and TTFT, tokens/s",
)
def cmd_lb_stats(ctx: Context, args: list[str]) -> Outcome:
    stats = ctx.balancer.get_stats()
    models = {state.url: state.models for state in ctx.balancer.node_states()}
    for node in stats.get("nodes", []):  # get_stats counts models; the table names the ones in VRAM
        node.setdefault("models_in_vram", render.vram_model_names(models.get(render.node_of(node), [])))
    ok = all(node.get("online") for node in stats.get("nodes", []))
    return Outcome(data=stats, renderable=render.lb_stats(stats), ok=ok)


def _chosen_nodes(ctx: Context) -> list[str] | None:
    """`--node URL` (repeatable): act on those nodes only; None = every node."""
    nodes = ctx.options.get("node")
    if not nodes:
        return None
    try:
        chosen = [normalize_url(node) for node in nodes]
    except ConfigError as exc:
        raise UsageError(str(exc)) from None
    known = ctx.balancer.nodes
    missing = [node for node in chosen if node not in known]
    if missing:
        raise UsageError(
            f"--node {', '.join(missing)}: not in the cluster (nodes: {', '.join(known) or 'none'})"
        )
    return chosen


def _act_on_model(ctx: Context, model: str, what: str) -> Outcome:
    """force_gpu / force_cpu / unload on every node (or --node), a line each; --dry-run changes nothing."""
    model = model_name(model)
    check_known_model(ctx, model)
    method = {
        "GPU": ctx.balancer.force_gpu_all_nodes,
        "CPU": ctx.balancer.force_cpu_all_nodes,
        "unload": ctx.balancer.unload_all_nodes,
    }[what]
    nodes, dry_run = _chosen_nodes(ctx), bool(ctx.options.get("dry_run"))
    extra = {"force": True} if ctx.options.get("force") else {}
    where = f"{len(nodes)} node(s)" if nodes else "all nodes"
    doing = {
        "GPU": f"forcing {model} to GPU",
        "CPU": f"forcing {model} to CPU",
        "unload": f"unloading {model}",
    }
    tail = ": what would be done (nothing is changed)" if dry_run else "... (Ctrl-C cancels)"
    ctx.note(f"{doing[what]} on {where}{tail}")
    try:
        with _muted(ctx, "user"):
            results = ctx.run_cancellable(
                lambda cancel: method(model, cancel=cancel, nodes=nodes, dry_run=dry_run, **extra)
            )
    except ValueError as exc:  # a --node that is not in the cluster
        raise UsageError(str(exc)) from None
    return Outcome(
        data=results,
        renderable=render.move_results(model, what, results, verbose=ctx.verbose),
        ok=_moves_ok(results),
    )


MOVE_OPTIONS = ("--node URL", "--dry-run")


@command(
    "force_gpu",
    "load MODEL fully on GPU on every GPU node, verified; --force tries even where it does not fit",
    args=("MODEL",),
    options=(*MOVE_OPTIONS, "--force"),
)
def cmd_force_gpu(ctx: Context, args: list[str]) -> Outcome:
    return _act_on_model(ctx, args[0], "GPU")


@command(
    "cleanup",
    "unload every model that is not a priority model from VRAM, on every node (or --node), verified",
    options=MOVE_OPTIONS,
)
def cmd_cleanup(ctx: Context, args: list[str]) -> Outcome:
    nodes, dry_run = _chosen_nodes(ctx), bool(ctx.options.get("dry_run"))
    serve = ctx.serve_of_nodes() if ctx.serve_of_nodes and not ctx.attached and not dry_run else None
    if serve:  # only the serve sees the requests streaming through it: from here they would be unloaded
        raise CommandError(
            f"cleanup: the serve at {serve} runs these nodes and sees the requests streaming through it; "
            f"run it there: `flockparsecli.py --connect {serve} cleanup`"
        )
    where = f"{len(nodes)} node(s)" if nodes else "all nodes"
    tail = ": what would be done (nothing is changed)" if dry_run else "... (Ctrl-C cancels)"
    ctx.note(f"unloading every non-priority model from VRAM on {where}{tail}")
    try:
        with _muted(ctx, "user"):
            results = ctx.run_cancellable(
                lambda cancel: ctx.balancer.cleanup(cancel=cancel, nodes=nodes, dry_run=dry_run)
            )
    except ValueError as exc:  # a --node that is not in the cluster
        raise UsageError(str(exc)) from None
    failed = any(not r["result"].get("success") and r["result"].get("reason") != "busy" for r in results)
    return Outcome(
        data=results, renderable=render.cleanup_results(results, verbose=ctx.verbose), ok=not failed
    )


@command(
    "force_cpu",
    "move MODEL to CPU (RAM) on every node where it is loaded, verified; the optimizer leaves it there",
    args=("MODEL",),
    options=MOVE_OPTIONS,
)
def cmd_force_cpu(ctx: Context, args: list[str]) -> Outcome:
    return _act_on_model(ctx, args[0], "CPU")


@command(
    "unload",
    "unload MODEL on every node where it is loaded (like `ollama stop`), verified",
    args=("MODEL",),
    options=MOVE_OPTIONS,
)
def cmd_unload(ctx: Context, args: list[str]) -> Outcome:
    return _act_on_model(ctx, args[0], "unload")


@command(
    "routing",
    "how requests are routed: adaptive, round_robin, least_loaded, lowest_latency (STRATEGY sets it)",
    optional=("STRATEGY",),
    needs_nodes=False,
)
def cmd_routing(ctx: Context, args: list[str]) -> Outcome:
    balancer = ctx.balancer
    if args:
        try:
            balancer.routing = args[0]
        except ValueError as exc:
            raise UsageError(f"routing: {exc}") from None
        ctx.config.routing = balancer.routing
    name = balancer.routing
    shown = Text(f"routing: {name} ({STRATEGY_WORDS[name]})")
    if args and ctx.attached:
        shown.append("; on the serve, until it restarts (its config's `routing` is the default)", style="dim")
    elif args:
        shown.append("; for this session (put `routing` in the config to keep it)", style="dim")
    return Outcome(data={"routing": name, "strategies": list(STRATEGY_WORDS)}, renderable=shown)


@command("route", "which node would serve MODEL next, and why (one line per node)", args=("MODEL",))
def cmd_route(ctx: Context, args: list[str]) -> Outcome:
    model = model_name(args[0])
    check_known_model(ctx, model)
    explained = ctx.balancer.explain_route(model)
    usable = any(not node["skipped"] for node in explained["nodes"])
    return Outcome(data=explained, renderable=render.route_lines(explained), ok=usable)


OPTIMIZER_SUBCOMMANDS = {"on": (), "off": (), "status": (), "now": (), "interval": ("SECONDS",)}


@command(
    "optimizer",
    "the background optimizer: start, stop, status, one pass now (--dry-run: what it would do), interval",
    subcommands=OPTIMIZER_SUBCOMMANDS,
    needs_nodes=lambda args: args[:1] == ["now"],
    options=("--dry-run",),
)
def cmd_optimizer(ctx: Context, args: list[str]) -> Outcome:
    balancer, sub = ctx.balancer, args[0]
    if sub == "on":
        refusal = ctx.optimizer_guard() if ctx.optimizer_guard else None
        if refusal:
            raise CommandError(refusal)
        balancer._start_gpu_optimization()  # public in the product spec despite the underscore; starts once
    elif sub == "off":
        balancer.stop_gpu_optimization()
    elif sub == "interval":
        try:
            seconds = check_seconds(args[1], "interval", "optimizer interval", named=True)
        except ConfigError as exc:
            raise UsageError(str(exc)) from None
        balancer.check_interval = seconds
        ctx.config.interval = seconds
    elif sub == "now" and ctx.options.get("dry_run"):
        ctx.note("what one optimizer pass would do now (nothing is changed)")
        actions = ctx.run_cancellable(lambda cancel: balancer.optimize_gpu_once(cancel=cancel, dry_run=True))
        return Outcome(data=actions, renderable=render.pass_actions(actions, title="optimizer pass, dry run"))
    elif sub == "now":
        ctx.note("running one optimizer pass over all nodes... (Ctrl-C cancels)")
        with _muted(ctx, "pass"):
            actions = ctx.run_cancellable(lambda cancel: balancer.optimize_gpu_once(cancel=cancel))
        ok = not any(action.get("action") == "failed" for action in actions)
        return Outcome(data=actions, renderable=render.pass_actions(actions), ok=ok)
    status = balancer.optimizer_status()
    return Outcome(data=status, renderable=render.optimizer_status(status))


PRIORITY_SUBCOMMANDS = {"list": (), "add": ("MODEL",), "remove": ("MODEL",)}


@command(
    "priority",
    "the models the optimizer keeps on GPU (names, globs, `*`), highest priority first",
    subcommands=PRIORITY_SUBCOMMANDS,
    needs_nodes=lambda args: args[:1] == ["add"],  # add suggests a known name for a typo
    complete_as={"remove": "PRIORITY"},
)
def cmd_priority(ctx: Context, args: list[str]) -> Outcome:
    balancer, sub = ctx.balancer, args[0]
    current = list(balancer.gpu_priority_models)
    note: Text | None = None
    if sub == "add":
        name = model_name(args[1], allow_glob=True)
        if any(same_name(name, c) for c in current):
            raise CommandError(f"{name} is already a priority model")
        known = balancer.known_models()
        if not is_glob(name) and not any(same_name(name, model) for model in known):
            hint = f"; {unknown_model_hint(name, known)}" if known else ""
            note = Text(f"note: {name} is on no node yet; it goes to GPU once a node has it{hint}", "yellow")
        balancer.gpu_priority_models = [*current, name]  # a new list: the optimizer may be iterating
    elif sub == "remove":
        keep = [c for c in current if not same_name(c, args[1])]
        if len(keep) == len(current):
            raise CommandError(
                f"{args[1]} is not a priority model (priority: {', '.join(current) or 'none'})"
            )
        balancer.gpu_priority_models = keep
    models = unique_names(balancer.gpu_priority_models, allow_glob=True)
    shown = render.string_list("priority models", models)
    return Outcome(data=models, renderable=Group(shown, note) if note else shown)


HISTORY_BUCKETS = 24  # sparkline marks over the window
HISTORY_DEFAULT_S = 86400.0
HISTORY_MAX_S = 3650 * 86400.0


def _history_window(ctx: Context) -> float:
    """`--since 24h` (default): the window, in seconds."""
    given = ctx.options.get("since")
    if not given:
        return HISTORY_DEFAULT_S
    try:
        seconds = parse_duration(given[-1], "history --since")
    except ConfigError as exc:
        raise UsageError(str(exc)) from None
    if not 60 <= seconds <= HISTORY_MAX_S:
        raise UsageError("history --since must be between 1m and 3650d")
    return seconds


def _history_filter(ctx: Context, what: str | None) -> tuple[str | None, str | None]:
    """(node, model pattern): a node of the cluster or an address with a scheme is a node, else a model."""
    if not what:
        return None, None
    if not what.strip():
        raise UsageError("history: the filter is empty: usage: history [MODEL|NODE] [--since DURATION]")
    with contextlib.suppress(ConfigError):
        url = normalize_url(what)
        if url in ctx.balancer.nodes or "://" in what:
            return url, None
    return None, model_name(what, allow_glob=True)


@command(
    "history",
    "per model and node over --since (default 24h): share of time on GPU, split, CPU, not loaded; "
    "falls off the GPU, moves, and the placement over time",
    optional=("MODEL|NODE",),
    options=("--since DURATION",),
    needs_nodes=False,
)
def cmd_history(ctx: Context, args: list[str]) -> Outcome:
    from flockparse.history import HistoryError

    seconds = _history_window(ctx)
    what = args[0] if args else None
    node, model = _history_filter(ctx, what)
    if ctx.history is None:
        raise CommandError("placement history is not recorded: history_days = 0 in the config")
    try:
        summary = ctx.history.summary(since_s=seconds, node=node, model=model, buckets=HISTORY_BUCKETS)
    except HistoryError as exc:
        raise CommandError(str(exc)) from None
    if what and not summary.pairs and not summary.nodes:
        everything = ctx.history.summary(since_s=seconds, buckets=1)
        known = sorted({pair.model for pair in everything.pairs})
        hint = f" ({unknown_model_hint(model, known)})" if model and known else ""
        raise UsageError(f"no history of {what} in the last {render.human_seconds(seconds)}{hint}")
    data = summary.as_dict()
    return Outcome(data=data, renderable=render.history_report(data))


ALERTS_SUBCOMMANDS = {"test": (), "status": ()}


@command(
    "alerts",
    "send a test message to each alert channel (test), or show the channels and what fires (status)",
    subcommands=ALERTS_SUBCOMMANDS,
    needs_nodes=False,
)
def cmd_alerts(ctx: Context, args: list[str]) -> Outcome:
    from flockparse.alerts import send_test

    settings = ctx.config.alerts
    where = ctx.config.path or "the config file"
    if not settings.configured:
        raise UsageError(
            f"no alert channel configured: set [alerts] webhook_url or [alerts.email] in {where}"
        )
    if args[0] == "status" and ctx.alerter is not None:
        status = ctx.alerter.status()
        return Outcome(data=status, renderable=render.alert_status(status))
    channels = settings.channels()
    try:
        if args[0] == "status":  # one-shot and stdin modes send nothing: the configured channels only
            shown = [{"channel": channel.describe()} for channel in channels]
            status = {"cooldown_s": settings.cooldown_s, "channels": shown, "running": False}
            return Outcome(data=status, renderable=render.alert_status(status))
        ctx.note(f"sending a test message to {len(channels)} channel(s)... (Ctrl-C cancels)")
        results = ctx.run_cancellable(lambda cancel: send_test(channels))
    finally:
        for channel in channels:
            close = getattr(channel, "close", None)
            if close is not None:
                close()
    return Outcome(data=results, renderable=render.alert_test(results), ok=all(r["ok"] for r in results))


@command("clear", "clear the screen", needs_nodes=False, aliases=("cls",))
def cmd_clear(ctx: Context, args: list[str]) -> Outcome:
    ctx.console.clear()
    return Outcome()


@command(
    "exit", "leave (Ctrl-D too); a local console stops its optimizer", aliases=("quit",), needs_nodes=False
)
def cmd_exit(ctx: Context, args: list[str]) -> Outcome:
    return Outcome(exit=True)
