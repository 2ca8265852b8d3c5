"""Issue 9, config faults: saved settings kept (comments, mode, links), concurrent saves merged, every
number range-checked (nan, inf, 1e999), config mistakes as one line at start naming file and key."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from flockparse.console.config import ConfigError, load_config, normalize_url, ollama_host_url, update_nodes
from flockparsecli import main

REPO = Path(__file__).resolve().parent.parent
COMMENTED = """\
# my cluster, keep this comment
nodes = [
    "http://127.0.0.1:6001",  # the big box
]
interval = 120  # two minutes
"""


def run_main(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture
def config_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("FLOCKPARSE_CONFIG_DIR", str(tmp_path))
    monkeypatch.delenv("OLLAMA_HOST", raising=False)
    return tmp_path


# ------------------------------------------------------------------ fault 1: saved settings kept


def test_add_node_with_a_nodes_flag_changes_the_files_own_list_and_keeps_comments_and_mode(
    config_home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = config_home / "config.toml"
    path.write_text(COMMENTED)
    path.chmod(0o640)
    code, out, _ = run_main(["--nodes", "127.0.0.1:7000", "add_node", "127.0.0.1:6002"], capsys)
    assert code == 0 and "the --nodes list of this run is not saved" in " ".join(out.split())
    text = path.read_text()
    assert tomllib.loads(text)["nodes"] == ["http://127.0.0.1:6001", "http://127.0.0.1:6002"]
    assert "7000" not in text  # the one-off list is never written
    assert "# my cluster, keep this comment" in text and "# the big box" in text and "# two minutes" in text
    assert stat.S_IMODE(path.stat().st_mode) == 0o640


def test_a_node_list_from_ollama_host_is_never_written(
    config_home: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("OLLAMA_HOST", "127.0.0.1:7001")
    code, out, _ = run_main(["add_node", "127.0.0.1:6003"], capsys)
    assert code == 0 and "$OLLAMA_HOST list of this run is not saved" in " ".join(out.split())
    saved = tomllib.loads((config_home / "config.toml").read_text())
    assert saved["nodes"] == ["http://127.0.0.1:6003"]


def test_first_add_node_writes_a_commented_file_that_keeps_the_default_node(
    config_home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_main(["add_node", "127.0.0.1:6004", "cpu"], capsys)[0] == 0
    path = config_home / "config.toml"
    text = path.read_text()
    assert "# interval = 300" in text and "# keep_alive" in text  # what can be set, commented out
    saved = tomllib.loads(text)
    assert saved == {
        "nodes": ["http://localhost:11434", "http://127.0.0.1:6004"],
        "gpu": {"http://127.0.0.1:6004": False},
    }
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_a_symlinked_config_is_written_through_its_link(
    config_home: Path, tmp_path_factory: pytest.TempPathFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    real = tmp_path_factory.mktemp("dotfiles") / "flockparse.toml"
    real.write_text(COMMENTED)
    link = config_home / "config.toml"
    link.symlink_to(real)
    assert run_main(["add_node", "127.0.0.1:6005"], capsys)[0] == 0
    assert link.is_symlink()
    assert tomllib.loads(real.read_text())["nodes"][-1] == "http://127.0.0.1:6005"


# ------------------------------------------------------------------ fault 12: concurrency and failure


def test_twelve_concurrent_one_shot_add_nodes_all_land(config_home: Path) -> None:
    env = {**os.environ, "FLOCKPARSE_CONFIG_DIR": str(config_home)}
    env.pop("OLLAMA_HOST", None)
    urls = [f"http://127.0.0.1:{6100 + i}" for i in range(12)]
    procs = [
        subprocess.Popen(
            [sys.executable, "flockparsecli.py", "add_node", url],
            cwd=REPO,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )  # fmt: skip
        for url in urls
    ]
    results = [proc.communicate(timeout=60) for proc in procs]
    assert [proc.returncode for proc in procs] == [0] * 12, results
    saved = tomllib.loads((config_home / "config.toml").read_text())["nodes"]
    assert sorted(saved) == sorted(["http://localhost:11434", *urls])


def test_two_sessions_never_delete_each_others_nodes(config_home: Path) -> None:
    path = config_home / "config.toml"
    path.write_text('nodes = ["http://127.0.0.1:6200"]\n')
    update_nodes(path, add="http://127.0.0.1:6201")  # console A
    update_nodes(path, add="http://127.0.0.1:6202")  # console B, which never saw A's node
    update_nodes(path, remove="http://127.0.0.1:6201")  # console A removes its own
    assert tomllib.loads(path.read_text())["nodes"] == ["http://127.0.0.1:6200", "http://127.0.0.1:6202"]


def test_a_failed_save_exits_non_zero(config_home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (config_home / ".config.toml.lock").mkdir()  # the lock cannot be opened: the save fails
    code, out, err = run_main(["add_node", "127.0.0.1:6300"], capsys)
    assert code == 1 and "saved" not in out
    assert "could not save to" in err and err.count("\n") == 1


# ------------------------------------------------------------------ faults 2 and 14: numbers


@pytest.mark.parametrize(
    ("flag", "value"),
    [
        ("--interval", "1e10"),
        ("--interval", "1e999"),
        ("--interval", "nan"),
        ("--interval", "inf"),
        ("--interval", "0.5"),
        ("--interval", "-3"),
        ("--health-interval", "nan"),
        ("--health-interval", "0"),
        ("--timeout", "inf"),
        ("--timeout", "soon"),
    ],
)
def test_every_number_flag_is_range_checked_with_one_line(
    config_home: Path, capsys: pytest.CaptureFixture[str], flag: str, value: str
) -> None:
    code, out, err = run_main([flag, value, "priority", "list"], capsys)
    assert code == 2 and out == ""
    assert err.startswith(flag) and err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.parametrize(
    "line",
    ["interval = nan", "interval = inf", "interval = 1e10", "health_interval = -inf", "timeout = 0.0"],
)
def test_every_number_in_the_file_is_range_checked_naming_file_and_key(config_home: Path, line: str) -> None:
    path = config_home / "config.toml"
    path.write_text(line + "\n")
    with pytest.raises(ConfigError) as info:
        load_config(env={"FLOCKPARSE_CONFIG_DIR": str(config_home)})
    message = str(info.value)
    assert message.startswith(str(path)) and line.split()[0] in message and "\n" not in message


# ------------------------------------------------------------------ fault 4: mistakes at start


def test_a_missing_config_file_is_an_error_naming_it(
    config_home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = config_home / "nope.toml"
    code, _, err = run_main(["--config", str(missing), "priority", "list"], capsys)
    assert code == 2 and f"--config {missing} does not exist" in err


@pytest.mark.parametrize("value", ['"forever"', '"30 minutes"', "true", "nan"])
def test_a_keep_alive_ollama_would_refuse_is_an_error_at_start(
    config_home: Path, capsys: pytest.CaptureFixture[str], value: str
) -> None:
    path = config_home / "config.toml"
    path.write_text(f"keep_alive = {value}\n")
    code, _, err = run_main(["priority", "list"], capsys)
    assert code == 2 and str(path) in err and "keep_alive" in err and err.count("\n") == 1


@pytest.mark.parametrize("value", ["30m", "1h30m", "-1", "300", "0", "2.5h"])
def test_keep_alive_values_ollama_accepts(config_home: Path, value: str) -> None:
    (config_home / "config.toml").write_text(f'keep_alive = "{value}"\n')
    assert load_config(env={"FLOCKPARSE_CONFIG_DIR": str(config_home)}).keep_alive == value


def test_ollama_host_rules(config_home: Path) -> None:
    env = {"FLOCKPARSE_CONFIG_DIR": str(config_home), "OLLAMA_HOST": ":11500"}
    assert load_config(env=env).nodes == ["http://127.0.0.1:11500"]  # as the official client reads it
    assert ollama_host_url("https://gpu1") == "https://gpu1"
    env["OLLAMA_HOST"] = "http://[::1"  # malformed: an error only when it is used
    assert load_config(nodes_flag="127.0.0.1:1", env=env).nodes == ["http://127.0.0.1:1"]
    with pytest.raises(ConfigError, match=r"^\$OLLAMA_HOST: .*\(or pass --nodes\)$"):
        load_config(env=env)
    (config_home / "config.toml").write_text('nodes = ["http://127.0.0.1:2"]\n')
    assert load_config(env=env).nodes == ["http://127.0.0.1:2"]  # the file's list wins: env unused


@pytest.mark.parametrize("url", ["http://user:secret@127.0.0.1:1", "bob@127.0.0.1:1", "https://tok@h"])
def test_credentials_in_a_node_url_are_refused_clearly(url: str) -> None:
    with pytest.raises(ConfigError, match="credentials"):
        normalize_url(url)


def test_credentials_in_ollama_host_are_refused(config_home: Path) -> None:
    env = {"FLOCKPARSE_CONFIG_DIR": str(config_home), "OLLAMA_HOST": "http://u:p@127.0.0.1:1"}
    with pytest.raises(ConfigError, match=r"^\$OLLAMA_HOST: node URL with credentials"):
        load_config(env=env)


# ------------------------------------------------------------------ fault 15: invalid UTF-8


def test_a_config_that_is_not_utf8_is_one_line_and_exit_2(
    config_home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (config_home / "config.toml").write_bytes(b"interval = 60\n# caf\xe9\n")
    code, out, err = run_main(["--json", "priority", "list"], capsys)
    assert code == 2 and "not valid UTF-8" in err and err.count("\n") == 1
    assert json.loads(out) == {"error": json.loads(out)["error"], "exit_code": 2}
    assert "not valid UTF-8" in json.loads(out)["error"]


def test_two_spellings_of_one_node_in_the_gpu_table(config_home: Path) -> None:
    (config_home / "config.toml").write_text('[gpu]\n"h1" = true\n"http://h1:11434" = false\n')
    assert load_config(env={"FLOCKPARSE_CONFIG_DIR": str(config_home)}).gpu == {"http://h1:11434": False}


def test_load_timeout_from_flag_and_file_reaches_the_controller(tmp_path) -> None:
    from flockparse.console.config import ConfigError, load_config
    from flockparsecli import make_balancer

    path = tmp_path / "config.toml"
    path.write_text('nodes = ["http://127.0.0.1:9"]\nload_timeout = 600\n')
    assert load_config(str(path), env={}).load_timeout == 600
    config = load_config(str(path), env={}, load_timeout_flag="42")
    balancer = make_balancer(config, optimize=False)
    try:
        assert balancer.controller.load_timeout == 42
    finally:
        balancer.close()
    with pytest.raises(ConfigError, match="load"):
        load_config(str(path), env={}, load_timeout_flag="1e9")


def test_routing_from_file_and_flag_reaches_the_balancer(tmp_path: Path) -> None:
    from flockparsecli import make_balancer

    path = tmp_path / "config.toml"
    path.write_text('nodes = ["http://127.0.0.1:9"]\nrouting = "least_loaded"\n')
    assert load_config(str(path), env={}).routing == "least_loaded"
    config = load_config(str(path), env={}, routing_flag="round-robin")
    balancer = make_balancer(config, optimize=False)
    try:
        assert balancer.routing == "round_robin"
    finally:
        balancer.close()
    path.write_text('routing = "fastest"\n')
    with pytest.raises(ConfigError) as info:
        load_config(str(path), env={})
    assert str(info.value) == f"{path}: routing: unknown routing `fastest` (one of: " + (
        "adaptive, round_robin, least_loaded, lowest_latency)"
    )


def test_a_bad_routing_flag_is_one_line_and_exit_2(
    config_home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run_main(["--routing", "fastest", "priority", "list"], capsys)
    assert code == 2 and out == "" and err.startswith("--routing: unknown routing `fastest`")
    assert err.count("\n") == 1


# ------------------------------------------------------------------ GPU exporters (issue 13)


def test_gpu_metrics_table_and_flags_name_each_nodes_exporter(config_home: Path) -> None:
    (config_home / "config.toml").write_text(
        'nodes = ["gpu1", "gpu2"]\n[gpu_metrics]\n"gpu1" = "gpu1:9400"\n"http://gpu2:11434" = "http://gpu2:9835/m"\n'
    )
    config = load_config()
    assert config.gpu_metrics == {
        "http://gpu1:11434": "http://gpu1:9400/metrics",  # `host:port` means its /metrics
        "http://gpu2:11434": "http://gpu2:9835/m",
    }
    flagged = load_config(gpu_metrics_flag=["gpu2=http://gpu2:5050/metrics"])  # a flag wins for its node
    assert flagged.gpu_metrics["http://gpu2:11434"] == "http://gpu2:5050/metrics"
    assert flagged.gpu_metrics["http://gpu1:11434"] == "http://gpu1:9400/metrics"


@pytest.mark.parametrize(
    ("table", "words"),
    [
        ('gpu_metrics = "http://x:9400"', "[gpu_metrics] must map node URLs to exporter URLs"),
        ('[gpu_metrics]\n"gpu1" = 9400', "[gpu_metrics] must map node URLs to exporter URLs"),
        ('[gpu_metrics]\n"gpu1" = "ftp://gpu1/metrics"', "[gpu_metrics] gpu1: not a usable GPU exporter"),
        ('[gpu_metrics]\n"gpu1" = "http://u:p@gpu1:9400"', "with credentials is not supported"),
        ('[gpu_metrics]\n"http://a b" = "gpu1:9400"', "[gpu_metrics]"),
    ],
)
def test_a_bad_gpu_metrics_entry_is_one_line_naming_the_file(
    config_home: Path, table: str, words: str
) -> None:
    (config_home / "config.toml").write_text(table + "\n")
    with pytest.raises(ConfigError) as caught:
        load_config()
    assert words in str(caught.value) and "config.toml" in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.parametrize(
    ("flag", "words"),
    [
        ("gpu1", "expected NODE_URL=EXPORTER_URL"),
        ("=http://gpu1:9400", "expected NODE_URL=EXPORTER_URL"),
        ("gpu1=", "expected NODE_URL=EXPORTER_URL"),
        ("gpu1=gopher://gpu1:9400", "--gpu-metrics gpu1: not a usable GPU exporter address"),
    ],
)
def test_a_bad_gpu_metrics_flag_is_a_usage_error(
    config_home: Path, capsys: pytest.CaptureFixture[str], flag: str, words: str
) -> None:
    code, _, err = run_main(["--nodes", "gpu1", "--gpu-metrics", flag, "help"], capsys)
    assert code == 2 and words in err


def test_demo_refuses_gpu_metrics_flags(config_home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_main(["--demo", "--gpu-metrics", "gpu1=gpu1:9400", "help"], capsys)
    assert code == 2 and "drop --gpu-metrics" in err
