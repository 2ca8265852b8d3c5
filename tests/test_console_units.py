"""The console's pure parts: config, registry/arity, renderers, toolbar, completion. No network needed."""

from __future__ import annotations

import io
import tomllib
from pathlib import Path

import pytest
from prompt_toolkit.document import Document
from rich.console import Console

from flockparse.console import render
from flockparse.console.commands import REGISTRY, UsageError, check_arity, parse_line, resolve
from flockparse.console.completion import ConsoleCompleter, argument_kind
from flockparse.console.config import ConfigError, dumps, load_config, normalize_url, update_nodes
from flockparse.console.toolbar import toolbar_fragments
from flockparse.events import Event
from flockparse.rules import model_key

NOW = 1_800_000_000.0


def text_of(renderable: object, width: int = 140) -> str:
    """What a user would read: the renderable printed without colour."""
    out = io.StringIO()
    Console(file=out, width=width, color_system=None, force_terminal=False).print(renderable)
    return out.getvalue()


# ------------------------------------------------------------------ config


def test_precedence_flags_over_file_over_env_over_default(tmp_path: Path) -> None:
    env = {"FLOCKPARSE_CONFIG_DIR": str(tmp_path)}
    assert load_config(env=env).nodes == ["http://localhost:11434"]
    env["OLLAMA_HOST"] = "127.0.0.1:5000"
    assert load_config(env=env).nodes == ["http://127.0.0.1:5000"]
    (tmp_path / "config.toml").write_text('nodes = ["http://127.0.0.1:6000"]\ninterval = 42\n')
    from_file = load_config(env=env)
    assert from_file.nodes == ["http://127.0.0.1:6000"] and from_file.interval == 42
    flagged = load_config(nodes_flag="127.0.0.1:7000,http://127.0.0.1:7001", interval_flag=5, env=env)
    assert flagged.nodes == ["http://127.0.0.1:7000", "http://127.0.0.1:7001"]
    assert flagged.interval == 5


def test_config_file_keys_and_gpu_table(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(
        'nodes = ["http://127.0.0.1:1"]\npriority_models = ["mxbai-embed-large", "*"]\n'
        'keep_alive = "30m"\nhealth_interval = 0.5\ntimeout = 2\n[gpu]\n"http://127.0.0.1:1" = false\n'
    )
    config = load_config(config_file=str(path), env={})
    assert config.priority_models == ["mxbai-embed-large", "*"]
    assert config.keep_alive == "30m" and config.health_interval == 0.5 and config.timeout == 2
    assert config.gpu == {"http://127.0.0.1:1": False}
    assert config.path == path


@pytest.mark.parametrize(
    "content",
    [
        "interval = -1\n",
        'nodes = "http://x"\n',
        "nodes = [\n",
        '[gpu]\n"http://127.0.0.1:1" = "yes"\n',
        "intervall = 60\n",
    ],
)
def test_bad_config_gives_one_line_error(tmp_path: Path, content: str) -> None:
    path = tmp_path / "c.toml"
    path.write_text(content)
    with pytest.raises(ConfigError) as info:
        load_config(config_file=str(path), env={})
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("bad", ["", "ftp://127.0.0.1:1", "http://", "http://127.0.0.1:notaport"])
def test_bad_urls_are_refused(bad: str) -> None:
    with pytest.raises(ConfigError):
        normalize_url(bad)


def test_node_changes_are_atomic_and_keep_other_keys(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "config.toml"
    path.parent.mkdir()
    path.write_text('interval = 60\nkeep_alive = "1h"\nnodes = ["http://127.0.0.1:1"]\n')
    update_nodes(path, add="http://127.0.0.1:2", gpu={"http://127.0.0.1:2": True})
    table = tomllib.loads(path.read_text())
    assert table == {
        "interval": 60,
        "keep_alive": "1h",
        "nodes": ["http://127.0.0.1:1", "http://127.0.0.1:2"],
        "gpu": {"http://127.0.0.1:2": True},
    }
    update_nodes(path, remove="http://127.0.0.1:2")  # removing a node drops its GPU declaration too
    assert tomllib.loads(path.read_text()) == {
        "interval": 60,
        "keep_alive": "1h",
        "nodes": ["http://127.0.0.1:1"],
    }
    assert sorted(p.name for p in path.parent.iterdir()) == [".config.toml.lock", "config.toml"]  # no temp


def test_toml_writer_round_trips_awkward_strings() -> None:
    table = {
        "keep_alive": 'a "quoted"\\ value\n',
        "nodes": ["http://127.0.0.1:1"],
        "gpu": {"http://[::1]:2": True},
    }
    assert tomllib.loads(dumps(table)) == table


# ------------------------------------------------------------------ registry


def test_every_issue_command_is_registered() -> None:
    for name in ("force_gpu", "force_cpu", "vram_report", "lb_stats", "help", "nodes", "add_node"):
        assert resolve(name).name == name
    for name in ("remove_node", "optimizer", "priority", "exit"):
        assert resolve(name).name == name
    assert resolve("quit").name == "exit"


@pytest.mark.parametrize(
    ("words", "expected"),
    [
        (["force_gpu"], "missing argument MODEL"),
        (["force_gpu", "a", "b"], "extra argument `b`"),
        (["vram_report", "x", "y"], "extra argument `y`"),
        (["optimizer"], "missing argument"),
        (["optimizer", "fast"], "unknown subcommand `fast`"),
        (["optimizer", "interval"], "missing argument SECONDS"),
        (["priority", "add"], "missing argument MODEL"),
        (["priority", "list", "x"], "extra argument `x`"),
    ],
)
def test_arity_errors_are_uniform_one_liners(words: list[str], expected: str) -> None:
    with pytest.raises(UsageError) as info:
        check_arity(resolve(words[0]), words[1:])
    assert expected in str(info.value) and "\n" not in str(info.value)


def test_unknown_command_suggests_the_closest() -> None:
    with pytest.raises(
        UsageError, match=r"unknown command `force_gup` \(did you mean `force_gpu`\? try `help`\)"
    ):
        resolve("force_gup")
    with pytest.raises(UsageError, match=r"unknown command `zzz` \(try `help`\)"):
        resolve("zzz")


def test_parse_line_reports_unbalanced_quotes() -> None:
    assert parse_line("force_gpu 'llama3.1:8b'") == ["force_gpu", "llama3.1:8b"]
    with pytest.raises(UsageError):
        parse_line("force_gpu 'llama")


def test_canonical_names() -> None:
    assert model_key("Llama3.1") == "llama3.1:latest"
    assert model_key("llama3.1:8b") == "llama3.1:8b"
    assert model_key("hf.co/x/y") == "hf.co/x/y:latest"


def test_help_lists_every_command_from_the_registry() -> None:
    shown = text_of(render.help_table(REGISTRY.values()))
    for cmd in REGISTRY.values():
        assert cmd.usage in shown
    assert "optimizer on|off|status|now|interval SECONDS" in shown


# ------------------------------------------------------------------ renderers


def model_row(name: str, location: str, gpu: int, vram: float, ram: float, expires: object = None) -> dict:
    return {
        "name": name,
        "location": location,
        "gpu_percent": gpu,
        "vram_mb": vram,
        "ram_mb": ram,
        "expires_at": expires,
        "keep_forever": False,
    }


def test_vram_report_shows_placements_sizes_expiry_and_stale_nodes() -> None:
    report = [
        {
            "node_url": "http://127.0.0.1:5001",
            "latency_ms": 3.2,
            "models": [
                model_row("llama3.1:8b", "GPU (VRAM)", 100, 5000, 0, NOW + 252),
                model_row(
                    "mxbai-embed-large:latest", "CPU (RAM)", 0, 0, 705, "2027-01-15T08:00:00.123456789+00:00"
                ),
                model_row("qwen2:7b", "Split (52% GPU)", 52, 2600, 2400, NOW - 1),
            ],
        },
        {
            "node_url": "http://127.0.0.1:5002",
            "error": "connection refused",
            "stale": True,
            "models": [model_row("llama3.1:latest", "GPU (VRAM)", 100, 4900, 0, NOW + 9e9)],
        },
    ]
    shown = text_of(render.vram_report(report, now=NOW))
    assert "127.0.0.1:5001  online  3 ms  holds 7.4 GB VRAM, 3.0 GB RAM" in shown
    assert "100% GPU" in shown and "100% CPU" in shown and "48%/52% CPU/GPU" in shown
    assert "4.9 GB" in shown and "705 MB" in shown
    assert "in 4m 12s" in shown and "stopping..." in shown and "forever" in shown
    assert "127.0.0.1:5002  offline  STALE: last known state  (connection refused)  holds 4.8 GB" in shown
    assert "llama3.1:latest" in shown  # the stale node still shows its last known models


def test_lb_stats_table_and_optimizer_line() -> None:
    stats = {
        "nodes": [
            {
                "url": "http://127.0.0.1:5001",
                "online": True,
                "has_gpu": True,
                "latency_ms": 2.0,
                "requests": 7,
                "errors": 1,
                "in_flight": 2,
                "latency_p50_ms": 41.2,
                "latency_p95_ms": 95.0,
                "ttft_p50_ms": 12.0,
                "ttft_p95_ms": 30.4,
                "tokens_per_s": 98.25,
                "models": [
                    model_row("llama3.1:8b", "GPU (VRAM)", 100, 5000, 0),
                    model_row("m:1", "CPU (RAM)", 0, 0, 9),
                ],
            },
            {"url": "http://127.0.0.1:5002", "online": False, "has_gpu": None, "requests": 0, "errors": 4},
        ],
        "optimizer": {
            "running": True,
            "interval": 300,
            "next_pass_in": 130,
            "last_pass": {"moved": 1, "started_at": NOW - 10},
        },
        "routing": "adaptive",
    }
    shown = text_of(render.lb_stats(stats, now=NOW))
    assert "load balancer (routing adaptive)" in shown
    row = next(line for line in shown.splitlines() if "5001" in line)
    assert row.replace("│", " ").split()[1:14] == [
        *("online", "GPU", "2", "ms", "7", "1", "2"),
        *("41/95", "ms", "12/30", "ms", "98.2", "llama3.1:8b"),  # p50/p95 latency and TTFT, tok/s
    ]
    other = next(line for line in shown.splitlines() if "5002" in line)
    assert other.replace("│", " ").split()[-4:] == ["-", "-", "-", "-"]  # no samples yet; nothing in VRAM
    assert "m:1" not in row  # models in VRAM only
    assert "offline" in next(line for line in shown.splitlines() if "5002" in line)
    assert "optimizer: on, every 5m 00s, next pass in 2m 10s, last pass 10s ago (1 moved)" in shown


def vram_node(url: str, total: float | None, free: float = 0, ollama: float = 0, **extra: object) -> dict:
    used = None if total is None else total - free
    other = None if used is None else max(0.0, used - ollama)
    return {
        "node": url,
        "online": True,
        "models": [],
        "vram_total_mb": total,
        "vram_used_mb": used,
        "vram_free_mb": None if total is None else free,
        "vram_ollama_mb": ollama,
        "vram_other_mb": other,
        "vram_stale": total is None,
        "vram_error": None,
        "gpus": [],
        **extra,
    }


def test_vram_bar_is_ollama_other_free_of_one_length() -> None:
    bar = render.vram_bar(vram_node("http://n:1", 24576, free=2048, ollama=2458)).plain
    assert bar.startswith("█" * 1 + "▓" * 10 + "░" * 1) and bar.endswith(" 22.0 GB/24.0 GB")
    for free, ollama in ((0, 0), (24576, 0), (100, 24000), (12000, 6000)):
        cells = render.vram_bar(vram_node("http://n:1", 24576, free=free, ollama=ollama)).plain.split(" ")[0]
        assert len(cells) == render.VRAM_BAR_WIDTH
    assert render.vram_bar({"node": "http://n:1"}).plain == "-"  # no exporter
    stale = render.vram_bar(vram_node("http://n:1", 24576, free=2048, vram_stale=True)).plain
    assert stale.endswith(" stale")


def test_vram_report_shows_the_exporters_figures_under_each_node() -> None:
    two_gpus = [
        {
            "index": "0",
            "name": "NVIDIA L40S",
            "instance": None,
            "total_mb": 46068,
            "used_mb": 20412,
            "free_mb": 25047,
        },
        {
            "index": "1",
            "name": "NVIDIA L40S",
            "instance": None,
            "total_mb": 46068,
            "used_mb": 1,
            "free_mb": 45458,
        },
    ]
    report = [
        vram_node("http://127.0.0.1:5001", 92136, free=70505, ollama=9045, gpus=two_gpus),
        vram_node(
            "http://127.0.0.1:5002",
            None,
            vram_error="http://127.0.0.1:9400 is unreachable (connection refused)",
        ),
        vram_node("http://127.0.0.1:5003", 24576, free=2048, vram_stale=True, vram_error="HTTP 500"),
        vram_node("http://127.0.0.1:5004", 0),
        {"node": "http://127.0.0.1:5005", "online": True, "models": []},
    ]
    shown = text_of(render.vram_report(report, now=NOW))
    assert "21.1 GB/90.0 GB  Ollama 8.8 GB, other 12.3 GB, free 68.9 GB" in shown
    assert "GPU 0 NVIDIA L40S  19.9 GB/45.0 GB used, 24.5 GB free" in shown
    assert "VRAM unknown: the GPU exporter gives no figures (127.0.0.1:9400 is unreachable" in shown
    assert "stale  Ollama 0 MB, other 22.0 GB, free 2.0 GB  (last figures: HTTP 500)" in shown
    assert "VRAM: its GPU exporter lists no GPU" in shown
    assert shown.count("VRAM") == 4  # a node without an exporter shows no VRAM line


def test_lb_stats_shows_a_vram_bar_and_its_legend_only_with_exporters() -> None:
    plain = {"nodes": [{"url": "http://127.0.0.1:5001", "online": True}], "optimizer": {}}
    assert "VRAM" not in text_of(render.lb_stats(plain)).replace("in VRAM", "")
    stats = {"nodes": [vram_node("http://127.0.0.1:5001", 24576, free=2048, ollama=2458)], "optimizer": {}}
    shown = text_of(render.lb_stats(stats))
    assert "█▓▓▓▓▓▓▓▓▓▓░ 22.0 GB/24.0 GB" in shown
    assert "VRAM: █ Ollama  ▓ other programs  ░ free" in shown
    narrow = text_of(render.lb_stats(stats), width=50)
    assert "VRAM █▓▓▓▓▓▓▓▓▓▓░ 22.0 GB/24.0 GB" in narrow


def test_move_results_lines() -> None:
    results = [
        {"node": "http://127.0.0.1:1", "result": {"success": False, "skipped": True, "reason": "no_gpu"}},
        {
            "node": "http://127.0.0.1:2",
            "result": {"success": True, "reason": "moved", "location": "GPU (VRAM)"},
        },
        {
            "node": "http://127.0.0.1:3",
            "result": {"success": True, "reason": "already", "location": "GPU (VRAM)"},
        },
        {
            "node": "http://127.0.0.1:4",
            "result": {"success": False, "reason": "out_of_memory", "message": "no room", "restored": True},
        },
    ]
    lines = text_of(render.move_results("m", "GPU", results)).splitlines()
    assert lines[1].strip() == "127.0.0.1:1  skipped (no_gpu)"
    assert lines[2].strip() == "127.0.0.1:2  done: GPU (VRAM)"
    assert lines[3].strip() == "127.0.0.1:3  already there: GPU (VRAM)"
    assert lines[4].strip() == "127.0.0.1:4  failed (out_of_memory): no room  (put back where it was)"


def test_vram_held_by_others_is_a_vram_line() -> None:
    words = "VRAM held by other programs keeps llama3.1:latest off the GPU on"
    event = Event(
        "vram_held_by_others", "http://127.0.0.1:5001", "llama3.1:latest", f"{words} http://127.0.0.1:5001"
    )
    shown = text_of(render.event_line(event)).rstrip("\n")
    assert shown.endswith(
        "VRAM      VRAM held by other programs keeps llama3.1:latest off the GPU on 127.0.0.1:5001"
    )


def test_event_line_is_one_short_stamped_line() -> None:
    event = Event(
        "move_finished", node="http://127.0.0.1:5001", model="m", message="m now on GPU at 127.0.0.1:5001"
    )
    shown = text_of(render.event_line(event)).rstrip("\n")
    assert "\n" not in shown
    assert shown.endswith("move      m now on GPU at 127.0.0.1:5001")
    assert shown[2] == ":" and shown[5] == ":"  # HH:MM:SS first


# ------------------------------------------------------------------ toolbar


def test_toolbar_fragments_for_given_states() -> None:
    state = {
        "nodes_total": 3,
        "nodes_online": 2,
        "nodes_gpu": 1,
        "optimizer_running": True,
        "next_pass_in": 75,
    }
    fragments = toolbar_fragments(state)
    text = "".join(part for _, part in fragments)
    assert "2/3 nodes online  1 with GPU  optimizer on, next pass in 1m 15s" in text
    assert ("class:bottom-toolbar.warn", "2/3") in fragments  # colour only through style classes
    off = "".join(
        part for _, part in toolbar_fragments({**state, "nodes_online": 3, "optimizer_running": False})
    )
    assert "optimizer off" in off and "next pass" not in off


# ------------------------------------------------------------------ completion


def completions(text: str, models: list[str]) -> list[str]:
    completer = ConsoleCompleter({"MODEL": lambda: models, "NODE": lambda: ["http://127.0.0.1:1"]})
    return [c.text for c in completer.get_completions(Document(text), None)]


def test_completion_of_commands_subcommands_and_whole_model_names() -> None:
    models = ["llama3.1:8b", "llama3.1:latest", "mxbai-embed-large:latest", "hf.co/org/phi:q4"]
    assert completions("force_", models) == ["force_gpu", "force_cpu"]
    assert completions("force_gpu llama3.1:", models) == ["llama3.1:8b", "llama3.1:latest"]
    completer = ConsoleCompleter({"MODEL": lambda: models})
    [only] = list(completer.get_completions(Document("force_gpu llama3.1:8"), None))
    assert (only.text, only.start_position) == ("llama3.1:8b", -len("llama3.1:8"))  # replaces the whole word
    assert completions("force_cpu MX", models) == ["mxbai-embed-large:latest"]
    assert completions("force_gpu ph", models) == ["hf.co/org/phi:q4"]
    assert completions("optimizer ", models) == ["on", "off", "status", "now", "interval"]
    assert completions("priority add ll", models) == ["llama3.1:8b", "llama3.1:latest"]
    assert completions("remove_node ", models) == ["http://127.0.0.1:1"]
    assert completions("vram_report ", models) == []
    assert completions("nosuch ", models) == []


def test_argument_kind() -> None:
    assert argument_kind(["for"]) == "command"
    assert argument_kind(["optimizer", "in"]) == "sub:optimizer"
    assert argument_kind(["optimizer", "interval", ""]) == "SECONDS"
    assert argument_kind(["add_node", "u", ""]) == "gpu|cpu"
