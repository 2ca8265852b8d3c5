"""Issue 9, console faults: commands that need no node, names, output, scripting, completion, small items,
escape injection, unwritable files. Real sockets to simulated nodes on 127.0.0.1."""

from __future__ import annotations

import _thread
import dataclasses
import importlib.metadata
import io
import json
import os
import re
import stat
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from helpers import wait_until
from prompt_toolkit.application import create_app_session
from prompt_toolkit.document import Document
from prompt_toolkit.input import create_pipe_input
from prompt_toolkit.output import DummyOutput
from rich.console import Console

import ollama_sim
from flockparse.console import __version__, render
from flockparse.console.commands import Cancelled, Context
from flockparse.console.completion import ConsoleCompleter
from flockparse.console.config import Config
from flockparse.events import Event
from flockparsecli import EventPrinter, first_health_round, interactive, main, make_balancer, run_line
from ollama_sim import SimCluster, SimNode

REPO = Path(__file__).resolve().parent.parent
EVIL = "\x1b[2Jevil:latest"
ESC = re.compile(r"\x1b")


def text_console(buffer: io.StringIO, width: int = 160) -> Console:
    return Console(file=buffer, width=width, color_system=None, force_terminal=False, highlight=False)


def run_main(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("FLOCKPARSE_CONFIG_DIR", str(tmp_path))
    monkeypatch.delenv("OLLAMA_HOST", raising=False)
    monkeypatch.delenv("NO_COLOR", raising=False)
    return tmp_path


@pytest.fixture
def evil_model(monkeypatch: pytest.MonkeyPatch) -> str:
    """A model whose name carries a clear-screen escape, installed in the simulator's catalogue."""
    spec = dataclasses.replace(ollama_sim.CATALOG["llama3.1:latest"], name=EVIL)
    monkeypatch.setitem(ollama_sim.CATALOG, EVIL, spec)
    return EVIL


@pytest.fixture
def session(
    sim_cluster: Callable[..., SimCluster], home: Path
) -> Iterator[tuple[SimCluster, Context, io.StringIO]]:
    cluster = sim_cluster(
        [
            {"vram_gb": 0, "preload": [("llama3.1", "auto")]},
            {"vram_gb": 24, "preload": [("mxbai-embed-large", "cpu")]},
        ]
    )
    config = Config(nodes=cluster.urls, gpu={cluster.urls[0]: False}, path=home / "config.toml", timeout=1.0)
    balancer = make_balancer(config, optimize=False)
    balancer.start()
    assert all(state.online for state in first_health_round(balancer, 10.0))
    buffer = io.StringIO()
    yield cluster, Context(balancer=balancer, console=text_console(buffer), config=config), buffer
    balancer.close()


def shown_by(ctx: Context, buffer: io.StringIO, line: str) -> tuple[bool, str]:
    buffer.seek(0)
    buffer.truncate()
    return run_line(ctx, line).ok, buffer.getvalue()


# ------------------------------------------------------------------ fault 3: no node, no wait


@pytest.mark.parametrize(
    "words", [["help"], ["priority", "list"], ["optimizer", "status"], ["optimizer", "interval", "60"]]
)
def test_commands_that_need_no_node_never_contact_one(
    sim_node: Callable[..., SimNode], home: Path, capsys: pytest.CaptureFixture[str], words: list[str]
) -> None:
    hung = sim_node(vram_gb=24)
    hung.set_fault("hang")
    code, out, _ = run_main(["--nodes", hung.url, "--timeout", "5", *words], capsys)
    assert code == 0 and out
    assert hung.request_log == []  # answered without waiting for the hung node


def test_vram_report_in_the_console_says_what_it_waits_for(session, capsys) -> None:
    cluster, ctx, buffer = session
    progress = io.StringIO()
    ctx.progress = text_console(progress)
    cluster.nodes[1].set_fault("hang")
    ok, shown = shown_by(ctx, buffer, "vram_report")
    cluster.nodes[1].clear_fault()
    assert not ok and "STALE" in shown
    assert "asking 2 node(s), up to 1s... (Ctrl-C cancels)" in progress.getvalue()


# ------------------------------------------------------------------ fault 5: names


def test_one_name_rule_and_did_you_mean(session) -> None:
    cluster, ctx, buffer = session
    ok, shown = shown_by(ctx, buffer, "priority add mxbai-embed-large:latest")
    assert not ok and "already a priority model" in shown  # same model as `mxbai-embed-large`
    ok, shown = shown_by(ctx, buffer, "force_gpu lama3.1")
    assert not ok and "did you mean `llama3.1:latest`?" in shown and shown.count("\n") == 1
    ok, shown = shown_by(ctx, buffer, "priority add nosuch")  # accepted as --priority is, with a note
    assert ok and "nosuch is on no node yet" in shown and "nosuch" in ctx.balancer.gpu_priority_models
    ok, shown = shown_by(ctx, buffer, "force_gpu 'bad name'")
    assert not ok and "is not a model name" in shown


def test_priority_flag_uses_the_same_rule(home: Path, capsys) -> None:
    code, out, _ = run_main(
        ["--priority", "llama3.1,LLaMA3.1:latest,nomic-*", "--json", "priority", "list"], capsys
    )
    assert code == 0 and json.loads(out) == ["llama3.1", "nomic-*"]
    code, _, err = run_main(["--priority", "bad name", "priority", "list"], capsys)
    assert code == 2 and "--priority" in err and "is not a model name" in err


def test_unknown_model_exits_2_with_json_error(session, capsys) -> None:
    cluster, _, _ = session
    code, out, err = run_main(["--nodes", ",".join(cluster.urls), "--json", "force_gpu", "lama3.1"], capsys)
    assert code == 2 and "did you mean `llama3.1:latest`?" in err
    assert json.loads(out)["exit_code"] == 2 and "lama3.1" in json.loads(out)["error"]


# ------------------------------------------------------------------ fault 7: output


def test_force_prints_one_line_per_node_and_the_raw_error_only_when_verbose(
    sim_cluster: Callable[..., SimCluster], home: Path
) -> None:
    cluster = sim_cluster([{"vram_gb": 6, "ram_gb": 64}, {"vram_gb": 24}])
    config = Config(nodes=cluster.urls, path=None, timeout=2.0)
    balancer = make_balancer(config, optimize=False)
    buffer = io.StringIO()
    console = text_console(buffer)
    printer = EventPrinter(console)
    balancer.subscribe(printer)
    balancer.start()
    first_health_round(balancer, 10.0)
    ctx = Context(
        balancer=balancer, console=console, config=config, quiet_events=printer.quiet,
        flush_events=lambda: printer.drain(1.0),
    )  # fmt: skip
    try:
        assert not run_line(ctx, "force_gpu llama3.1:70b").ok
        shown = buffer.getvalue()
        small, big = (url.split("://")[1] for url in cluster.urls)
        for node in (small, big):  # one line per node for the move (node up/down lines aside)
            assert len([line for line in shown.splitlines() if node in line and "70b" in line]) <= 1
            assert len([line for line in shown.splitlines() if line.startswith(f"  {node}  ")]) == 1
        assert f"{small}  failed (out_of_memory): llama3.1:70b does not fit in VRAM" in shown
        assert "cudaMalloc" not in shown  # the raw llama-server text only with --verbose
        buffer.seek(0)
        buffer.truncate()
        ctx.verbose = True
        run_line(ctx, "force_gpu llama3.1:70b --force")  # --force: an out-of-memory load is not refused again
        assert buffer.getvalue().count("cudaMalloc failed: out of memory") == 2  # once per node, no more
    finally:
        printer.close()
        balancer.close()


def test_tables_at_60_columns_keep_names_whole_and_every_field() -> None:
    now = 1_800_000_000.0
    long_model = "hf.co/bartowski/Llama-3.2-3B-Instruct-GGUF:Q4_K_M"
    report = [
        {
            "node": "http://127.0.0.1:45123",
            "latency_ms": 3,
            "has_gpu": True,
            "models": [
                {"name": long_model, "location": "Split (52% GPU)", "gpu_percent": 52,
                 "processor": "48%/52% CPU/GPU", "vram_mb": 2600, "ram_mb": 2400, "context_length": 8192,
                 "expires_at": now + 60},
            ],
        }
    ]  # fmt: skip
    states = [{"url": "http://127.0.0.1:45123", "online": True, "has_gpu": True, "latency_ms": 3,
               "gpu_evidence": "model seen in VRAM", "last_seen": now - 2, "last_error": "boom"}]  # fmt: skip
    stats = {"nodes": [{**states[0], "node": states[0]["url"], "requests": 7, "errors": 1, "in_flight": 2,
                        "models_in_vram": [long_model]}], "optimizer": {}}  # fmt: skip
    for renderable, needles in (
        (
            render.vram_report(report, now=now),
            [long_model, "127.0.0.1:45123", "48%/52% CPU/GPU", "8192", "in 1m"],
        ),
        (
            render.nodes_table(states, now=now),
            ["127.0.0.1:45123", "model seen in VRAM", "3 ms", "2s ago", "boom"],
        ),
        (
            render.lb_stats(stats, now=now),
            ["127.0.0.1:45123", "requests 7", "errors 1", "in flight 2", long_model],
        ),
    ):
        out = io.StringIO()
        Console(file=out, width=60, color_system=None).print(renderable)
        lines = out.getvalue().splitlines()
        assert all(len(line) <= 60 for line in lines)
        for needle in needles:
            assert any(needle in line for line in lines), (needle, out.getvalue())
        assert "…" not in out.getvalue()


def test_event_lines_break_between_words_not_inside_an_address() -> None:
    event = Event(
        "node_down", node="http://127.0.0.1:45123", message="http://127.0.0.1:45123 is down (refused)"
    )
    out = io.StringIO()
    console = Console(file=out, width=30, color_system=None)
    printer = EventPrinter(console)
    printer(event)
    printer.drain(5.0)
    printer.close()
    assert any("127.0.0.1:45123" in line for line in out.getvalue().splitlines())


# ------------------------------------------------------------------ fault 8: scripting


def test_json_errors_are_json_on_stdout(home: Path, capsys) -> None:
    code, out, err = run_main(["--json", "frobnicate"], capsys)
    assert code == 2 and json.loads(out) == {"error": err.strip(), "exit_code": 2}
    code, out, _ = run_main(["--json", "--interval", "nan", "help"], capsys)
    assert code == 2 and json.loads(out)["exit_code"] == 2


def test_json_without_a_command_is_a_usage_error(home: Path, capsys, monkeypatch) -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr(sys, "stdin", Terminal())
    code, out, err = run_main(["--json"], capsys)
    assert code == 2 and "--json needs a COMMAND" in err and json.loads(out)["exit_code"] == 2


def test_stdin_lines_run_as_commands(sim_node: Callable[..., SimNode], home: Path) -> None:
    node = sim_node(vram_gb=24, preload=[("mxbai-embed-large", "cpu")])
    env = {**os.environ, "FLOCKPARSE_CONFIG_DIR": str(home), "TERM": "xterm"}
    script = "# a comment\nnodes\n\nbogus\nvram_report\npriority list\n"
    proc = subprocess.run(
        [sys.executable, "flockparsecli.py", "--nodes", node.url],
        cwd=REPO, env=env, input=script, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2  # the worst line: an unknown command
    assert "unknown command `bogus`" in proc.stderr
    assert (
        "online" in proc.stdout
        and "mxbai-embed-large:latest" in proc.stdout
        and "priority models" in proc.stdout
    )
    assert not ESC.search(proc.stdout) and not ESC.search(proc.stderr)  # no full screen, no escape codes
    assert "GPU auto-optimization" not in proc.stdout + proc.stderr  # no background optimizer
    proc = subprocess.run(
        [sys.executable, "flockparsecli.py", "--nodes", node.url, "--json"],
        cwd=REPO, env=env, input="priority list\nhelp nodes\n", capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0
    assert [json.loads(line) for line in proc.stdout.splitlines()][1]["usage"] == "nodes"


def test_nodes_json_has_no_internal_clock_values(session, capsys) -> None:
    cluster, _, _ = session
    code, out, _ = run_main(["--nodes", ",".join(cluster.urls), "nodes", "--json"], capsys)
    assert code == 0 and all("installed_checked_at" not in node for node in json.loads(out))


def test_cancel_exits_130() -> None:
    assert Cancelled("cancelled").exit_code == 130


# ------------------------------------------------------------------ fault 9: completion


def test_priority_remove_and_help_complete() -> None:
    completer = ConsoleCompleter(
        {"MODEL": lambda: ["zzz:latest"], "PRIORITY": lambda: ["llama3.1", "mxbai-embed-large"]}
    )

    def offered(text: str) -> list[str]:
        return [c.text for c in completer.get_completions(Document(text), None)]

    assert offered("priority remove ") == ["llama3.1", "mxbai-embed-large"]
    assert offered("priority remove mx") == ["mxbai-embed-large"]
    assert offered("priority add ") == ["zzz:latest"]
    assert offered("help force") == ["force_gpu", "force_cpu"]


# ------------------------------------------------------------------ fault 10: small items


def test_demo_with_nodes_is_refused(home: Path, capsys) -> None:
    code, _, err = run_main(["--demo", "--nodes", "127.0.0.1:1", "nodes"], capsys)
    assert code == 2 and "--demo starts its own nodes" in err


def test_cpu_is_not_red_on_a_node_without_gpu_and_durations_show_days() -> None:
    model = {"location": "CPU (RAM)", "gpu_percent": 0}
    assert render.placement_text(model, has_gpu=False).style == ""
    assert render.placement_text(model, has_gpu=True).style == "red"
    assert render.human_seconds(10_000_000) == "115d 17h"
    assert render.expiry_text({"expires_at": 1000.0 + 10_000_000}, now=1000.0) == "in 115d 17h"


def test_the_pass_summary_counts_every_node() -> None:
    out = io.StringIO()
    printer = EventPrinter(Console(file=out, width=200, color_system=None))
    printer(Event("pass_started", data={"scope": "all", "nodes": 3}))
    printer(
        Event(
            "pass_finished",
            data={"moved": 1, "failed": 0, "skipped": 2, "checked_nodes": 1, "duration_s": 0.5},
        )
    )
    printer.drain(5.0)
    printer.close()
    assert "GPU pass finished in 0.50 s over 3 node(s): 1 moved, 0 failed, 2 skipped" in out.getvalue()


def test_optimizer_interval_refuses_tiny_and_huge_and_the_optimizer_lives_on(session) -> None:
    cluster, ctx, buffer = session
    ctx.balancer._start_gpu_optimization()
    for value in ("0.5", "1e10", "1e999", "nan", "inf"):
        ok, shown = shown_by(ctx, buffer, f"optimizer interval {value}")
        assert not ok and "optimizer interval must be between 5 and" in shown and shown.count("\n") == 1
    assert ctx.balancer.optimization_running and ctx.balancer.check_interval == 300


def test_clear_and_version(home: Path, capsys) -> None:
    buffer = io.StringIO()
    ctx = Context(balancer=None, console=Console(file=buffer, force_terminal=True), config=Config())
    assert run_line(ctx, "clear").ok and "\x1b[2J" in buffer.getvalue()
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0 and capsys.readouterr().out.strip() == f"flockparsecli.py {__version__}"
    assert __version__ == importlib.metadata.version("flockparse-gpu")  # one version: the installed one


# ------------------------------------------------------------------ fault 11: escape injection


def test_a_model_name_with_escapes_is_shown_as_text(
    sim_node: Callable[..., SimNode], home: Path, evil_model: str, capsys
) -> None:
    node = sim_node(vram_gb=24, models=[evil_model], preload=[(evil_model, "cpu")])
    code, out, err = run_main(["--nodes", node.url, "vram_report"], capsys)
    assert code == 0 and "\\x1b[2Jevil:latest" in out and not ESC.search(out + err)
    code, out, _ = run_main(["--nodes", node.url, "vram_report", "--json"], capsys)
    assert json.loads(out)[0]["models"][0]["name"] == EVIL  # JSON keeps the data, escaped by JSON itself
    assert "\x1b" not in out


def test_event_and_error_texts_from_a_node_are_shown_as_text() -> None:
    event = Event(
        "move_failed", node="http://127.0.0.1:1", model=EVIL, message="boom \x1b]0;pwned\x07 \u202e"
    )
    out = io.StringIO()
    Console(file=out, width=200, force_terminal=True).print(render.event_line(event))
    assert "\x1b]0" not in out.getvalue() and "\x07" not in out.getvalue() and "\u202e" not in out.getvalue()
    states = [
        {
            "url": "http://127.0.0.1:1",
            "online": False,
            "last_error": "x\x1b[31mred",
            "gpu_evidence": "\x1b[2J",
        }
    ]
    out = io.StringIO()
    Console(file=out, width=200, color_system=None).print(render.nodes_table(states))
    assert "\x1b" not in out.getvalue() and "\\x1b[31mred" in out.getvalue()


# ------------------------------------------------------------------ fault 13: unwritable files


def run_console(balancer, config, keys: str, files_dir: Path) -> str:
    buffer = io.StringIO()
    with create_pipe_input() as pipe, create_app_session(input=pipe, output=DummyOutput()):
        pipe.send_text(keys)
        code = interactive(
            balancer, config, console=text_console(buffer), pt_input=pipe, pt_output=DummyOutput(),
            files_dir=files_dir,
        )  # fmt: skip
    assert code == 0
    return buffer.getvalue()


def test_an_unusable_config_dir_means_no_history_said_once(session, tmp_path: Path) -> None:
    cluster, ctx, _ = session
    blocker = tmp_path / "plain-file"
    blocker.write_text("")
    shown = run_console(ctx.balancer, ctx.config, "priority list\rpriority list\rexit\r", blocker / "sub")
    assert shown.count("history is off") == 1 and shown.count("priority models:") == 2
    assert "Traceback" not in shown


def test_a_full_disk_stops_history_once_and_commands_still_run(session, tmp_path: Path) -> None:
    cluster, ctx, _ = session
    files = tmp_path / "files"
    files.mkdir()
    (files / "history").symlink_to("/dev/full")  # every write fails with ENOSPC
    shown = run_console(ctx.balancer, ctx.config, "priority list\rhelp\rexit\r", files)
    assert shown.count("history is off from now on") == 1
    assert "priority models:" in shown and "force_gpu MODEL" in shown


def test_history_is_private_and_keeps_no_credentials(session, tmp_path: Path) -> None:
    cluster, ctx, _ = session
    files = tmp_path / "files"
    shown = run_console(
        ctx.balancer, ctx.config, "add_node http://u:pw@127.0.0.1:9\rpriority list\rexit\r", files
    )
    assert "credentials" in shown
    history = files / "history"
    assert stat.S_IMODE(history.stat().st_mode) == 0o600
    assert "pw@" not in history.read_text() and "+priority list" in history.read_text()


# ------------------------------------------------------------------ what users expect: filters and watch


def test_vram_report_filters_by_model_or_node(session) -> None:
    cluster, ctx, buffer = session
    cpu_node, gpu_node = (url.split("://")[1] for url in cluster.urls)
    ok, shown = shown_by(ctx, buffer, "vram_report mxbai-embed-large")
    assert ok and gpu_node in shown and cpu_node not in shown and "llama3.1" not in shown
    ok, shown = shown_by(ctx, buffer, "vram_report llama*")
    assert ok and cpu_node in shown and gpu_node not in shown
    ok, shown = shown_by(ctx, buffer, f"vram_report {cpu_node}")
    assert ok and cpu_node in shown and gpu_node not in shown
    ok, shown = shown_by(ctx, buffer, "vram_report lama3.1")
    assert not ok and "did you mean `llama3.1:latest`?" in shown and shown.count("\n") == 1


def test_watch_redraws_until_ctrl_c(session) -> None:
    cluster, ctx, buffer = session
    before = sum(entry[1] == "/api/ps" for entry in cluster.nodes[1].request_log)

    def press_ctrl_c_after_redraws() -> None:  # the 5 s health check alone makes at most 3 in 15 s
        wait_until(lambda: sum(e[1] == "/api/ps" for e in cluster.nodes[1].request_log) >= before + 4)
        _thread.interrupt_main()

    threading.Thread(target=press_ctrl_c_after_redraws, daemon=True).start()
    ok, shown = shown_by(ctx, buffer, "watch 0.5 mxbai-embed-large")
    assert ok and "mxbai-embed-large:latest" in shown and "(q or Ctrl-C leaves)" in shown


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--watch", "nodes"], "--watch goes with vram_report"),
        (["watch", "0.1"], "SECONDS must be between 0.5 and 3600"),
        (["vram_report", "bad name"], "is not a model name"),
    ],
)
def test_watch_and_filter_usage_errors(home: Path, capsys, argv: list[str], message: str) -> None:
    code, _, err = run_main(["--nodes", "127.0.0.1:1", *argv], capsys)
    assert code == 2 and message in err


def test_vram_report_completes_models_and_nodes() -> None:
    completer = ConsoleCompleter({"MODEL|NODE": lambda: ["llama3.1:latest", "http://127.0.0.1:1"]})
    offered = [c.text for c in completer.get_completions(Document("vram_report ll"), None)]
    assert offered == ["llama3.1:latest"]
    assert [c.text for c in completer.get_completions(Document("add_node x "), None)] == ["gpu", "cpu"]


def test_a_priority_flag_name_no_node_has_gets_a_note_at_start(session) -> None:
    from flockparsecli import warn_at_start

    cluster, ctx, buffer = session
    ctx.config.priority_models = ["lama3.1", "nomic-*", "mxbai-embed-large"]
    warn_at_start(ctx.balancer, ctx.config, ctx.console)
    lines = buffer.getvalue().splitlines()
    assert lines == ["note: priority model lama3.1 is on no node (did you mean `llama3.1:latest`?)"]


def test_durations_that_cannot_be_shown_never_raise() -> None:
    assert render.human_seconds(float("inf")) == "never" and render.human_seconds(float("nan")) == "never"


def test_a_bad_flag_is_a_usage_error_in_json_too_and_no_flag_is_abbreviated(home: Path, capsys) -> None:
    code, out, err = run_main(["--json", "--nod", "127.0.0.1:1", "help"], capsys)
    assert code == 2 and "unrecognized arguments: --nod" in err  # never read as --nodes or --node
    assert json.loads(out)["exit_code"] == 2


def test_completion_never_offers_a_name_with_escape_codes() -> None:
    completer = ConsoleCompleter({"MODEL": lambda: [EVIL, "llama3.1:latest"]})
    assert [c.text for c in completer.get_completions(Document("force_gpu "), None)] == ["llama3.1:latest"]


def test_a_background_move_is_one_line_with_its_duration() -> None:
    out = io.StringIO()
    printer = EventPrinter(Console(file=out, width=200, color_system=None))
    started = Event("move_started", node="http://127.0.0.1:1", model="m:latest", data={"source": "optimizer"})
    printer(started)
    printer(
        Event(
            "move_finished", node="http://127.0.0.1:1", model="m:latest", data={"source": "optimizer"},
            message="m:latest now on GPU on http://127.0.0.1:1", time=started.time + 1.5,
        )
    )  # fmt: skip
    printer.drain(5.0)
    printer.close()
    [line] = out.getvalue().splitlines()
    assert line.endswith("optimizer m:latest now on GPU on 127.0.0.1:1 (1.5 s)")
