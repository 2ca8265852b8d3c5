"""Rendering: pure functions from the core's plain return values (dicts, lists) to rich renderables.

Nothing here does I/O or reads the clock except through the `now` argument, so every table and event
line is testable without a terminal. Colours are chosen here and nowhere else.
"""

from __future__ import annotations

import math
import re
import time
import unicodedata
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime
from typing import Any

from rich.console import Console, ConsoleOptions, Group, RenderableType, RenderResult
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

FOREVER_AFTER_S = 20 * 365 * 24 * 3600  # `ollama ps` shows "Forever" beyond 20 years

EVENT_STYLE = {
    "node_up": ("node", "green"),
    "node_down": ("node", "red"),
    "node_added": ("node", "cyan"),
    "node_removed": ("node", "cyan"),
    "node_restarted": ("node", "yellow"),
    "models_restored": ("move", "green"),
    "model_unloaded": ("move", "cyan"),
    "model_evicted": ("room", "yellow"),
    "no_room": ("room", "yellow"),
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
    "gpu_metrics_failed": ("GPU stats", "yellow"),
    "gpu_metrics_back": ("GPU stats", "green"),
    "vram_held_by_others": ("VRAM", "bold yellow"),
    "vram_held_by_others_resolved": ("VRAM", "green"),
    "fd_limit": ("limit", "bold red"),
    "serve_lost": ("serve", "bold red"),  # an attached console lost its serve (flockparse/remote.py)
    "serve_back": ("serve", "green"),
    "state_not_saved": ("serve", "bold red"),
    "history_warning": ("history", "yellow"),
    "alert_failed": ("alert", "yellow"),
    "serve": ("serve", "cyan"),
}
REMEDY_OUTPUT_LINES = 5
UNMOVABLE_WORDS = {
    "pinned_by_modelfile": "pinned by its Modelfile",
    "not_controllable": "MLX: Ollama places it",
}


_BIDI = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def clean(value: Any) -> str:
    """Text from a node as plain, one-line text: escape sequences and control characters are shown
    escaped (`\\x1b[2J`), never sent to the terminal; line breaks and tabs become spaces."""
    text = str(value)
    if text.isprintable():
        return text
    out = []
    for char in text:
        if char in "\n\r\t":
            out.append(" ")
        elif char in _BIDI or unicodedata.category(char) == "Cc":
            out.append(char.encode("unicode_escape").decode("ascii"))
        else:
            out.append(char)
    return "".join(out)


def safe_text(value: Any, style: str = "") -> Text:
    """A rich Text of `clean(value)`: no markup, no escape codes, whatever the node sent."""
    return Text(clean(value), style=style)


def short_url(url: str | None) -> str:
    """`http://127.0.0.1:11434` -> `127.0.0.1:11434`: the scheme is noise in a narrow table."""
    if not url:
        return "-"
    return clean(url.split("://", 1)[-1].rstrip("/"))


class Fit:
    """The wide table when it fits the terminal, else a stacked layout: names are never cut to `127.0…`.

    The last column of a table with `flex_last` wraps, so only FLEX_MIN of its width has to fit.
    """

    FLEX_MIN = 24

    def __init__(
        self, wide: RenderableType, narrow: Callable[[], RenderableType], flex_last: bool = False
    ) -> None:
        self.wide, self.narrow, self.flex_last = wide, narrow, flex_last

    def _natural_width(self, console: Console, options: ConsoleOptions) -> int:
        column = self.wide.columns[-1] if self.flex_last and isinstance(self.wide, Table) else None
        saved = column.max_width if column is not None else None
        if column is not None:
            column.max_width = self.FLEX_MIN
        try:
            return Measurement.get(console, options.update_width(10_000), self.wide).maximum
        finally:
            if column is not None:
                column.max_width = saved

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        yield self.wide if self._natural_width(console, options) <= options.max_width else self.narrow()


def human_mb(megabytes: float | int | None) -> str:
    """Sizes as people read them: 705 MB, 4.7 GB."""
    if megabytes is None:
        return "-"
    if megabytes >= 1024:
        return f"{megabytes / 1024:.1f} GB"
    return f"{megabytes:.0f} MB"


def human_seconds(seconds: float) -> str:
    """12s, 4m 12s, 2h 05m: short enough for the toolbar and the expiry column."""
    if not math.isfinite(seconds):  # never raise inside the toolbar's redraw
        return "never"
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m {seconds % 60:02d}s"
    if seconds < 86400:
        return f"{seconds // 3600}h {seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d {seconds % 86400 // 3600}h"


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


def placement_text(model: Mapping[str, Any], has_gpu: bool | None = None) -> Text:
    """`ollama ps` wording (`100% GPU`, `100% CPU`, `48%/52% CPU/GPU`), coloured by what it means.

    CPU is red only where a GPU could hold the model: on a CPU-only node it is simply where models live.
    """
    location = str(model.get("location") or "")
    gpu = model.get("gpu_percent")
    if location.startswith("GPU"):
        return _with_unmovable(Text("100% GPU", style="green"), model)
    if location.startswith("CPU"):
        return _with_unmovable(Text("100% CPU", style="red" if has_gpu is not False else ""), model)
    if location.startswith("Split") and isinstance(gpu, int | float):
        processor = model.get("processor")
        split = f"{100 - gpu:.0f}%/{gpu:.0f}%"
        text = processor if isinstance(processor, str) and "/" in processor else split
        return _with_unmovable(Text(f"{clean(text).removesuffix(' CPU/GPU')} CPU/GPU", style="yellow"), model)
    return _with_unmovable(safe_text(location or model.get("processor") or "unknown", style="magenta"), model)


def _with_unmovable(text: Text, model: Mapping[str, Any]) -> Text:
    """A model Ollama will not let us move says why (its Modelfile pins it, or it is an MLX model)."""
    reason = model.get("unmovable")
    if reason:
        text.append(f" ({UNMOVABLE_WORDS.get(str(reason), clean(str(reason)))})", style="dim")
    return text


def context_text(model: Mapping[str, Any]) -> str:
    """The CONTEXT column of `ollama ps`."""
    value = model.get("context_length")
    return str(value) if isinstance(value, int) and not isinstance(value, bool) and value > 0 else "-"


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
            title.append(f"  ({clean(entry['error']).replace('http://', '')})", style="dim red")
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


VRAM_COLUMNS = ("model", "placement", "VRAM", "RAM", "context", "until")


def _vram_table(entry: Mapping[str, Any], now: float) -> Table:
    stale = is_offline(entry)
    table = Table(expand=False, show_edge=False)
    for column in VRAM_COLUMNS:
        justify = "right" if column in ("VRAM", "RAM", "context") else "left"
        table.add_column(column, justify=justify, style="dim" if stale else None, no_wrap=True)
    for model in entry.get("models") or []:
        table.add_row(
            safe_text(model.get("name", "?")),
            placement_text(model, entry.get("has_gpu")),
            human_mb(model.get("vram_mb")),
            human_mb(model.get("ram_mb")),
            context_text(model),
            expiry_text(model, now),
        )
    return table


def _vram_stacked(entry: Mapping[str, Any], now: float) -> RenderableType:
    """One model per three short lines: the whole name; placement, context, expiry; VRAM and RAM."""
    style = "dim" if is_offline(entry) else ""
    lines: list[RenderableType] = []
    for model in entry.get("models") or []:
        lines.append(Text.assemble("  ", safe_text(model.get("name", "?"), "bold"), overflow="fold"))
        detail = Text("    ")
        detail.append_text(placement_text(model, entry.get("has_gpu")))
        detail.append(f"  ctx {context_text(model)}  {expiry_text(model, now)}", style=style)
        lines.append(detail)
        sizes = f"    {human_mb(model.get('vram_mb'))} VRAM  {human_mb(model.get('ram_mb'))} RAM"
        lines.append(Text(sizes, style=style or "dim"))
    return Group(*lines)


def vram_report(report: Iterable[Mapping[str, Any]], now: float | None = None) -> RenderableType:
    """Per node: model, placement, VRAM, RAM, context, expiry; offline nodes marked stale.

    Narrower than the table (e.g. 60 columns), each model is stacked on two lines instead.
    """
    now = time.time() if now is None else now
    parts: list[RenderableType] = []
    for entry in report:
        if entry.get("models"):
            body: RenderableType = Fit(_vram_table(entry, now), lambda e=entry: _vram_stacked(e, now))
        else:
            body = Text("  no model loaded" if not is_offline(entry) else "  no models known", style="dim")
        parts += [node_title(entry), *vram_lines(entry), body, Text("")]
    return Group(*parts[:-1]) if parts else Text("no nodes configured (add one with `add_node URL`)")


VRAM_BAR_WIDTH = 12
VRAM_PARTS = (("█", "green", "Ollama"), ("▓", "yellow", "other programs"), ("░", "dim", "free"))


def _bar_cells(parts: list[float], total: float, width: int) -> list[int]:
    """Cells per part, summing to `width` (largest remainder), so every bar has the same length."""
    exact = [max(0.0, part) / total * width for part in parts]
    cells = [int(x) for x in exact]
    for i in sorted(range(len(parts)), key=lambda i: exact[i] - cells[i], reverse=True)[: width - sum(cells)]:
        cells[i] += 1
    return cells


def vram_bar(node: Mapping[str, Any], width: int = VRAM_BAR_WIDTH) -> Text:
    """The node's VRAM as a bar of Ollama / other programs / free (and the reserved rest with other), then
    `used/total`; `-` without exporter figures. Stale figures are dim and say so."""
    total = node.get("vram_total_mb")
    if not total:
        return Text("-" if total is None else "no GPU", style="dim")
    free = float(node.get("vram_free_mb") or 0)
    ollama = min(float(node.get("vram_ollama_mb") or 0), max(0.0, total - free))
    cells = _bar_cells([ollama, total - free - ollama, free], float(total), width)
    stale = bool(node.get("vram_stale"))
    bar = Text()
    for count, (char, style, _) in zip(cells, VRAM_PARTS, strict=True):
        bar.append(char * count, style="dim" if stale else style)
    bar.append(f" {human_mb(total - free)}/{human_mb(total)}", style="dim" if stale else "")
    if stale:
        bar.append(" stale", style="red")
    return bar


def vram_legend() -> Text:
    return Text("VRAM: " + "  ".join(f"{char} {what}" for char, _, what in VRAM_PARTS), style="dim")


def vram_lines(entry: Mapping[str, Any]) -> list[Text]:
    """Under a node's title in vram_report: its exporter's figures (and one line per GPU when several)."""
    if "vram_total_mb" not in entry:
        return []
    if entry.get("vram_total_mb") is None:
        why = clean(entry.get("vram_error") or "no figures yet").replace("http://", "")
        return [Text(f"  VRAM unknown: the GPU exporter gives no figures ({why})", style="dim red")]
    if not entry.get("vram_total_mb"):
        return [Text("  VRAM: its GPU exporter lists no GPU", style="dim")]
    line = Text("  VRAM ")
    line.append_text(vram_bar(entry))
    parts = [("Ollama", entry.get("vram_ollama_mb")), ("other", entry.get("vram_other_mb"))]
    parts.append(("free", entry.get("vram_free_mb")))
    line.append("  " + ", ".join(f"{what} {human_mb(value)}" for what, value in parts), style="dim")
    if entry.get("vram_stale"):
        why = clean(entry.get("vram_error") or "").replace("http://", "")
        line.append(f"  (last figures: {why})", style="dim red")
    lines = [line]
    gpus = entry.get("gpus") or []
    if len(gpus) > 1:
        for gpu in gpus:
            name = clean(gpu.get("name") or "")
            where = f"GPU {clean(gpu.get('index'))}" + (
                f"/{clean(gpu['instance'])}" if gpu.get("instance") else ""
            )
            used, total, free = (human_mb(gpu.get(key)) for key in ("used_mb", "total_mb", "free_mb"))
            lines.append(Text(f"    {where} {name}  {used}/{total} used, {free} free", style="dim"))
    return lines


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
    text = safe_text(str(version))
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


def _vram_names(node: Mapping[str, Any]) -> str:
    return clean(", ".join(vram_model_names(node.get("models_in_vram") or node.get("models") or [])) or "-")


def _latency(value: Any) -> str:
    return f"{value:.0f} ms" if isinstance(value, int | float) else "-"


def _stacked(title: str, rows: Iterable[Text]) -> list[Text]:
    lines = [Text(title, style="bold", overflow="fold")]
    lines += [Text.assemble("  ", row, overflow="fold") for row in rows]
    return lines


def _pair(node: Mapping[str, Any], key: str) -> str:
    """`41/95 ms`: a p50/p95 pair from get_stats (`latency_p50_ms`, `latency_p95_ms`), `-` without samples."""
    low, high = node.get(f"{key}_p50_ms"), node.get(f"{key}_p95_ms")
    if not isinstance(low, int | float) or not isinstance(high, int | float):
        return "-"
    return f"{low:.0f}/{high:.0f} ms"


def _rate(node: Mapping[str, Any]) -> str:
    value = node.get("tokens_per_s")
    return f"{value:.1f}" if isinstance(value, int | float) else "-"


def lb_stats(stats: Mapping[str, Any], now: float | None = None) -> RenderableType:
    """Per node: online, GPU capability, latency, requests, errors, in flight, p50/p95 of the requests'
    latency and time to first token, tokens per second, models in VRAM; the routing and optimizer lines."""
    title = "load balancer" + (f" (routing {clean(stats['routing'])})" if stats.get("routing") else "")
    table = Table(title=title, title_justify="left", show_edge=False)
    table.add_column("node", no_wrap=True)
    for column in ("state", "GPU", "latency", "requests", "errors", "in flight", "p50/p95", "TTFT", "tok/s"):
        numeric = column not in ("state", "GPU")
        table.add_column(column, justify="right" if numeric else "left", no_wrap=True)
    nodes = list(stats.get("nodes", []))
    with_figures = any("vram_total_mb" in node for node in nodes)  # some node has a GPU exporter
    if with_figures:
        table.add_column("VRAM", no_wrap=True)
    table.add_column("in VRAM")
    for node in nodes:
        state = state_word(node.get("online"))
        if node.get("stale"):
            state.append(" (stale)", style="dim")
        table.add_row(
            short_url(node_of(node)),
            state,
            _gpu_word(node),
            _latency(node.get("latency_ms")),
            str(node.get("requests", 0)),
            str(node.get("errors", 0)),
            str(node.get("in_flight", 0)),
            _pair(node, "latency"),
            _pair(node, "ttft"),
            _rate(node),
            *([vram_bar(node)] if with_figures else []),
            _vram_names(node),
        )

    def stacked() -> RenderableType:
        lines: list[Text] = [Text(title)]
        for node in nodes:
            lines += _stacked(
                short_url(node_of(node)),
                [
                    Text.assemble(
                        state_word(node.get("online")),
                        "  ",
                        _gpu_word(node),
                        f"  latency {_latency(node.get('latency_ms'))}",
                    ),  # fmt: skip
                    Text(
                        f"requests {node.get('requests', 0)}  errors {node.get('errors', 0)}  "
                        f"in flight {node.get('in_flight', 0)}"
                    ),
                    Text(
                        f"p50/p95 {_pair(node, 'latency')}  TTFT {_pair(node, 'ttft')}  tok/s {_rate(node)}"
                    ),
                    *([Text.assemble("VRAM ", vram_bar(node))] if with_figures else []),
                    Text(f"in VRAM: {_vram_names(node)}"),
                ],
            )
        return Group(*lines)

    legend = [vram_legend()] if with_figures else []
    return Group(
        Fit(table, stacked, flex_last=True), *legend, optimizer_line(stats.get("optimizer") or {}, now)
    )


def route_lines(explained: Mapping[str, Any]) -> RenderableType:
    """`route MODEL`: the nodes in the order the next request would try them, each with why; then the
    nodes skipped and why."""
    nodes = list(explained.get("nodes") or [])
    usable = [n for n in nodes if not n.get("skipped")]
    model = clean(explained.get("model") or "any model")
    head = Text(f"{model}, routing {clean(explained.get('routing', '?'))}: ", style="bold")
    if usable:
        head.append(f"the next request goes to {short_url(node_of(usable[0]))}")
    else:
        head.append("no node can serve it now", style="red")
    lines: list[RenderableType] = [head]
    for index, node in enumerate(nodes, start=1):
        line = Text("  ", overflow="fold")
        if node.get("skipped"):
            where, why = short_url(node_of(node)), clean(node.get("reason", ""))
            line.append(f"-  {where}  skipped: {why}", style="dim")
        else:
            line.append(f"{index}. {short_url(node_of(node))}  ", style="green" if index == 1 else "")
            line.append(clean(node.get("reason", "")))
            latency = _latency(node.get("latency_ms"))
            line.append(f"  ({node.get('in_flight', 0)} in flight, {latency})", style="dim")
        lines.append(line)
    return Group(*lines)


def nodes_table(states: Iterable[Mapping[str, Any]], now: float | None = None) -> RenderableType:
    """The `nodes` command: who is there, up or down, GPU or not, last error (the node's full text)."""
    now = time.time() if now is None else now
    states = list(states)
    table = Table(show_edge=False)
    table.add_column("node", no_wrap=True)
    for column in ("state", "GPU", "evidence", "Ollama", "latency", "last seen"):
        table.add_column(column, no_wrap=True)
    table.add_column("last error", min_width=20)

    def seen(node: Mapping[str, Any]) -> str:
        when = _timestamp(node.get("last_seen"))
        return f"{human_seconds(now - when)} ago" if when else "never"

    def error(node: Mapping[str, Any]) -> str:
        return clean(node.get("last_error") or "").replace("http://", "")

    for node in states:
        table.add_row(
            short_url(node.get("url")),
            state_word(node.get("online")),
            _gpu_word(node),
            safe_text(node.get("gpu_evidence") or "", style="dim"),
            _version_text(node),
            _latency(node.get("latency_ms")),
            seen(node),
            Text(error(node), style="dim red"),
        )

    def stacked() -> RenderableType:
        lines: list[Text] = []
        for node in states:
            rows = [
                Text.assemble(
                    state_word(node.get("online")),
                    "  ",
                    _gpu_word(node),
                    f"  {_latency(node.get('latency_ms'))}  seen {seen(node)}",
                ),  # fmt: skip
            ]
            if node.get("gpu_evidence"):
                rows.append(safe_text(f"evidence: {clean(node['gpu_evidence'])}", style="dim"))
            if node.get("ollama_version"):
                rows.append(Text.assemble("Ollama ", _version_text(node)))
            if node.get("last_error"):
                rows.append(Text(f"last error: {error(node)}", style="dim red"))
            lines += _stacked(short_url(node.get("url")), rows)
        return Group(*lines)

    return Fit(table, stacked, flex_last=True)


def _without_parens(text: str) -> str:
    """Drop parenthesised asides (where nodes' raw error texts go): `x (raw...) ; y` -> `x ; y`."""
    out, depth = [], 0
    for char in text:
        if char == "(":
            depth += 1
        elif char == ")" and depth:
            depth -= 1
        elif depth == 0:
            out.append(char)
    return re.sub(r"\s+([;,:])", r"\1", re.sub(r"\s{2,}", " ", "".join(out))).strip()


def short_message(message: str, node: str | None, limit: int = 140) -> str:
    """A failure as one short phrase: the node's name (already at the line's start) and raw texts left out."""
    text = clean(message)
    if node:
        text = text.replace(f" on {node}", "").replace(f"{node} ", "").replace(node, "")
    text = _without_parens(text)
    return text if len(text) <= limit else text[: limit - 1].rsplit(" ", 1)[0] + "…"


def move_results(
    model: str, target: str, results: Iterable[Mapping[str, Any]], verbose: bool = False
) -> RenderableType:
    """force_gpu / force_cpu: one line per node, skipped, moved, already there, or failed with why.

    A node's raw error text (e.g. llama-server's out-of-memory dump) only with `verbose`.
    """
    lines = [Text(f"{clean(model)} -> {target}", style="bold")]
    for item in results:
        result = item.get("result") or {}
        node = item.get("node")
        line = Text(f"  {short_url(node)}  ", overflow="fold")
        reason = clean(result.get("reason", ""))
        message = str(result.get("message", ""))
        if result.get("skipped"):
            line.append(f"skipped ({reason or 'not applicable'})", style="dim")
        elif reason == "no_gpu":
            line.append(f"no GPU: {short_message(message, node)}", style="dim")
        elif result.get("dry_run"):
            line.append(f"{reason.replace('_', ' ')}: {short_message(message, node)}", style="cyan")
        elif result.get("success"):
            word = "already there" if reason == "already" else "done"
            where = "unloaded" if reason == "unloaded" else clean(result.get("location") or target)
            line.append(f"{word}: {where}", style="green")
            if result.get("vram_mb"):
                line.append(f"  {human_mb(result['vram_mb'])} VRAM", style="dim")
            if result.get("evicted"):
                gone = ", ".join(clean(name) for name in result["evicted"])
                line.append(f"  Ollama unloaded {gone} to make room", style="yellow")
        else:
            shown = clean(message).replace("http://", "") if verbose else short_message(message, node)
            line.append(f"failed ({reason or 'error'}): {shown}", style="red")
            if result.get("restored"):
                line.append("  (put back where it was)", style="dim")
        lines.append(line)
    if len(lines) == 1:
        lines.append(Text("  no node to act on", style="dim"))
    return Group(*lines)


ACTION_STYLE = {
    "moved": "green",
    "evicted": "yellow",
    "undone": "yellow",
    "failed": "red",
    "skipped": "dim",
    "would_move": "cyan",
    "would_probe": "cyan",
    "would_evict": "cyan",
}


def cleanup_results(results: Iterable[Mapping[str, Any]], verbose: bool = False) -> RenderableType:
    """`cleanup`: one line per model taken out of VRAM (or left: serving requests, node offline)."""
    lines = [Text("cleanup: models that are not a priority, out of VRAM", style="bold")]
    for item in results:
        result = item.get("result") or {}
        node, reason = item.get("node"), clean(result.get("reason", ""))
        message = str(result.get("message", ""))
        shown = clean(message).replace("http://", "") if verbose else short_message(message, node)
        line = Text(f"  {short_url(node)}  {clean(item.get('model') or '')}  ".replace("    ", "  "))
        if result.get("dry_run"):
            line.append(shown, style="cyan")
        elif result.get("success"):
            line.append("unloaded", style="green")
        elif reason == "offline":
            line.append("skipped: offline", style="dim")
        elif reason == "busy":
            line.append(f"left (busy): {shown}", style="dim")
        else:
            line.append(f"failed ({reason or 'error'}): {shown}", style="red")
        lines.append(line)
    if len(lines) == 1:
        lines.append(Text("  nothing to unload: every model in VRAM is a priority model", style="dim"))
    return Group(*lines)


def pass_actions(
    actions: Iterable[Mapping[str, Any]], verbose: bool = False, title: str = "optimizer pass done"
) -> RenderableType:
    """`optimizer now`: what the pass did, one line per action (moved / failed / skipped, and why)."""
    lines = []
    for action in actions:
        kind = clean(action.get("action", ""))
        node = action.get("node")
        message = str(action.get("message", ""))
        shown = clean(message).replace("http://", "") if verbose else short_message(message, node)
        line = Text(f"  {kind:<11}", style=ACTION_STYLE.get(kind, ""), overflow="fold")
        line.append(f" {short_url(node)}  {clean(action.get('model') or '')}  {shown}".rstrip())
        lines.append(line)
    return Group(Text(title, style="bold"), *(lines or [Text("  nothing to do", style="dim")]))


def optimizer_status(status: Mapping[str, Any], now: float | None = None) -> RenderableType:
    """`optimizer status`: the one-line summary plus CPU pins and back-offs in force."""
    lines: list[RenderableType] = [optimizer_line(status, now)]
    for pin in status.get("pinned_cpu") or []:
        lines.append(
            safe_text(f"  pinned to CPU: {pin.get('model')} on {short_url(pin.get('node'))}", style="dim")
        )
    for backoff in status.get("backed_off") or []:
        lines.append(
            safe_text(
                f"  backed off: {backoff.get('model')} on {short_url(backoff.get('node'))} "
                f"({backoff.get('reason')}, skips {backoff.get('passes_to_skip')} pass(es))",
                style="yellow",
            )
        )
    return Group(*lines)


def string_list(title: str, items: Iterable[str]) -> Text:
    """`priority list` and similar: a title and the items, or (none)."""
    items = [clean(item) for item in items]
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
    return safe_text(message, style="red")


def worth_showing(event: Any) -> bool:
    """Quiet passes stay quiet (the toolbar shows the countdown); anything that changed gets a line."""
    kind, data = getattr(event, "kind", ""), getattr(event, "data", None) or {}
    if kind in ("pass_started", "placements_changed", "vram_measured"):  # for history and live views
        return False
    if kind == "pass_finished":
        return bool(data.get("moved") or data.get("failed") or data.get("undone"))
    return True


def _event_message(event: Any, nodes_total: int | None = None, verbose: bool = False) -> str:
    kind, data = getattr(event, "kind", ""), getattr(event, "data", None) or {}
    model, node = getattr(event, "model", None), short_url(getattr(event, "node", None))
    if kind == "optimizer_started":
        return "GPU auto-optimization enabled (background thread)"
    if kind == "optimizer_stopped":
        return "GPU auto-optimization stopped"
    if kind == "move_started":
        return f"{clean(model)} on {node}: moving to {clean(data.get('target', '?'))}..."
    if kind == "pass_finished" and "moved" in data:
        over = f" over {nodes_total} node(s)" if nodes_total else ""
        duration = data.get("duration_s")
        took = f" in {duration:.2f} s" if isinstance(duration, int | float) else ""
        evicted = f", {data['evicted']} evicted to make room" if data.get("evicted") else ""
        evicted += f", {data['undone']} undone: no room" if data.get("undone") else ""
        return (
            f"GPU pass finished{took}{over}: {data.get('moved', 0)} moved, {data.get('failed', 0)} failed, "
            f"{data.get('skipped', 0)} skipped{evicted}"
        )
    if kind == "move_failed" and not verbose:  # the node's raw error text only with --verbose
        return f"{clean(model)} on {node}: {short_message(getattr(event, 'message', ''), event.node)}"
    message = getattr(event, "message", "") or " ".join(p for p in (kind, model, node) if p and p != "-")
    return clean(message).replace("http://", "")


def event_line(
    event: Any,
    duration_s: float | None = None,
    nodes_total: int | None = None,
    verbose: bool = False,
    stamp_format: str = "%H:%M:%S",
) -> Text:
    """`03:41:07 optimizer mxbai-embed-large:latest now on GPU on 127.0.0.1:5001 (1.2 s)`: one line.

    Print it word-wrapped (not soft-wrapped): a narrow terminal then breaks it between words, never
    inside an address. `serve` logs its `.plain` text with the date in `stamp_format`.
    """
    kind, data = getattr(event, "kind", "event"), getattr(event, "data", None) or {}
    tag, style = EVENT_STYLE.get(kind, ("event", ""))
    if tag == "move" and data.get("source") == "optimizer":
        tag = "optimizer"
    stamp = time.strftime(stamp_format, time.localtime(getattr(event, "time", time.time())))
    line = Text(f"{stamp} ", style="dim")
    line.append(f"{tag:<9} ", style=f"bold {style}".strip())
    line.append(_event_message(event, nodes_total, verbose), style=style)
    if duration_s is not None:
        line.append(f" ({duration_s:.1f} s)", style="dim")
    if kind == "remedy_finished" and data.get("output"):
        for output_line in str(data["output"]).rstrip().splitlines()[-REMEDY_OUTPUT_LINES:]:
            line.append(f"\n    {clean(output_line)}", style="dim")  # the remedy may relay a node's text
    return line


# ------------------------------------------------------------------------------------------ history
SPARK = {  # placement -> (mark, style): the taller the mark, the more of the model is in VRAM
    "gpu": ("█", "green"),
    "split": ("▄", "yellow"),
    "cpu": ("▁", "red"),
    "not_loaded": ("·", "dim"),
    "offline": ("×", "bold red"),
    "unknown": (" ", ""),
}
NODE_SPARK = {
    "up": ("█", "green"),
    "gpu_lost": ("▄", "bold red"),
    "down": ("×", "bold red"),
    "unknown": (" ", ""),
}
SHARE_COLUMNS = (("gpu", "GPU"), ("split", "split"), ("cpu", "CPU"), ("not_loaded", "not loaded"),
                 ("offline", "offline"))  # fmt: skip


def duration_text(seconds: float) -> str:
    """A window as typed: 24h, 7d, 30m, 2m 30s (human_seconds says 1d 0h)."""
    whole = int(round(seconds))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if whole >= size and whole % size == 0 and (unit != "d" or whole >= 2 * 86400):
            return f"{whole // size}{unit}"
    return human_seconds(seconds)


def sparkline(timeline: Iterable[str], marks: Mapping[str, tuple[str, str]] = SPARK) -> Text:
    """One coloured mark per bucket, oldest first (`█` GPU, `▄` split, `▁` CPU, `·` not loaded)."""
    line = Text()
    for category in timeline:
        mark, style = marks.get(category, ("?", ""))
        line.append(mark, style=style)
    return line


def _share(value: float) -> str:
    return "-" if value <= 0 else "<1%" if value < 0.005 else f"{value * 100:.0f}%"


def _moves_text(pair: Mapping[str, Any]) -> Text:
    text = Text(str(pair.get("moves", 0)))
    if pair.get("failed_moves"):
        text.append(f" +{pair['failed_moves']} failed", style="red")
    return text


def history_report(data: Mapping[str, Any]) -> RenderableType:
    """`history`: per model and node, shares of the window by placement, fallbacks, moves, a sparkline;
    then per node, up / GPU lost / down, with theirs."""
    since, until = float(data["since"]), float(data["until"])
    window = until - since
    models, nodes = list(data.get("models") or []), list(data.get("nodes") or [])
    buckets = int(data.get("buckets") or 0) or max((len(n.get("timeline") or []) for n in nodes), default=0)
    start = datetime.fromtimestamp(since).strftime("%Y-%m-%d %H:%M")
    title = Text(f"placement history, last {duration_text(window)} (since {start})", style="bold")
    if buckets:
        title.append(f", one mark per {duration_text(window / buckets)}", style="dim")
    recorded = float(data.get("recorded_s") or 0.0)
    if window > 0 and recorded < window * 0.995:
        title.append(f"; recorded for {duration_text(recorded)} of it", style="yellow")
    legend = Text("  ")
    for category, word in (("gpu", "GPU"), ("split", "split"), ("cpu", "CPU"), ("not_loaded", "not loaded"),
                           ("offline", "node down"), ("unknown", "not recorded")):  # fmt: skip
        mark, style = SPARK[category]
        legend.append(mark if mark != " " else "␣", style=style)
        legend.append(f" {word}  ", style="dim")
    if not models and not nodes:
        return Group(title, Text("  nothing recorded in this window", style="dim"))
    parts: list[RenderableType] = [title, legend]
    if models:
        parts.append(_history_models(models))
    if nodes:
        parts.append(_history_nodes(nodes))
    return Group(*parts)


def _history_models(models: list[Mapping[str, Any]]) -> RenderableType:
    table = Table(show_edge=False)
    table.add_column("node", no_wrap=True)
    table.add_column("model", no_wrap=True)
    for _, header in SHARE_COLUMNS:
        table.add_column(header, justify="right", no_wrap=True)
    table.add_column("falls", justify="right", no_wrap=True)
    table.add_column("moves", justify="right", no_wrap=True)
    table.add_column("over time", no_wrap=True)
    for pair in models:
        shares = pair.get("shares") or {}
        fell = int(pair.get("fallbacks") or 0)
        table.add_row(
            short_url(pair.get("node")), safe_text(pair.get("model")),
            *(_share(float(shares.get(key, 0.0))) for key, _ in SHARE_COLUMNS),
            Text(str(fell), style="red" if fell else ""), _moves_text(pair),
            sparkline(pair.get("timeline") or []),
        )  # fmt: skip

    def stacked() -> RenderableType:
        lines: list[Text] = []
        for pair in models:
            shares = pair.get("shares") or {}
            figures = ", ".join(
                f"{header} {_share(float(shares.get(key, 0.0)))}" for key, header in SHARE_COLUMNS
                if shares.get(key)
            )  # fmt: skip
            rows = [
                Text(figures or "nothing known", style=""),
                Text.assemble(f"falls {pair.get('fallbacks', 0)}, moves ", _moves_text(pair)),
                sparkline(pair.get("timeline") or []),
            ]
            lines += _stacked(f"{clean(pair.get('model'))} on {short_url(pair.get('node'))}", rows)
        return Group(*lines)

    return Fit(table, stacked)


def _history_nodes(nodes: list[Mapping[str, Any]]) -> RenderableType:
    table = Table(show_edge=False)
    table.add_column("node", no_wrap=True)
    for header in ("up", "GPU lost", "down", "downs", "restarts", "GPU losses"):
        table.add_column(header, justify="right", no_wrap=True)
    table.add_column("over time", no_wrap=True)
    for node in nodes:
        shares = node.get("shares") or {}
        table.add_row(
            short_url(node.get("node")),
            *(_share(float(shares.get(key, 0.0))) for key in ("up", "gpu_lost", "down")),
            str(node.get("downs", 0)), str(node.get("restarts", 0)), str(node.get("gpu_losses", 0)),
            sparkline(node.get("timeline") or [], NODE_SPARK),
        )  # fmt: skip

    def stacked() -> RenderableType:
        lines: list[Text] = []
        for node in nodes:
            shares = node.get("shares") or {}
            up, lost, down = (_share(float(shares.get(key, 0.0))) for key in ("up", "gpu_lost", "down"))
            rows = [
                Text(
                    f"up {up}, GPU lost {lost}, down {down}; {node.get('downs', 0)} down(s), "
                    f"{node.get('restarts', 0)} restart(s), {node.get('gpu_losses', 0)} GPU loss(es)"
                ),
                sparkline(node.get("timeline") or [], NODE_SPARK),
            ]
            lines += _stacked(short_url(node.get("node")), rows)
        return Group(*lines)

    return Fit(table, stacked)


# ------------------------------------------------------------------------------------------ alerts
def alert_test(results: Iterable[Mapping[str, Any]]) -> RenderableType:
    """`alerts test`: one line per channel, ok or the error."""
    lines = []
    for result in results:
        line = Text(f"{clean(result.get('channel'))}: ", overflow="fold")
        if result.get("ok"):
            line.append("ok", style="green")
        else:
            line.append(f"error: {clean(result.get('error') or 'failed')}", style="red")
        lines.append(line)
    return Group(*lines)


def alert_status(status: Mapping[str, Any], now: float | None = None) -> RenderableType:
    """`alerts status`: the channels (sent, failed), the cool-down, what is firing now."""
    now = time.time() if now is None else now
    lines: list[RenderableType] = [
        Text(f"alerts: cool-down {human_seconds(float(status.get('cooldown_s') or 0))}"
             + ("" if status.get("running", True) else " (not sending in this mode: only the console sends)"))
    ]  # fmt: skip
    for channel in status.get("channels") or []:
        line = Text(f"  {clean(channel.get('channel'))}", overflow="fold")
        if "sent" in channel:
            line.append(f"  sent {channel['sent']}, failed {channel['failed']}", style="dim")
        if channel.get("last_error"):
            line.append(f"  last error: {clean(channel['last_error'])}", style="red")
        lines.append(line)
    for active in status.get("active") or []:
        since = _timestamp(active.get("since"))
        ago = f" ({human_seconds(now - since)} ago)" if since else ""
        lines.append(safe_text(f"  firing: {active.get('message')}{ago}", style="yellow"))
    if status.get("suppressed"):
        lines.append(Text(f"  {status['suppressed']} change(s) held back by the cool-down", style="dim"))
    return Group(*lines)
