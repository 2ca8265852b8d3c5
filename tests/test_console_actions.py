"""`unload MODEL`, `--node URL` and `--dry-run` (issue 9: what users of `ollama ps`/`ollama stop` expect)."""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from helpers import EMBED, LLAMA, loaded, on_cpu, on_gpu

from flockparse.console.commands import Context
from flockparse.console.config import Config
from flockparsecli import first_health_round, main, make_balancer, run_line
from ollama_sim import SimCluster

LOADS = ("/api/generate", "/api/embed")


@pytest.fixture
def two_gpu_nodes(sim_cluster: Callable[..., SimCluster], tmp_path: Path, monkeypatch) -> Iterator[tuple]:
    monkeypatch.setenv("FLOCKPARSE_CONFIG_DIR", str(tmp_path))
    cluster = sim_cluster(
        [
            {"preload": [("llama3.1", "forced-cpu")]},
            {"preload": [("llama3.1", "forced-cpu"), ("mxbai-embed-large", "gpu")]},
        ]
    )
    config = Config(nodes=cluster.urls, gpu={url: True for url in cluster.urls}, path=None, timeout=2.0)
    balancer = make_balancer(config, optimize=False)
    balancer.start()
    assert all(state.online for state in first_health_round(balancer, 10.0))
    buffer = io.StringIO()
    yield cluster, Context(balancer=balancer, console=_console(buffer), config=config), buffer
    balancer.close()


def _console(buffer: io.StringIO):
    from rich.console import Console

    return Console(file=buffer, width=160, color_system=None, force_terminal=False, highlight=False)


def run(ctx: Context, buffer: io.StringIO, line: str) -> tuple[bool, str]:
    buffer.seek(0)
    buffer.truncate()
    return run_line(ctx, line).ok, buffer.getvalue()


def loads_sent(node) -> list:
    return [entry for entry in node.request_log if entry[1] in LOADS]


def test_dry_run_says_what_would_move_and_sends_no_load(two_gpu_nodes) -> None:
    cluster, ctx, buffer = two_gpu_nodes
    before = [len(loads_sent(node)) for node in cluster.nodes]

    ok, shown = run(ctx, buffer, "force_gpu llama3.1 --dry-run")

    assert ok and shown.count("would move: would move llama3.1:latest to GPU") == 2
    assert [len(loads_sent(node)) for node in cluster.nodes] == before
    assert all(on_cpu(node, LLAMA) for node in cluster.nodes)
    _, shown = run(ctx, buffer, "force_cpu mxbai-embed-large --dry-run")
    assert "skipped (not_loaded)" in shown and "would move" in shown and on_gpu(cluster.nodes[1], EMBED)
    assert ctx.balancer.optimizer_status()["pinned_cpu"] == []  # a dry run pins nothing


def test_node_limits_a_move_to_that_node(two_gpu_nodes) -> None:
    cluster, ctx, buffer = two_gpu_nodes
    first, second = cluster.nodes

    ok, shown = run(ctx, buffer, f"force_gpu llama3.1 --node {second.url}")

    assert ok and on_gpu(second, LLAMA) and on_cpu(first, LLAMA)
    assert second.url.split("//")[1] in shown and first.url.split("//")[1] not in shown
    ok, shown = run(ctx, buffer, "force_gpu llama3.1 --node http://127.0.0.1:9")
    assert not ok and "not in the cluster" in shown and shown.count("\n") == 1


def test_unload_is_verified_on_every_node_where_the_model_is_loaded(two_gpu_nodes) -> None:
    cluster, ctx, buffer = two_gpu_nodes

    ok, shown = run(ctx, buffer, "unload mxbai-embed-large")

    assert ok and loaded(cluster.nodes[1], EMBED) is None  # gone from /api/ps, not only asked to go
    assert "done: unloaded" in shown and "skipped (not_loaded)" in shown
    assert cluster.nodes[0].counts(EMBED)["loads"] == 0


def test_one_shot_node_and_dry_run_flags_and_json(two_gpu_nodes, capsys) -> None:
    cluster, _, _ = two_gpu_nodes
    nodes = ",".join(cluster.urls)
    code = main(["--nodes", nodes, "unload", "llama3.1", "--node", cluster.urls[0], "--dry-run", "--json"])
    [entry] = json.loads(capsys.readouterr().out)
    assert code == 0 and entry["node"] == cluster.urls[0]
    assert (entry["result"]["reason"], entry["result"]["dry_run"]) == ("would_unload", True)
    assert on_cpu(cluster.nodes[0], LLAMA)
    assert main(["--nodes", nodes, "--dry-run"]) == 2  # an option without a command


def test_optimizer_now_dry_run_lists_the_moves_it_would_make(two_gpu_nodes) -> None:
    cluster, ctx, buffer = two_gpu_nodes
    ctx.balancer.gpu_priority_models = ["llama3.1"]
    before = [len(loads_sent(node)) for node in cluster.nodes]

    ok, shown = run(ctx, buffer, "optimizer now --dry-run")

    assert ok and shown.count("would_move") == 2 and "dry run" in shown
    assert all(on_cpu(node, LLAMA) for node in cluster.nodes)
    assert [len(loads_sent(node)) for node in cluster.nodes] == before


def test_a_report_on_one_node_asks_only_that_node(two_gpu_nodes) -> None:
    cluster, ctx, _ = two_gpu_nodes
    first, second = cluster.nodes
    first.set_fault("hang")  # a report of the whole cluster would wait its timeout for it
    asked = len(first.request_log)  # the monitor's next round is seconds away (health_interval 5 s)

    [entry] = run_line(ctx, f"vram_report {second.url}").data

    assert len(first.request_log) == asked  # the hung node was not asked at all
    assert (entry["node"], entry["stale"]) == (second.url, False)
    assert EMBED in [m["name"] for m in entry["models"]]
    first.clear_fault()


def test_small_console_rules_from_a_try_out() -> None:
    from flockparse.console.commands import UsageError, cmd_vram_report, watch_args
    from flockparse.console.names import suggestions

    assert suggestions("llama3.2", ["llama3.1:latest", "llama3.2:3b"])[0] == "llama3.2:3b"
    assert watch_args(["llama*"]) == (2.0, "llama*") and watch_args(["5", "x"]) == (5.0, "x")
    assert watch_args([]) == (2.0, None)
    with pytest.raises(UsageError, match="empty"):
        cmd_vram_report(None, [" "])


def test_cleanup_unloads_what_is_not_a_priority_and_says_so(two_gpu_nodes) -> None:
    """Node 2 holds mxbai-embed-large in VRAM and llama3.1 in RAM; priority llama3.1: only the embedding
    model's VRAM is taken back (a model in RAM holds none)."""
    cluster, ctx, buffer = two_gpu_nodes
    ctx.balancer.gpu_priority_models = ["llama3.1"]

    ok, shown = run(ctx, buffer, "cleanup --dry-run")
    assert ok and "would unload mxbai-embed-large:latest" in shown and loaded(cluster.nodes[1], EMBED)

    ok, shown = run(ctx, buffer, "cleanup")
    assert ok and "mxbai-embed-large:latest  unloaded" in shown
    assert loaded(cluster.nodes[1], EMBED) is None and on_cpu(cluster.nodes[1], LLAMA)
    ok, shown = run(ctx, buffer, "cleanup")
    assert ok and "nothing to unload" in shown
    ok, shown = run(ctx, buffer, "cleanup now")
    assert not ok and "extra argument" in shown
