"""Consoles that attach to a serve (`--connect URL`): one-shot, stdin and interactive, in process; two real
consoles in ptys and a one-shot command on one served balancer (one optimizer, the same events at both);
a local console that refuses to start a second optimizer on nodes a serve manages.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import EMBED, LLAMA, Recorder, loaded, on_cpu, on_gpu, wait_until
from prompt_toolkit.application import create_app_session
from prompt_toolkit.input import create_pipe_input
from prompt_toolkit.output import DummyOutput
from rich.console import Console
from test_e2e_console import REPO, Terminal

import flockparsecli
from flockparse.console.config import Config
from flockparse.console.toolbar import toolbar_fragments, toolbar_state
from flockparse.remote import RemoteCluster
from flockparse.serve.registry import register_serve
from ollama_sim import SimNode

TOKEN = "a-token"
MONITOR_ONLY = ("/api/version", "/api/tags")


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("FLOCKPARSE_CONFIG_DIR", str(tmp_path))
    monkeypatch.delenv("FLOCKPARSE_TOKEN", raising=False)
    monkeypatch.delenv("OLLAMA_HOST", raising=False)
    return tmp_path


@pytest.fixture
def node(sim_node: Callable[..., SimNode]) -> SimNode:
    return sim_node(vram_gb=24, preload=[("mxbai-embed-large", "gpu"), ("llama3.1", "gpu")])


@pytest.fixture
def lb(node: SimNode, make_balancer):
    """The serve's balancer: its optimizer runs (the cluster's one), priority mxbai-embed-large."""
    balancer = make_balancer([node.url], gpu_priority_models=["mxbai-embed-large"], auto_optimize_gpu=True)
    wait_until(lambda: balancer.optimizer_status()["last_pass"], "the serve's first pass")
    wait_until(lambda: all(s.online and s.installed for s in balancer.node_states()), "the first check")
    return balancer


def run_console(balancer, config: Config, keys: str, **options) -> str:
    """The real prompt loop in process, keys through a pipe; what the user saw."""
    buffer = io.StringIO()
    console = Console(file=buffer, width=160, color_system=None, force_terminal=False, highlight=False)
    with create_pipe_input() as pipe, create_app_session(input=pipe, output=DummyOutput()):
        pipe.send_text(keys)
        code = flockparsecli.interactive(
            balancer, config, console=console, pt_input=pipe, pt_output=DummyOutput(), **options
        )
    assert code == 0
    return buffer.getvalue()


def test_one_shot_commands_go_through_the_serve(home: Path, node: SimNode, lb, served, capsys) -> None:
    url = served(lb, TOKEN)
    assert flockparsecli.main(["--connect", url, "vram_report", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report[0]["node"] == node.url and {m["name"] for m in report[0]["models"]} == {LLAMA, EMBED}

    assert flockparsecli.main(["--connect", url, "force_cpu", "llama3.1", "--json"]) == 1
    out = capsys.readouterr()
    assert json.loads(out.out)["error"].endswith("wants a token: pass --token or set $FLOCKPARSE_TOKEN")
    assert on_gpu(node, LLAMA)

    assert flockparsecli.main(["--connect", url, "--token", TOKEN, "force_cpu", "llama3.1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["result"]["reason"] == "moved"
    assert on_cpu(node, LLAMA) and lb.optimizer.is_pinned(node.url, "llama3.1")  # the serve holds the pin

    assert flockparsecli.main(["--connect", url, "optimizer", "status", "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["running"] is True and status["pinned_cpu"] == [{"node": node.url, "model": LLAMA}]


@pytest.mark.parametrize(
    ("argv", "code", "words"),
    [
        (["add_node", "gpu9"], 1, "add_node is not available when attached to the serve at"),
        (["remove_node", "gpu9"], 1, "the serve's nodes come from its --nodes or config file"),
        (["force_gpu", "lama3.1"], 2, "unknown model lama3.1 (did you mean `llama3.1:latest`?)"),
        (["--nodes", "gpu9", "nodes"], 2, "--nodes: the serve's settings, not an attached console's"),
        (["--demo"], 2, "--demo: the serve's settings"),
    ],
)
def test_what_an_attached_console_refuses_is_one_line(
    home: Path, lb, served, capsys, argv: list[str], code: int, words: str
) -> None:
    url = served(lb)
    assert flockparsecli.main(["--connect", url, *argv]) == code
    err = capsys.readouterr().err
    assert words in err and err.count("\n") <= 2  # one line (rich may wrap it at 80 columns)


def test_no_serve_there_is_one_line_and_exit_1(home: Path, capsys) -> None:
    assert flockparsecli.main(["--connect", "http://127.0.0.1:1", "nodes", "--json"]) == 1
    assert json.loads(capsys.readouterr().out) == {
        "error": "cannot reach the serve at http://127.0.0.1:1: connection refused",
        "exit_code": 1,
    }
    assert flockparsecli.main(["--connect", "ftp://x", "nodes"]) == 2


def test_stdin_lines_go_through_the_serve(home: Path, node: SimNode, lb, served, monkeypatch, capsys) -> None:
    url = served(lb)
    monkeypatch.setattr(sys, "stdin", io.StringIO("priority add codellama\npriority list\nnodes\n"))
    assert flockparsecli.main(["--connect", url]) == 0
    assert lb.gpu_priority_models == ["mxbai-embed-large", "codellama"]
    assert node.url.split("://")[1] in capsys.readouterr().out


def test_an_attached_console_shows_the_serves_events_and_leaves_its_optimizer_running(
    home: Path, node: SimNode, lb, served
) -> None:
    url = served(lb, TOKEN)
    remote = RemoteCluster(url, token=TOKEN)
    config = Config(nodes=[node.url], path=None)
    remote.connect()
    shown = run_console(
        remote,
        config,
        "force_cpu llama3.1\roptimizer interval 60\rpriority add codellama\rexit\r",
        banner=flockparsecli.attached_banner(remote),
    )
    assert f"attached to the serve at {url}" in shown and "optimizer on" in shown
    assert f"{node.url.split('://')[1]}  done: CPU (RAM)" in shown
    assert shown.count("now on CPU") == 0  # the command's own move is its table line, not an event line too
    assert lb.check_interval == 60 and "codellama" in lb.gpu_priority_models
    assert lb.optimization_running  # leaving an attached console stops nobody's optimizer
    remote.close()

    state = toolbar_state(remote)
    text = "".join(fragment for _, fragment in toolbar_fragments(state))
    assert "1/1 nodes online" in text and "optimizer on" in text and f"serve {url.split('://')[1]}" in text


def test_a_local_console_refuses_a_second_optimizer_and_says_how_to_attach(
    home: Path, node: SimNode, lb, served, make_balancer
) -> None:
    url = served(lb)
    register_serve(home, url, lb.nodes)  # what the serve does when it starts
    mine = make_balancer([f"localhost:{node.url.rsplit(':', 1)[1]}"], auto_optimize_gpu=True, start=False)
    guard = lambda: flockparsecli.optimizer_refusal(mine.nodes, None, probe_url=None)  # noqa: E731
    shown = " ".join(
        run_console(mine, Config(path=None), "optimizer on\rexit\r", optimizer_guard=guard).split()
    )
    assert f"the serve at {url} (pid {os.getpid()}) runs the optimizer of 1 of these nodes" in shown
    assert f"attach with `flockparsecli.py --connect {url}` (or pass --own-optimizer)" in shown
    assert shown.count("--connect") == 2  # at start, and again for `optimizer on`
    assert not mine.optimization_running and "GPU auto-optimization enabled" not in shown

    other = make_balancer(["http://127.0.0.1:1"], auto_optimize_gpu=True, start=False)  # not the serve's
    guard = lambda: flockparsecli.optimizer_refusal(other.nodes, None, probe_url=None)  # noqa: E731
    shown = run_console(other, Config(path=None), "exit\r", optimizer_guard=guard)
    assert "GPU auto-optimization enabled" in shown and "--connect" not in shown


# ------------------------------------------------------------------ real terminals


def terminal_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("OLLAMA_HOST", "NO_COLOR", "FLOCKPARSE_TOKEN")}
    env.update(FLOCKPARSE_CONFIG_DIR=str(home), TERM="xterm", COLUMNS="120", LINES="40")
    return env


def node_reads(node: SimNode) -> int:
    """Requests only a health monitor makes (a console that runs one reads them when a node comes up)."""
    return sum(1 for method, path, _ in node.request_log if method == "GET" and path in MONITOR_ONLY)


def test_two_attached_consoles_and_a_one_shot_share_one_optimizer_and_its_events(
    home: Path, node: SimNode, lb, served
) -> None:
    url = served(lb)
    events = Recorder(lb)
    env = terminal_env(home)
    reads_before = node_reads(node)
    with Terminal(["--connect", url], env) as first, Terminal(["--connect", url], env) as second:
        for term in (first, second):
            term.wait_for(lambda t=term: f"attached to the serve at {url}" in t.text(), "the banner", 60)
            term.wait_for(
                lambda t=term: "optimizer on" in t.text() and "serve 127.0.0.1" in t.text(), "toolbar"
            )

        one_shot = subprocess.run(
            [sys.executable, "flockparsecli.py", "--connect", url, "force_cpu", "llama3.1", "--json"],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert one_shot.returncode == 0, one_shot.stderr
        assert json.loads(one_shot.stdout)[0]["result"]["reason"] == "moved"
        for term in (first, second):  # another console's move: an event line in both
            term.wait_for(lambda t=term: "llama3.1:latest now on CPU" in t.text(), "the move's line")
        assert node_reads(node) == reads_before  # the consoles ask the serve, never a node

        loads = node.counts("mxbai-embed-large")["loads"]
        passes = len(events.of("pass_finished"))
        node.restart(downtime=0.5)  # comes back with nothing loaded: the serve's optimizer warms it up
        for term in (first, second):
            term.wait_for(
                lambda t=term: "mxbai-embed-large:latest now on GPU" in t.text(), "the warm-up line"
            )
        wait_until(lambda: on_gpu(node, EMBED), "the warm-up")
        assert node.counts("mxbai-embed-large")["loads"] == loads + 1  # one optimizer moved it, once
        assert len([e for e in events.of("move_finished") if e.model == EMBED]) == 1
        assert len(events.of("pass_finished")) > passes
        for term in (first, second):
            assert term.text().count("mxbai-embed-large:latest now on GPU") == 1
            assert "GPU auto-optimization enabled" not in term.text()  # no optimizer started in a console
            term.type("exit\r")
            assert term.wait_for_exit() == 0
    assert lb.optimization_running


def test_a_local_console_in_a_terminal_says_how_to_attach(home: Path, node: SimNode, lb, served) -> None:
    url = served(lb)
    path = register_serve(home, url, lb.nodes)
    args = ["--nodes", node.url, "--health-interval", "0.2"]
    with Terminal(args, terminal_env(home)) as term:
        term.wait_for(lambda: f"--connect {url}" in term.text(), "the refusal line", 60)
        term.wait_for(lambda: "optimizer off" in term.text(), "the toolbar")
        term.type("exit\r")
        assert term.wait_for_exit() == 0
    with Terminal([*args, "--own-optimizer"], terminal_env(home)) as term:
        term.wait_for(lambda: "GPU auto-optimization enabled" in term.text(), "its own optimizer", 60)
        assert "--connect" not in term.text()
        term.type("exit\r")
        assert term.wait_for_exit() == 0
    assert path.exists()


def test_a_local_cleanup_does_not_act_behind_a_serves_back(
    home: Path, node: SimNode, lb, served, capsys
) -> None:
    """Only the serve sees the requests streaming through it: a local `cleanup` of its nodes is refused
    with where to run it (a dry run, which changes nothing, is answered)."""
    url = served(lb)
    register_serve(home, url, lb.nodes)  # what the serve does when it starts

    code = flockparsecli.main(["--nodes", node.url, "--priority", "mxbai-embed-large", "cleanup"])

    said = " ".join((capsys.readouterr().err).split())
    assert code == 1 and f"cleanup: the serve at {url} runs these nodes" in said
    assert f"`flockparsecli.py --connect {url} cleanup`" in said
    assert loaded(node, LLAMA) is not None  # the serve's non-priority model was left alone
    assert (
        flockparsecli.main(["--nodes", node.url, "--priority", "mxbai-embed-large", "cleanup", "--dry-run"])
        == 0
    )
    assert "would unload llama3.1:latest" in capsys.readouterr().out
