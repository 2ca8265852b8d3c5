"""The console's side of issue 11: `history`, `alerts test|status`, `--since`, `--metrics`, the config keys,
and the recorder started by the interactive loop (driven through prompt_toolkit's pipe input)."""

from __future__ import annotations

import io
import json
import socket
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import EMBED, wait_until
from prompt_toolkit.application import create_app_session
from prompt_toolkit.input import create_pipe_input
from prompt_toolkit.output import DummyOutput
from receivers import Receiver
from rich.console import Console

from flockparse.alerts import AlertSettings
from flockparse.console import render
from flockparse.console.config import Config, ConfigError, apply_table, parse_duration
from flockparsecli import interactive, main, make_balancer


def text_console(buffer: io.StringIO, width: int = 160) -> Console:
    return Console(file=buffer, width=width, color_system=None, force_terminal=False, highlight=False)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    target = Receiver()
    yield target
    target.close()


@pytest.fixture
def cluster_config(sim_node, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A GPU node with mxbai-embed-large fallen to CPU; the config dir is the test's own."""
    monkeypatch.setenv("FLOCKPARSE_CONFIG_DIR", str(tmp_path))
    node = sim_node(vram_gb=24, preload=[("mxbai-embed-large", "cpu")])
    config = Config(
        nodes=[node.url], path=tmp_path / "config.toml", timeout=2.0, priority_models=["mxbai-embed-large"]
    )
    return node, config


def run_console(config: Config, keys: str, tmp_path: Path, **options) -> tuple[int, str]:
    balancer = make_balancer(config, optimize=False)
    buffer = io.StringIO()
    try:
        with create_pipe_input() as pipe, create_app_session(input=pipe, output=DummyOutput()):
            pipe.send_text(keys)
            code = interactive(
                balancer, config, console=text_console(buffer), pt_input=pipe, pt_output=DummyOutput(),
                files_dir=tmp_path, **options,
            )  # fmt: skip
    finally:
        balancer.close()
    return code, buffer.getvalue()


def one_shot(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_the_console_records_history_and_shows_it(cluster_config, tmp_path, capsys, receiver) -> None:
    """force_gpu in the console, then `history` there and in one-shot mode: one model, one move, GPU now."""
    node, config = cluster_config
    config.alerts = AlertSettings(webhook_url=receiver.url, cooldown_s=600)
    # the prompt comes up before the first health check: vram_report first reads the node (and so knows
    # the model force_gpu names), vram_report after it is seen by the check
    keys = "vram_report\rforce_gpu mxbai-embed-large\rvram_report\r"
    keys += "history\rhistory mxbai-embed-large --since 1h\ralerts status\rexit\r"
    code, shown = run_console(config, keys, tmp_path)
    assert code == 0
    assert (tmp_path / "history.sqlite").is_file()
    assert "placement history, last 24h" in shown and "placement history, last 1h" in shown
    assert shown.count(f"{node.url.split('://')[1]}") >= 2
    assert EMBED in shown and "falls" in shown and "█" in shown
    assert "alerts: cool-down 10m 00s" in shown and "webhook (json) http://127.0.0.1:" in shown

    code, out, _ = one_shot(
        ["--nodes", node.url, "history", "mxbai-embed-large", "--since", "1h", "--json"], capsys
    )
    assert code == 0
    data = json.loads(out)
    [pair] = data["models"]
    assert (pair["node"], pair["model"], pair["moves"]) == (node.url, EMBED, 1)
    assert pair["now"] == "unknown"  # the console has left: nobody records now
    assert pair["shares"]["gpu"] > 0 and pair["shares"]["cpu"] > 0
    assert pair["fallbacks"] == 0  # it was on CPU from the start: no fall seen
    assert len(pair["timeline"]) == 24
    # the priority model was found on CPU (firing), then moved (resolved), both sent before the exit
    assert [(b["state"], b["model"]) for b in receiver.bodies] == [("firing", EMBED), ("resolved", EMBED)]
    assert receiver.bodies[0]["message"].endswith("is on CPU on " + node.url + ", not on GPU")


def test_history_usage_errors(cluster_config, capsys) -> None:
    node, _ = cluster_config
    code, out, err = one_shot(["--nodes", node.url, "history", "--since", "yesterday", "--json"], capsys)
    assert code == 2 and "`yesterday` is not a duration" in json.loads(out)["error"]
    code, _, err = one_shot(["--nodes", node.url, "history", "--since", "5s"], capsys)
    assert code == 2 and "between 1m and 3650d" in err
    code, _, err = one_shot(["--nodes", node.url, "--since", "1h"], capsys)
    assert code == 2 and "go with a command" in err
    code, _, err = one_shot(["--nodes", node.url, "history", "llama3.1"], capsys)
    assert code == 2 and "no history of llama3.1" in err


def test_history_off_is_one_line(cluster_config, capsys, tmp_path) -> None:
    node, _ = cluster_config
    (tmp_path / "config.toml").write_text("history_days = 0\n")
    code, _, err = one_shot(["--nodes", node.url, "history"], capsys)
    assert code == 1 and "placement history is not recorded" in err


def test_alerts_test_one_shot_reports_each_channel(cluster_config, capsys, tmp_path, receiver) -> None:
    node, _ = cluster_config
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    dead_port = closed.getsockname()[1]
    closed.close()
    (tmp_path / "config.toml").write_text(
        f'[alerts]\nwebhook_url = "{receiver.url}"\nwebhook_format = "slack"\n'
        f'[alerts.email]\nhost = "127.0.0.1"\nport = {dead_port}\ntls = "none"\n'
        'from = "a@example.com"\nto = ["b@example.com"]\n'
    )
    code, out, err = one_shot(["--nodes", node.url, "alerts", "test"], capsys)
    assert code == 1  # one channel failed
    lines = out.strip().splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("webhook (slack) http://127.0.0.1:") and lines[0].endswith(": ok")
    assert "SECRET" not in out
    assert f"127.0.0.1:{dead_port}: connection refused" in lines[1] and "error" in lines[1]
    assert "test message from flockparse" in receiver.bodies[0]["text"]
    code, out, _ = one_shot(["--nodes", node.url, "alerts", "status"], capsys)
    assert code == 0 and "not sending in this mode" in out and f"127.0.0.1:{dead_port} (none)" in out
    assert len(receiver.bodies) == 1  # status sends nothing


def test_alerts_without_a_channel_is_a_usage_error(cluster_config, capsys) -> None:
    node, _ = cluster_config
    code, _, err = one_shot(["--nodes", node.url, "alerts", "test"], capsys)
    assert code == 2 and "no alert channel configured" in err


def test_metrics_flag(cluster_config, tmp_path, capsys) -> None:
    node, config = cluster_config
    code, shown = run_console(config, "exit\r", tmp_path, metrics_address=("127.0.0.1", 0))
    assert code == 0 and "Prometheus metrics at http://127.0.0.1:" in shown
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, shown = run_console(config, "exit\r", tmp_path, metrics_address=("127.0.0.1", port))
    assert code == 1 and f"--metrics: cannot listen on 127.0.0.1:{port}" in shown
    assert one_shot(["--nodes", node.url, "--metrics", "nope:x"], capsys)[0] == 2
    code, _, err = one_shot(["--nodes", node.url, "--metrics", "9101", "nodes"], capsys)
    assert code == 2 and "interactive console" in err


def test_alerts_from_the_console_on_a_fall(sim_node, tmp_path, monkeypatch, receiver) -> None:
    """A priority model on GPU falls to CPU (Ollama restarted without its GPU, a client reloads it):
    the receiver gets one firing message naming the model and node."""
    monkeypatch.setenv("FLOCKPARSE_CONFIG_DIR", str(tmp_path))
    node = sim_node(vram_gb=24, preload=[("llama3.1", "gpu")])
    config = Config(
        nodes=[node.url], path=tmp_path / "config.toml", health_interval=0.1, priority_models=["llama3.1"]
    )
    config.alerts = AlertSettings(webhook_url=receiver.url, cooldown_s=600)
    balancer = make_balancer(config, optimize=False)
    from flockparse.console.services import start_services

    services = start_services(balancer, config, tmp_path, None)
    try:
        balancer.start()
        wait_until(lambda: balancer.node_states()[0].models, "llama3.1 seen")
        node.restart(gpu_found=False)
        wait_until(lambda: not balancer.node_states()[0].models, "the restart seen")
        balancer.generate("llama3.1", "hi")
        wait_until(lambda: receiver.bodies, "the alert")
        assert services.alerter.flush()
    finally:
        services.close()
        balancer.close()
    [body] = receiver.bodies
    assert (body["kind"], body["state"], body["node"], body["model"]) == (
        "model_off_gpu", "firing", node.url, "llama3.1:latest"
    )  # fmt: skip
    assert "fell off the GPU" in body["message"] and "on CPU" in body["message"]


# ------------------------------------------------------------------ config keys


def table(text: str) -> Config:
    config = Config()
    apply_table(config, tomllib.loads(text), "config.toml")
    return config


def test_alert_and_history_keys_are_read_and_checked() -> None:
    config = table(
        'history_days = 7\n[alerts]\nwebhook_url = "https://hooks.example.com/x"\n'
        'webhook_format = "discord"\n'
        'cooldown = "1h30m"\n[alerts.email]\nhost = "smtp.example.com"\ntls = "tls"\nuser = "me"\n'
        'password_file = "~/.smtp"\nfrom = "me@example.com"\nto = "ops@example.com"\n'
    )
    assert config.history_days == 7
    assert config.alerts.webhook_format == "discord" and config.alerts.cooldown_s == 5400
    assert config.alerts.email.effective_port == 465 and config.alerts.email.to == ("ops@example.com",)
    assert config.alerts.configured
    assert not Config().alerts.configured and Config().history_days == 30


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[alerts]\nwebhok_url = 'x'\n", "did you mean `webhook_url`"),
        ("[alerts]\nwebhook_url = 'ftp://x'\n", "http:// or https://"),
        ("[alerts]\nwebhook_format = 'teams'\n", "json, slack, discord"),
        ("[alerts]\ncooldown = '10 minutes'\n", "is not a duration"),
        (
            "[alerts.email]\nhost = 'h'\nfrom = 'a@b'\nto = ['c@d']\npassword = 'x'\n",
            "never kept in the config",
        ),
        ("[alerts.email]\nhost = 'h'\nfrom = 'a@b'\nto = ['c@d']\nuser = 'u'\n", "give password_env"),
        ("[alerts.email]\nhost = 'h'\nfrom = 'a@b'\nto = []\n", "to must be"),
        ("[alerts.email]\nhost = 'h'\nfrom = 'a@b'\nto = ['c@d']\ntls = 'ssl'\n", "starttls, tls, none"),
        ("history_days = -1\n", "between 0 and 3650"),
    ],
)
def test_bad_alert_and_history_keys_are_one_line_errors(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        table(text)


def test_durations() -> None:
    assert parse_duration("90s", "x") == 90
    assert parse_duration("2w", "x") == 14 * 86400
    assert parse_duration(30, "x") == 30
    with pytest.raises(ConfigError):
        parse_duration("1h 30m", "x")


# ------------------------------------------------------------------ rendering


def test_history_report_stacks_on_a_narrow_terminal() -> None:
    data = {
        "since": 0.0, "until": 86400.0, "recorded_s": 43200.0, "buckets": 4,
        "models": [{"node": "http://gpu-box-with-a-long-name.example:11434", "model": "llama3.1:latest",
                    "shares": {"gpu": 0.75, "cpu": 0.25}, "fallbacks": 1, "moves": 2, "failed_moves": 1,
                    "timeline": ["gpu", "cpu", "gpu", "unknown"]}],
        "nodes": [],
    }  # fmt: skip
    wide, narrow = io.StringIO(), io.StringIO()
    text_console(wide, 160).print(render.history_report(data))
    text_console(narrow, 50).print(render.history_report(data))
    assert "last 24h" in wide.getvalue() and "one mark per 6h" in wide.getvalue()
    assert "recorded for 12h of it" in wide.getvalue()
    assert "█▁█ " in wide.getvalue()
    assert "llama3.1:latest on gpu-box-with-a-long-name.example:11434" in narrow.getvalue().replace("\n", "")
    assert "GPU 75%, CPU 25%" in narrow.getvalue()
    assert "+1 failed" in narrow.getvalue()
