"""The console's command layer in process, against simulated Ollama nodes over real sockets.

Every command, every kind of bad input (one line, the console carries on), one-shot `--json` exit codes,
persistence of add/remove, completion from the live cluster, Ctrl-C cancel, and the real prompt loop
driven through prompt_toolkit's pipe input.
"""

from __future__ import annotations

import _thread
import io
import json
import threading
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from prompt_toolkit.application import create_app_session
from prompt_toolkit.document import Document
from prompt_toolkit.input import create_pipe_input
from prompt_toolkit.output import DummyOutput
from rich.console import Console

import flockparsecli
from flockparse.console.commands import Cancelled, Context
from flockparse.console.completion import ConsoleCompleter, ModelNameRefresher
from flockparse.console.config import Config
from flockparse.console.toolbar import toolbar_fragments, toolbar_state
from flockparse.rules import model_key
from flockparsecli import first_health_round, interactive, main, make_balancer, run_line
from ollama_sim import SimCluster


@dataclass
class Harness:
    """A started balancer over a sim cluster, a context whose console writes into a buffer."""

    cluster: SimCluster
    ctx: Context
    buffer: io.StringIO

    def run(self, line: str) -> tuple[bool, str]:
        """Run one console line; (ok, what the user saw)."""
        self.buffer.seek(0)
        self.buffer.truncate()
        outcome = run_line(self.ctx, line)
        return outcome.ok, self.buffer.getvalue()


def text_console(buffer: io.StringIO) -> Console:
    return Console(file=buffer, width=160, color_system=None, force_terminal=False, highlight=False)


@pytest.fixture
def harness(
    sim_cluster: Callable[..., SimCluster], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Harness]:
    monkeypatch.setenv("FLOCKPARSE_CONFIG_DIR", str(tmp_path))
    cluster = sim_cluster(
        [
            {"vram_gb": 0, "preload": [("llama3.1", "auto")]},
            {"vram_gb": 24, "preload": [("mxbai-embed-large", "cpu")]},
        ]
    )
    config = Config(
        nodes=cluster.urls, gpu={cluster.urls[0]: False}, path=tmp_path / "config.toml", timeout=1.0
    )
    balancer = make_balancer(config, optimize=False)
    buffer = io.StringIO()
    balancer.start()
    assert all(state.online for state in first_health_round(balancer, 10.0))
    yield Harness(cluster, Context(balancer=balancer, console=text_console(buffer), config=config), buffer)
    balancer.close()


def generate_calls(node) -> list:
    return [entry for entry in node.request_log if entry[1] in ("/api/generate", "/api/chat", "/api/embed")]


# ------------------------------------------------------------------ every command


def test_vram_report_shows_each_node_and_placement(harness: Harness) -> None:
    ok, shown = harness.run("vram_report")
    cpu_node, gpu_node = (url.split("://")[1] for url in harness.cluster.urls)
    assert ok
    assert f"{cpu_node}  online" in shown and f"{gpu_node}  online" in shown
    gpu_section = shown.split(gpu_node, 1)[1]
    assert "mxbai-embed-large:latest" in gpu_section and "100% CPU" in gpu_section


def test_force_gpu_moves_the_model_and_reports_per_node(harness: Harness) -> None:
    ok, shown = harness.run("force_gpu mxbai-embed-large")
    assert ok, shown
    cpu_node, gpu_node = (url.split("://")[1] for url in harness.cluster.urls)
    assert f"{cpu_node}  skipped (no_gpu)" in shown
    assert f"{gpu_node}  done: GPU (VRAM)" in shown
    [row] = [m for m in harness.cluster.nodes[1].loaded() if m["name"].startswith("mxbai")]
    assert row["size_vram"] == row["size"] > 0  # really on GPU, verified on the node itself
    ok, shown = harness.run("vram_report")
    assert "100% GPU" in shown.split(gpu_node, 1)[1]


def test_force_cpu_moves_to_ram_and_pins(harness: Harness) -> None:
    harness.run("force_gpu mxbai-embed-large")
    ok, shown = harness.run("force_cpu mxbai-embed-large:latest")
    assert ok, shown
    [row] = [m for m in harness.cluster.nodes[1].loaded() if m["name"].startswith("mxbai")]
    assert row["size_vram"] == 0
    ok, shown = harness.run("optimizer status")
    assert "pinned to CPU: mxbai-embed-large" in shown


def test_nodes_lb_stats_help(harness: Harness) -> None:
    ok, shown = harness.run("nodes")
    assert ok and shown.count("online") == 2 and "CPU only" in shown
    ok, shown = harness.run("lb_stats")
    assert ok and "requests" in shown and "in flight" in shown and "optimizer: off" in shown
    ok, shown = harness.run("help")
    assert ok and "force_gpu MODEL" in shown and "priority list|add MODEL|remove MODEL" in shown
    ok, shown = harness.run("help force_cpu")
    assert ok and shown.startswith("force_cpu MODEL")


def test_route_explains_which_node_serves_a_model_and_why(harness: Harness) -> None:
    cpu_node, gpu_node = (url.removeprefix("http://") for url in harness.cluster.urls)
    ok, shown = harness.run("route llama3.1")
    lines = shown.splitlines()
    assert ok and lines[0] == f"llama3.1:latest, routing adaptive: the next request goes to {cpu_node}"
    assert lines[1].startswith(f"  1. {cpu_node}  llama3.1:latest is loaded 100% in RAM  (0 in flight, ")
    assert lines[2].startswith(f"  2. {gpu_node}  llama3.1:latest is installed; the node's GPU is not known")
    harness.cluster.nodes[0].set_fault("down")
    harness.ctx.balancer.vram_report()  # the console sees it down now rather than at the next check
    ok, shown = harness.run("route llama3.1")
    assert (
        ok and f"the next request goes to {gpu_node}" in shown and f"-  {cpu_node}  skipped: offline" in shown
    )
    ok, shown = harness.run("route lama3.1")
    assert not ok and shown.strip() == "unknown model lama3.1 (did you mean `llama3.1:latest`?)"


def test_routing_shows_and_sets_the_strategy(harness: Harness) -> None:
    balancer = harness.ctx.balancer
    ok, shown = harness.run("routing")
    assert ok and shown.startswith("routing: adaptive (the model's placement first")
    ok, shown = harness.run("routing least_loaded")
    assert ok and balancer.routing == "least_loaded" and harness.ctx.config.routing == "least_loaded"
    assert "for this session" in shown
    ok, shown = harness.run("route llama3.1")
    assert "routing least_loaded" in shown and "fewest requests in flight, then lowest latency" in shown
    ok, shown = harness.run("routing fastest")
    assert not ok and shown.strip() == (
        "routing: unknown routing `fastest` (one of: adaptive, round_robin, least_loaded, lowest_latency)"
    )
    assert balancer.routing == "least_loaded"


def test_optimizer_subcommands(harness: Harness) -> None:
    balancer = harness.ctx.balancer
    ok, shown = harness.run("optimizer on")
    assert ok and balancer.optimization_running and "optimizer: on" in shown
    ok, shown = harness.run("optimizer interval 42")
    assert ok and balancer.check_interval == 42 and "every 42s" in shown
    ok, shown = harness.run("optimizer off")
    assert ok and not balancer.optimization_running and "optimizer: off" in shown
    ok, shown = harness.run("optimizer now")
    assert ok and "optimizer pass done" in shown and "moved" in shown
    [row] = [m for m in harness.cluster.nodes[1].loaded() if m["name"].startswith("mxbai")]
    assert row["size_vram"] == row["size"]  # the pass put the priority model on GPU


def test_priority_list_add_remove(harness: Harness) -> None:
    balancer = harness.ctx.balancer
    ok, shown = harness.run("priority list")
    assert ok and "mxbai-embed-large" in shown
    ok, shown = harness.run("priority add codellama")
    assert ok and "codellama" in balancer.gpu_priority_models
    ok, shown = harness.run("priority add nomic-*")  # globs are accepted without the known-model check
    assert ok and "nomic-*" in balancer.gpu_priority_models
    ok, shown = harness.run("priority remove codellama:latest")
    assert ok and "codellama" not in balancer.gpu_priority_models


def test_add_and_remove_node_persist_atomically(harness: Harness, sim_node) -> None:
    extra = sim_node(vram_gb=8)
    path = harness.ctx.config.path
    ok, shown = harness.run(f"add_node {extra.url} gpu")
    assert ok and "saved to" in shown
    saved = tomllib.loads(path.read_text())
    assert saved["nodes"] == [*harness.cluster.urls, extra.url]
    assert saved["gpu"] == {harness.cluster.urls[0]: False, extra.url: True}  # declared flags kept too
    ok, shown = harness.run(f"remove_node {harness.cluster.urls[0]}")
    assert ok
    saved = tomllib.loads(path.read_text())
    assert saved["nodes"] == [harness.cluster.urls[1], extra.url]
    assert saved["gpu"] == {extra.url: True}
    leftovers = [p.name for p in path.parent.iterdir() if p.name.startswith(".config")]
    assert leftovers == [".config.toml.lock"]  # the lock file stays; no temp file


def test_exit_and_quit(harness: Harness) -> None:
    assert run_line(harness.ctx, "exit").exit and run_line(harness.ctx, "quit").exit


# ------------------------------------------------------------------ bad input: one line, carry on


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("forc_gpu x", "unknown command `forc_gpu` (did you mean `force_gpu`? try `help`)"),
        ("force_gpu", "missing argument MODEL: usage: force_gpu MODEL"),
        ("force_gpu a b", "extra argument `b`"),
        ("add_node ftp://127.0.0.1:1", "invalid node URL"),
        ("add_node 127.0.0.1:99999", "invalid node URL"),
        ("remove_node http://127.0.0.1:9", "http://127.0.0.1:9 is not a node"),
        ("optimizer interval soon", "is not a number of seconds"),
        ("optimizer interval 0", "must be between 5 and 2592000 seconds, got 0"),
        ("priority add mxbai-embed-large", "already a priority model"),
        ("priority remove nothing-here", "is not a priority model"),
        ("force_gpu 'unbalanced", "cannot parse the line"),
    ],
)
def test_bad_input_gives_one_line_and_the_console_carries_on(
    harness: Harness, line: str, expected: str
) -> None:
    ok, shown = harness.run(line)
    assert not ok
    assert expected in shown and shown.count("\n") == 1
    ok, shown = harness.run("nodes")
    assert ok and "online" in shown


def test_unknown_model_is_refused_before_touching_any_node(harness: Harness) -> None:
    before = [len(generate_calls(node)) for node in harness.cluster.nodes]
    ok, shown = harness.run("force_gpu no-such-model")
    assert not ok
    assert shown.startswith("unknown model no-such-model (") and shown.count("\n") == 1
    assert [len(generate_calls(node)) for node in harness.cluster.nodes] == before


def test_offline_node_is_marked_stale_with_its_last_known_models(harness: Harness) -> None:
    harness.cluster.nodes[1].set_fault("down")
    ok, shown = harness.run("vram_report")
    assert not ok
    gpu_node = harness.cluster.urls[1].split("://")[1]
    section = shown.split(gpu_node, 1)[1]
    assert section.lstrip().startswith("offline  STALE: last known state")
    assert "mxbai-embed-large:latest" in section


# ------------------------------------------------------------------ cancel, completion


def test_ctrl_c_cancels_a_long_command_and_returns(harness: Harness) -> None:
    started = threading.Event()

    def long_core_call(cancel: threading.Event) -> str:
        started.set()
        return "finished" if not cancel.wait(30) else "saw cancel"

    def press_ctrl_c() -> None:
        started.wait(10)
        _thread.interrupt_main()  # what the terminal's SIGINT does to the main thread

    threading.Thread(target=press_ctrl_c, daemon=True).start()
    with pytest.raises(Cancelled, match="^cancelled$"):
        harness.ctx.run_cancellable(long_core_call)
    assert harness.ctx.cancel.is_set()


def test_completion_offers_whole_model_names_known_to_the_cluster(harness: Harness) -> None:
    refresher = ModelNameRefresher(harness.ctx.balancer.known_models)
    refresher.refresh()
    completer = ConsoleCompleter({"MODEL": lambda: refresher.names})
    offered = [c.text for c in completer.get_completions(Document("force_gpu llama3.1:"), None)]
    assert offered == ["llama3.1:70b", "llama3.1:latest"]
    offered = [c.text for c in completer.get_completions(Document("force_cpu mxb"), None)]
    assert offered == ["mxbai-embed-large:latest"]
    assert model_key(offered[0]) in harness.ctx.balancer.known_models()


# ------------------------------------------------------------------ the real loop through a pipe


def test_prompt_loop_through_pipe_input(harness: Harness) -> None:
    buffer = io.StringIO()
    with create_pipe_input() as pipe, create_app_session(input=pipe, output=DummyOutput()):
        pipe.send_text("bogus\rforce_gpu\rvram_report\rexit\r")
        code = interactive(
            harness.ctx.balancer,
            harness.ctx.config,
            console=text_console(buffer),
            pt_input=pipe,
            pt_output=DummyOutput(),
        )
    shown = buffer.getvalue()
    assert code == 0
    assert "unknown command `bogus`" in shown and "missing argument MODEL" in shown
    assert "mxbai-embed-large:latest" in shown  # the table still came after two bad lines
    assert (Path(harness.ctx.config.path).parent / "history").read_text().count("+vram_report") == 1


def test_ctrl_d_stops_the_optimizer(harness: Harness) -> None:
    harness.ctx.balancer._start_gpu_optimization()
    with create_pipe_input() as pipe:
        pipe.send_text("\x04")
        code = interactive(
            harness.ctx.balancer,
            harness.ctx.config,
            console=text_console(io.StringIO()),
            pt_input=pipe,
            pt_output=DummyOutput(),
        )
    assert code == 0 and not harness.ctx.balancer.optimization_running


# ------------------------------------------------------------------ one-shot mode


def one_shot(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_one_shot_json_vram_report(harness: Harness, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = one_shot(["--nodes", ",".join(harness.cluster.urls), "vram_report", "--json"], capsys)
    report = json.loads(out)
    assert code == 0
    assert [entry["node"] for entry in report] == harness.cluster.urls
    assert any(
        m["name"] == "mxbai-embed-large:latest" and m["location"] == "CPU (RAM)" for m in report[1]["models"]
    )


def test_one_shot_exit_codes(harness: Harness, capsys: pytest.CaptureFixture[str], monkeypatch) -> None:
    nodes = ",".join(harness.cluster.urls)
    assert one_shot(["--nodes", nodes, "nodes"], capsys)[0] == 0
    harness.ctx.balancer.close()  # its health monitor must not talk to the nodes while we count
    requests_before = [len(node.request_log) for node in harness.cluster.nodes]
    code, _, err = one_shot(["--nodes", nodes, "frobnicate"], capsys)
    assert code == 2 and "unknown command `frobnicate`" in err
    assert one_shot(["--nodes", nodes, "force_gpu"], capsys)[0] == 2
    assert [len(node.request_log) for node in harness.cluster.nodes] == requests_before  # told at once
    assert one_shot(["--nodes", nodes, "force_gpu", "nope"], capsys)[0] == 2  # unknown model: usage
    code, out, _ = one_shot(["--nodes", nodes, "force_gpu", "mxbai-embed-large", "--json"], capsys)
    assert code == 0 and {item["result"].get("reason") for item in json.loads(out)} == {"no_gpu", "moved"}
    harness.cluster.nodes[0].set_fault("down")
    code, out, err = one_shot(["--nodes", nodes, "vram_report", "--json"], capsys)
    assert code == 1 and json.loads(out)[0]["online"] is False
    assert not harness.ctx.balancer.optimization_running  # one-shot never starts a background optimizer


def test_one_shot_does_not_start_the_optimizer(
    harness: Harness, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    built = []
    real = flockparsecli.make_balancer
    monkeypatch.setattr(
        flockparsecli,
        "make_balancer",
        lambda config, optimize: built.append(optimize) or real(config, optimize),
    )
    assert one_shot(["--nodes", ",".join(harness.cluster.urls), "lb_stats"], capsys)[0] == 0
    assert built == [False]


def test_unreachable_default_node_suggests_demo(tmp_path: Path, monkeypatch, capsys, sim_node) -> None:
    dead = sim_node(vram_gb=0)
    dead.set_fault("down")
    monkeypatch.setenv("FLOCKPARSE_CONFIG_DIR", str(tmp_path))
    monkeypatch.setenv("OLLAMA_HOST", dead.url)
    code, _, err = one_shot(["nodes"], capsys)
    assert code == 1 and "--demo" in err and "no Ollama answered" in err
    monkeypatch.delenv("OLLAMA_HOST")
    (tmp_path / "config.toml").write_text("interval = nope\n")
    code, _, err = one_shot(["nodes"], capsys)
    assert code == 2 and "cannot read config" in err


def test_demo_cluster_one_shot(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.setenv("FLOCKPARSE_CONFIG_DIR", str(tmp_path))
    code, out, _ = one_shot(["--demo", "vram_report", "--json"], capsys)
    cpu_only, training, healthy = json.loads(out)
    assert code == 0
    assert (cpu_only["gpu"], training["gpu"], healthy["gpu"]) == ("no", "yes", "yes")
    assert [(m["name"], m["location"]) for m in cpu_only["models"]] == [("llama3.1:latest", "CPU (RAM)")]
    # a training job holds 20 of the 24 GB: llama3.1 loaded next to it is split
    [split] = training["models"]
    assert split["name"] == "llama3.1:latest" and split["location"].startswith("Split")
    assert {(m["name"], m["location"]) for m in healthy["models"]} == {
        ("llama3.1:latest", "GPU (VRAM)"),
        ("mxbai-embed-large:latest", "GPU (VRAM)"),
    }
    # a dcgm-exporter beside each GPU node: the training job's VRAM is "other", the CPU box has none
    assert "vram_total_mb" not in cpu_only
    assert (training["vram_total_mb"], healthy["vram_total_mb"]) == (24 * 1024, 24 * 1024)
    assert training["vram_other_mb"] > 20 * 1024 > healthy["vram_other_mb"]
    code, out, _ = one_shot(["--demo", "add_node", "http://127.0.0.1:9"], capsys)
    assert code == 0 and "not saved" in out
    assert not (tmp_path / "config.toml").exists()


def test_a_failing_core_call_is_one_line_and_the_console_carries_on(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken() -> dict:
        raise RuntimeError("stats exploded")

    monkeypatch.setattr(harness.ctx.balancer, "get_stats", broken)  # fault injection, not a mock of I/O
    ok, shown = harness.run("lb_stats")
    assert (
        not ok
        and shown.startswith("lb_stats failed: RuntimeError: stats exploded")
        and shown.count("\n") == 1
    )
    ok, shown = harness.run("nodes")
    assert ok and "online" in shown


def test_toolbar_from_the_live_balancer(harness: Harness) -> None:
    text = "".join(part for _, part in toolbar_fragments(toolbar_state(harness.ctx.balancer)))
    assert "2/2 nodes online  0 with GPU  optimizer off" in text  # no evidence of a GPU yet
    harness.run("force_gpu mxbai-embed-large")  # the model lands in VRAM: now the node has proven a GPU
    text = "".join(part for _, part in toolbar_fragments(toolbar_state(harness.ctx.balancer)))
    assert "2/2 nodes online  1 with GPU  optimizer off" in text
    harness.ctx.balancer._start_gpu_optimization()
    text = "".join(part for _, part in toolbar_fragments(toolbar_state(harness.ctx.balancer)))
    assert "optimizer on, next pass in " in text


def test_flockparsecli_reexports_the_core() -> None:
    from flockparse.balancer import OllamaLoadBalancer
    from gpu_controller import GPUController

    assert flockparsecli.OllamaLoadBalancer is OllamaLoadBalancer
    assert flockparsecli.GPUController is GPUController


def test_one_shot_accepts_a_model_that_is_installed_but_not_loaded(harness: Harness, capsys) -> None:
    nodes = ",".join(harness.cluster.urls)
    code, out, _ = one_shot(["--nodes", nodes, "force_gpu", "codellama", "--json"], capsys)
    assert code == 0
    assert [item["result"]["reason"] for item in json.loads(out)] == ["no_gpu", "moved"]


def test_a_hung_node_costs_at_most_its_timeout_and_shows_stale(harness: Harness) -> None:
    harness.cluster.nodes[1].set_fault("hang")
    ok, shown = harness.run("vram_report")
    harness.cluster.nodes[1].clear_fault()
    cpu_node, gpu_node = (url.split("://")[1] for url in harness.cluster.urls)
    assert not ok
    assert f"{cpu_node}  online" in shown and "llama3.1:latest" in shown.split(gpu_node, 1)[0]
    section = shown.split(gpu_node, 1)[1]
    assert section.lstrip().startswith("offline  STALE: last known state") and "mxbai-embed-large" in section


def test_force_with_an_offline_node_is_a_failure_for_scripts(harness: Harness, capsys) -> None:
    harness.cluster.nodes[0].set_fault("down")
    nodes = ",".join(harness.cluster.urls)
    code, out, _ = one_shot(["--nodes", nodes, "force_gpu", "mxbai-embed-large", "--json"], capsys)
    results = json.loads(out)
    assert code == 1  # the GPU node moved, but a node was unreachable
    assert results[0]["result"]["skipped"] and results[0]["result"]["reason"] == "offline"
    assert results[1]["result"]["reason"] == "moved"
