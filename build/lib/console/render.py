"""Rendering: pure functions from the core's plain return values (dicts, lists) to rich renderables.

Nothing here does I/O or reads the clock except through the `now` argument, so every table and event
line is testable without a terminal. Colours are chosen here and nowhere else.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

FOREVER_AFTER_S = 20 * 365 * 24 * 3600  # `ollama ps` shows "Forever" beyond 20 years

EVENT_STYLE = {
    "node_up": ("node", "green"),
    "node_down": ("node", "red"),
    "node_added": ("node", "cyan"),
    "node_removed": ("node", "cyan"),
    "node_restarted": ("node", "yellow"),
    "move_started": ("move", "yellow"),
    "move_finished": ("move", "green"),
    "move_failed": ("move", "red"),
    "pass_started": ("optimizer", "dim"),
    "pass_finished": ("optimizer", "dim"),
    "optimizer_started": ("optimizer", "bold green"),
    "optimizer_stopped": ("optimizer", "yellow"),
    "gpu_lost": ("GPU LOST", "bold red"),
    "gpu_back": ("GPU", "green"),
    "remedy_started": ("remedy", "yellow"),
    "remedy_finished": ("remedy", "yellow"),
    "demo": ("demo", "bold magenta"),
}
REMEDY_OUTPUT_LINES = 5
UNMOVABLE_WORDS = {
    "pinned_by_modelfile": "pinned by its Modelfile",
    "not_controllable": "MLX: Ollama places it",
}


def short_url(url: str | None) -> str:
    """`http://127.0.0.1:11434` -> `127.0.0.1:11434`: the scheme is noise in a narrow table."""
    if not url:
        return "-"
    return url.split("://", 1)[-1].rstrip("/")


def human_mb(megabytes: float | int | None) -> str:
    """Sizes as people read them: 705 MB, 4.7 GB."""
    if megabytes is None:
        return "-"
    if megabytes >= 1024:
        return f"{megabytes / 1024:.1f} GB"
    return f"{megabytes:.0f} MB"


def human_seconds(seconds: float) -> str:
    """12s, 4m 12s, 2h 05m: short enough for the toolbar and the expiry column."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m {seconds % 60:02d}s"
    return f"{seconds // 3600}h {seconds % 3600 // 60:02d}m"


def _timestamp(value: Any) -> float | None:
    """Accept epoch seconds, a datetime, or an RFC3339 string (Ollama sends nanoseconds; we cut them)."""
    if value is None or value == "":
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, datetime):
        return value.timestamp()
    try:
        return datetime.fromisoformat(str(value)).timestamp()
    except ValueError:
        return None


def expiry_text(model: Mapping[str, Any], now: float) -> str:
    """The UNTIL column of `ollama ps`: Forever, Stopping..., or the time left."""
    if model.get("keep_forever"):
        return "forever"
    if model.get("stopping"):  # the controller judged it by the node's own clock
        return "stopping..."
    expires = _timestamp(model.get("expires_at"))
    if expires is None:
        return "-"
    left = expires - now
    if left > FOREVER_AFTER_S:
        return "forever"
    if left <= 0:
        return "stopping..."
    return f"in {human_seconds(left)}"


def placement_text(model: Mapping[str, Any]) -> Text:
    """GPU / CPU / split with both percentages, coloured: the one thing the user is looking for."""
    location = str(model.get("location") or "")
    gpu = model.get("gpu_percent")
    if location.startswith("GPU"):
        return _with_unmovable(Text("GPU 100%", style="green"), model)
    if location.startswith("CPU"):
        return _with_unmovable(Text("CPU 100%", style="red"), model)
    if location.startswith("Split") and isinstance(gpu, int | float):
        text = Text(f"split {gpu:.0f}% GPU / {100 - gpu:.0f}% CPU", style="yellow")
    else:
        text = Text(location or model.get("processor") or "unknown", style="magenta")
    return _with_unmovable(text, model)


def _with_unmovable(text: Text, model: Mapping[str, Any]) -> Text:
    reason = model.get("unmovable")
    if reason:
        text.append(f" ({UNMOVABLE_WORDS.get(str(reason), str(reason))})", style="dim")
    return text


def node_of(entry: Mapping[str, Any]) -> str | None:
    """The node URL, whichever key the core used (`node`, `node_url`, `url`)."""
    return entry.get("node") or entry.get("node_url") or entry.get("url")


def is_offline(entry: Mapping[str, Any]) -> bool:
    return entry.get("online") is False or bool(entry.get("stale")) or bool(entry.get("error"))


def node_title(entry: Mapping[str, Any]) -> Text:
    """`127.0.0.1:11434  online 3 ms` or `... offline (stale: last known state)`."""
    title = Text(short_url(node_of(entry)), style="bold")
    if is_offline(entry):
        title.append("  offline", style="bold red")
        if entry.get("stale"):
            title.append("  STALE: last known state", style="red")
        if entry.get("error"):
            title.append(f"  ({str(entry['error']).replace('http://', '')})", style="dim red")
    else:
        title.append("  online", style="green")
        if entry.get("latency_ms") is not None:
            title.append(f"  {entry['latency_ms']:.0f} ms", style="dim")
    models = entry.get("models") or []
    if models:
        vram = sum(m.get("vram_mb") or 0 for m in models)
        ram = sum(m.get("ram_mb") or 0 for m in models)
        title.append(f"  holds {human_mb(vram)} VRAM, {human_mb(ram)} RAM", style="dim")
    return title


def vram_report(report: Iterable[Mapping[str, Any]], now: float | None = None) -> RenderableType:
    """One table per node: model, placement, VRAM, RAM, expiry; offline nodes marked stale."""
    now = time.time() if now is None else now
    parts: list[RenderableType] = []
    for entry in report:
        stale = is_offline(entry)
        table = Table(expand=False, show_edge=False)
        for column in ("model", "placement", "VRAM", "RAM", "expires"):
            justify = "right" if column in ("VRAM", "RAM") else "left"
            table.add_column(column, justify=justify, style="dim" if stale else None, no_wrap=True)
        models = entry.get("models") or []
        for model in models:
            table.add_row(
                str(model.get("name", "?")),
                placement_text(model),
                human_mb(model.get("vram_mb")),
                human_mb(model.get("ram_mb")),
                expiry_text(model, now),
            )
        if not models:
            table.add_row(Text("no model loaded" if not stale else "no models known", style="dim"))
        parts += [node_title(entry), table, Text("")]
    return Group(*parts[:-1]) if parts else Text("no nodes configured (add one with `add_node URL`)")


def state_word(online: bool | None) -> Text:
    if online is None:
        return Text("not checked", style="dim")
    return Text("online", style="green") if online else Text("offline", style="red")


def _gpu_word(node: Mapping[str, Any]) -> Text:
    """The node's GPU verdict: GPU, CPU only, LOST (an alert), or unknown."""
    gpu = node.get("gpu") or {True: "yes", False: "no"}.get(node.get("has_gpu"), "unknown")
    if gpu == "yes":
        return Text("GPU", style="green")
    if gpu == "no":
        return Text("CPU only", style="yellow")
    if gpu == "lost":
        return Text("LOST", style="bold red")
    return Text("unknown", style="dim")


def _version_text(node: Mapping[str, Any]) -> Text:
    version = node.get("ollama_version")
    if not version:
        return Text("-", style="dim")
    text = Text(str(version))
    if node.get("estimates"):
        text.append(" (estimates)", style="yellow")  # /api/ps figures of Ollama < 0.30 are predicted
    return text


def vram_model_names(models: Iterable[Any]) -> list[str]:
    """Names of models holding VRAM (GPU or split); accepts status dicts or plain names."""
    names = []
    for model in models or []:
        if isinstance(model, str):
            names.append(model)
        elif (model.get("vram_mb") or 0) > 0 or str(model.get("location", "")).startswith(("GPU", "Split")):
            names.append(str(model.get("name")))
    return names


def optimizer_line(status: Mapping[str, Any], now: float | None = None) -> Text:
    """`optimizer: on, every 5m 00s, next pass in 2m 10s, last pass 8s ago (1 moved)`."""
    now = time.time() if now is None else now
    running = bool(status.get("running"))
    text = Text("optimizer: ")
    text.append("on" if running else "off", style="bold green" if running else "bold yellow")
    if status.get("interval"):
        text.append(f", every {human_seconds(float(status['interval']))}")
    if running and status.get("next_pass_in") is not None:
        text.append(f", next pass in {human_seconds(float(status['next_pass_in']))}")
    last = status.get("last_pass")
    if isinstance(last, Mapping):
        when = _timestamp(last.get("started_at"))
        counts = [f"{last[key]} {key}" for key in ("moved", "failed", "skipped") if key in last]
        text.append(", last pass")
        if when is not None:
            text.append(f" {human_seconds(now - when)} ago")
        if counts:
            text.append(f" ({', '.join(counts)})", style="dim")
    elif last:
        text.append(f", last pass {last}")
    return text


def lb_stats(stats: Mapping[str, Any], now: float | None = None) -> RenderableType:
    """Per node: online, GPU capability, latency, requests, errors, in flight, models in VRAM."""
    table = Table(title="load balancer", title_justify="left", show_edge=False)
    table.add_column("node", no_wrap=True)
    for column in ("state", "GPU", "latency", "requests", "errors", "in flight"):
        numeric = column in ("latency", "requests", "errors", "in flight")
        table.add_column(column, justify="right" if numeric else "left", no_wrap=True)
    table.add_column("in VRAM")
    for node in stats.get("nodes", []):
        state = state_word(node.get("online"))
        if node.get("stale"):
            state.append(" (stale)", style="dim")
        latency = node.get("latency_ms")
        table.add_row(
            short_url(node_of(node)),
            state,
            _gpu_word(node),
            f"{latency:.0f} ms" if isinstance(latency, int | float) else "-",
            str(node.get("requests", 0)),
            str(node.get("errors", 0)),
            str(node.get("in_flight", 0)),
            ", ".join(vram_model_names(node.get("models_in_vram") or node.get("models") or [])) or "-",
        )
    return Group(table, optimizer_line(stats.get("optimizer") or {}, now))


def nodes_table(states: Iterable[Mapping[str, Any]], now: float | None = None) -> RenderableType:
    """The `nodes` command: who is there, up or down, GPU or not, last error."""
    now = time.time() if now is None else now
    table = Table(show_edge=False)
    table.add_column("node", no_wrap=True)
    for column in ("state", "GPU", "evidence", "Ollama", "latency", "last seen"):
        table.add_column(column, no_wrap=True)
    table.add_column("last error")
    for node in states:
        seen = _timestamp(node.get("last_seen"))
        latency = node.get("latency_ms")
        table.add_row(
            short_url(node.get("url")),
            state_word(node.get("online")),
            _gpu_word(node),
            Text(str(node.get("gpu_evidence") or ""), style="dim"),
            _version_text(node),
            f"{latency:.0f} ms" if isinstance(latency, int | float) else "-",
            f"{human_seconds(now - seen)} ago" if seen else "never",
            Text(str(node.get("last_error") or "").replace("http://", ""), style="dim red"),
        )
    return table


def move_results(model: str, target: str, results: Iterable[Mapping[str, Any]]) -> RenderableType:
    """force_gpu / force_cpu: one line per node, skipped, moved, already there, or failed with why."""
    lines = [Text(f"{model} -> {target}", style="bold")]
    for item in results:
        result = item.get("result") or {}
        line = Text(f"  {short_url(item.get('node'))}  ")
        reason = result.get("reason", "")
        if result.get("skipped"):
            line.append(f"skipped ({reason or 'not applicable'})", style="dim")
        elif reason == "no_gpu":
            line.append(f"no GPU: {result.get('message', '')}".replace("http://", ""), style="dim")
        elif result.get("success"):
            word = "already there" if reason == "already" else "done"
            line.append(f"{word}: {result.get('location') or target}", style="green")
            if result.get("vram_mb"):
                line.append(f"  {human_mb(result['vram_mb'])} VRAM", style="dim")
        else:
            line.append(f"failed ({reason or 'error'}): {result.get('message', '')}", style="red")
            if result.get("restored"):
                line.append("  (put back where it was)", style="dim")
        lines.append(line)
    if len(lines) == 1:
        lines.append(Text("  no node to act on", style="dim"))
    return Group(*lines)


ACTION_STYLE = {"moved": "green", "failed": "red", "skipped": "dim"}


def pass_actions(actions: Iterable[Mapping[str, Any]]) -> RenderableType:
    """`optimizer now`: what the pass did, one line per action (moved / failed / skipped, and why)."""
    lines = []
    for action in actions:
        kind = str(action.get("action", ""))
        node = short_url(action.get("node"))
        line = Text(f"  {kind:<8}", style=ACTION_STYLE.get(kind, ""))
        line.append(f" {node}  {action.get('model') or ''}  {action.get('message', '')}".rstrip())
        lines.append(line)
    return Group(
        Text("optimizer pass done", style="bold"), *(lines or [Text("  nothing to do", style="dim")])
    )


def optimizer_status(status: Mapping[str, Any], now: float | None = None) -> RenderableType:
    """`optimizer status`: the one-line summary plus CPU pins and back-offs in force."""
    lines: list[RenderableType] = [optimizer_line(status, now)]
    for pin in status.get("pinned_cpu") or []:
        lines.append(
            Text(f"  pinned to CPU: {pin.get('model')} on {short_url(pin.get('node'))}", style="dim")
        )
    for backoff in status.get("backed_off") or []:
        lines.append(
            Text(
                f"  backed off: {backoff.get('model')} on {short_url(backoff.get('node'))} "
                f"({backoff.get('reason')}, skips {backoff.get('passes_to_skip')} pass(es))",
                style="yellow",
            )
        )
    return Group(*lines)


def string_list(title: str, items: Iterable[str]) -> Text:
    """`priority list` and similar: a title and the items, or (none)."""
    items = list(items)
    return Text(f"{title}: " + (", ".join(items) if items else "(none)"))


def help_table(commands: Iterable[Any]) -> RenderableType:
    """Built from the command registry, so help can never drift from what dispatch accepts."""
    table = Table(show_header=False, show_edge=False, box=None, padding=(0, 2, 0, 0))
    table.add_column(style="bold cyan")
    table.add_column()
    for command in commands:
        table.add_row(Text(command.usage), Text(command.description))
    return table


def error_line(message: str) -> Text:
    """Every failure the user caused or met is one red line; the console carries on."""
    return Text(message, style="red")


def worth_showing(event: Any) -> bool:
    """Quiet passes stay quiet (the toolbar shows the countdown); anything that changed gets a line."""
    kind, data = getattr(event, "kind", ""), getattr(event, "data", None) or {}
    if kind == "pass_started":
        return False
    if kind == "pass_finished":
        return bool(data.get("moved") or data.get("failed"))
    return True


def _event_message(event: Any) -> str:
    kind, data = getattr(event, "kind", ""), getattr(event, "data", None) or {}
    model, node = getattr(event, "model", None), short_url(getattr(event, "node", None))
    if kind == "optimizer_started":
        return "GPU auto-optimization enabled (background thread)"
    if kind == "optimizer_stopped":
        return "GPU auto-optimization stopped"
    if kind == "move_started":
        return f"{model} on {node}: moving to {data.get('target', '?')}..."
    message = getattr(event, "message", "") or " ".join(p for p in (kind, model, node) if p and p != "-")
    return message.replace("http://", "")


def event_line(event: Any, duration_s: float | None = None) -> Text:
    """`03:41:07 optimizer mxbai-embed-large:latest now on GPU on 127.0.0.1:5001 (1.2 s)`: one line."""
    kind, data = getattr(event, "kind", "event"), getattr(event, "data", None) or {}
    tag, style = EVENT_STYLE.get(kind, ("event", ""))
    if tag == "move" and data.get("source") == "optimizer":
        tag = "optimizer"
    stamp = time.strftime("%H:%M:%S", time.localtime(getattr(event, "time", time.time())))
    line = Text(f"{stamp} ", style="dim")
    line.append(f"{tag:<9} ", style=f"bold {style}".strip())
    line.append(_event_message(event), style=style)
    if duration_s is not None:
        line.append(f" ({duration_s:.1f} s)", style="dim")
    if kind == "remedy_finished" and data.get("output"):
        for output_line in str(data["output"]).rstrip().splitlines()[-REMEDY_OUTPUT_LINES:]:
            line.append(f"\n    {output_line}", style="dim")
    return line
