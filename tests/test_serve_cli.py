"""`flockparsecli.py [flags] serve` as a process: usage errors, the token rule for addresses that are not
loopback, the status log on stderr, and SIGTERM (requests in flight finish within the grace period, or are
cut with an error line), exit 0."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from helpers import LLAMA, wait_until

from ollama_sim import SimNode

ROOT = Path(__file__).resolve().parent.parent
SMALL = "llama3.2:3b"
STAMPED = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \S+ +\S")


class ServeProcess:
    """serve in a child process; its stderr lines collected by a thread (read with deadlines)."""

    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        command = [sys.executable, str(ROOT / "flockparsecli.py"), *args]
        self.proc = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))

    def line(self, needle: str, timeout: float = 20) -> str:
        return wait_until(
            lambda: next((line for line in self.lines if needle in line), None),
            f"a log line with {needle}",
            timeout,
        )

    @property
    def url(self) -> str:
        return re.search(r"listening on (http://\S+)", self.line("listening on")).group(1)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        self._reader.join(5)


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    values = {k: v for k, v in os.environ.items() if k not in ("OLLAMA_HOST", "FLOCKPARSE_TOKEN")}
    values["FLOCKPARSE_CONFIG_DIR"] = str(tmp_path)
    return values


@pytest.fixture
def start_serve(env: dict[str, str]) -> Iterator[Any]:
    started: list[ServeProcess] = []

    def start(node: SimNode, *flags: str, extra_env: dict[str, str] | None = None) -> ServeProcess:
        args = ["--nodes", node.url, "--health-interval", "0.2", "--no-optimizer", "serve"]
        process = ServeProcess([*args, "--listen", "127.0.0.1:0", *flags], {**env, **(extra_env or {})})
        started.append(process)
        return process

    yield start
    for process in started:
        process.stop()


def run(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, str(ROOT / "flockparsecli.py"), *args]
    return subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT, timeout=60)


# --------------------------------------------------------------------------------------------- refusals
def test_an_address_that_is_not_loopback_needs_a_token(sim_node, env: dict[str, str]) -> None:
    node = sim_node()
    done = run(["--nodes", node.url, "serve", "--listen", "0.0.0.0:11435"], env)
    assert done.returncode == 2 and done.stdout == ""
    assert (
        done.stderr.startswith("refusing to listen on 0.0.0.0 without a token")
        and done.stderr.count("\n") == 1
    )
    assert node.request_log == []  # refused before any node was contacted
    # with a token the rule is met: 192.0.2.1 (TEST-NET, never local) then fails to bind, exit 1
    done = run(["--nodes", node.url, "serve", "--listen", "192.0.2.1:0"], {**env, "FLOCKPARSE_TOKEN": "t"})
    assert done.returncode == 1 and "cannot listen on 192.0.2.1:0" in done.stderr


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--listen", "127.0.0.1:1", "nodes"], "--listen: only with `serve`"),
        (["--grace", "5", "priority", "list"], "--grace: only with `serve`"),
        (["--connect", "http://127.0.0.1:9", "serve"], "serve runs a cluster; --connect attaches"),
        (["serve", "now"], "serve takes no argument, got `now`"),
        (["serve", "--listen", "nonsense"], "--listen nonsense: expected HOST:PORT"),
        (["serve", "--grace", "-1"], "--grace must be between 0 and 3600 seconds"),
        (["serve", "--routing", "fastest"], "--routing: unknown routing `fastest`"),
        (["--demo", "serve"], "serve runs in front of real nodes"),
    ],
)
def test_serve_usage_errors_are_one_line_and_exit_2(
    env: dict[str, str], args: list[str], needle: str
) -> None:
    done = run(["--nodes", "http://127.0.0.1:9", *args], env) if "--demo" not in args else run(args, env)
    assert done.returncode == 2 and done.stderr.startswith(needle) and done.stderr.count("\n") == 1


# --------------------------------------------------------------------------------------------- running
def test_serve_logs_a_stamped_line_per_event_and_serves(sim_node, start_serve) -> None:
    node = sim_node(preload=[(SMALL, "gpu")])
    serve = start_serve(node)
    url = serve.url
    online = serve.line("is online")
    assert STAMPED.match(online) and online.endswith(
        f"node      {node.url.removeprefix('http://')} is online"
    )
    reply = requests.post(
        url + "/api/generate", json={"model": SMALL, "prompt": "hi", "stream": False}, timeout=10
    )
    assert reply.status_code == 200 and reply.json()["done"] is True
    serve.proc.send_signal(signal.SIGTERM)
    assert serve.proc.wait(15) == 0
    serve.stop()
    assert all(STAMPED.match(line) for line in serve.lines), serve.lines
    assert not any("\x1b" in line for line in serve.lines)  # plain text: no colour codes in a log
    assert serve.lines[-1].endswith("serve     stopped")


def stream_into(lines: list[dict], url: str, prompt: str) -> None:
    body = {"model": SMALL, "prompt": prompt}
    with requests.post(url + "/api/generate", json=body, stream=True, timeout=60) as reply:
        for line in reply.iter_lines():
            if line:
                lines.append(json.loads(line))


def test_sigterm_lets_a_request_in_flight_finish_and_refuses_new_ones(sim_node, start_serve) -> None:
    node = sim_node(inference_time_scale=40.0, preload=[(SMALL, "gpu")])
    serve = start_serve(node, "--grace", "20")
    url = serve.url
    serve.line("is online")
    received: list[dict] = []
    asker = threading.Thread(target=stream_into, args=(received, url, "why is the sky blue"))
    asker.start()
    wait_until(lambda: received, "the first chunk")
    serve.proc.send_signal(signal.SIGTERM)
    assert "1 request(s) in flight get up to 20s" in serve.line("stopping:")
    with pytest.raises(requests.ConnectionError):
        requests.get(url + "/api/version", timeout=5)  # the listener is closed
    asker.join(30)
    assert received[-1]["done"] is True and not any("error" in part for part in received)
    assert serve.proc.wait(15) == 0
    serve.stop()
    assert serve.lines[-1].endswith("serve     stopped")


def test_sigterm_cuts_a_stream_still_running_after_the_grace_period(sim_node, start_serve) -> None:
    node = sim_node(inference_time_scale=400.0, preload=[(SMALL, "gpu")])  # ~1.6 s per token
    serve = start_serve(node, "--grace", "0.5")
    url = serve.url
    serve.line("is online")
    received: list[dict] = []
    asker = threading.Thread(target=stream_into, args=(received, url, "why is the sky blue"))
    asker.start()
    wait_until(lambda: received, "the first chunk")
    serve.proc.send_signal(signal.SIGTERM)
    asker.join(30)
    assert received[-1] == {"error": "flockparse serve is shutting down: stream cut"}
    assert serve.proc.wait(15) == 0
    serve.stop()
    assert serve.lines[-1].endswith("serve     stopped; 1 request(s) cut at the end of the grace period")


def test_listen_addresses_and_the_loopback_rule() -> None:
    from flockparse.serve.runner import ServeError, check_listen, is_loopback, parse_listen

    assert parse_listen("127.0.0.1:11435") == ("127.0.0.1", 11435)
    assert parse_listen("[::1]:0") == ("::1", 0) and parse_listen(":8080") == ("127.0.0.1", 8080)
    for bad in ("11435", "host:99999", "a b:1", "host:port"):
        with pytest.raises(ServeError):
            parse_listen(bad)
    assert all(is_loopback(host) for host in ("127.0.0.1", "127.0.0.2", "::1", "localhost"))
    assert not any(is_loopback(host) for host in ("0.0.0.0", "::", "192.0.2.1"))
    with pytest.raises(ServeError, match="refusing to listen on 0.0.0.0 without a token"):
        check_listen("0.0.0.0", None)
    check_listen("0.0.0.0", "s3cret")
    check_listen("localhost", None)


def test_serve_answers_the_control_api_registers_itself_and_keeps_its_state(
    sim_node, start_serve, env: dict[str, str]
) -> None:
    node = sim_node(preload=[(SMALL, "gpu")])
    serve = start_serve(node)
    url = serve.url
    serve.line("is online")
    status = requests.get(url + "/flockparse/v1/status", timeout=5).json()
    assert status["service"] == "flockparse" and status["nodes"] == [node.url]
    config_dir = Path(env["FLOCKPARSE_CONFIG_DIR"])
    [registered] = (config_dir / "serves").glob("*.json")
    assert json.loads(registered.read_text())["url"] == url  # a local console sees who runs the optimizer
    attached = run(["--connect", url, "lb_stats", "--json"], env)  # a console through the control API
    assert attached.returncode == 0 and json.loads(attached.stdout)["routing"] == "adaptive"
    added = requests.post(url + "/flockparse/v1/priorities", json={"add": ["codellama"]}, timeout=10)
    assert added.status_code == 200
    serve.proc.send_signal(signal.SIGTERM)
    assert serve.proc.wait(15) == 0
    assert not registered.exists()
    state = json.loads((config_dir / "serve-127.0.0.1-0.state.json").read_text())
    assert "codellama" in state["priority_models"]


def test_serve_serves_metrics_and_records_a_move_in_its_history(
    sim_node, start_serve, env: dict[str, str]
) -> None:
    """run_serve starts the history recorder as a console does: a force_gpu through the control API is in
    the history file after SIGTERM, and in /flockparse/v1/history before; /metrics parses as Prometheus."""
    from prometheus_client.parser import text_string_to_metric_families

    from flockparse.history import FILE_NAME, History

    node = sim_node(preload=[("llama3.1", "cpu")])
    serve = start_serve(node)
    url = serve.url
    serve.line("is online")
    moved = requests.post(url + "/flockparse/v1/force_gpu", json={"model": "llama3.1"}, timeout=30)
    assert moved.status_code == 200
    assert [(r["node"], r["result"]["success"]) for r in moved.json()] == [(node.url, True)]

    scraped = requests.get(url + "/metrics", timeout=10)
    assert scraped.status_code == 200 and scraped.headers["Content-Type"].startswith("text/plain")
    families = {family.name: family for family in text_string_to_metric_families(scraped.text)}
    up = {sample.labels["node"]: sample.value for sample in families["flockparse_node_up"].samples}
    assert up == {node.url: 1.0}

    read = requests.get(url + "/flockparse/v1/history", params={"target": "llama3.1"}, timeout=10)
    assert read.status_code == 200
    [pair] = read.json()["models"]
    assert (pair["node"], pair["model"], pair["moves"], pair["now"]) == (node.url, LLAMA, 1, "gpu")

    serve.proc.send_signal(signal.SIGTERM)
    assert serve.proc.wait(15) == 0
    history = History(Path(env["FLOCKPARSE_CONFIG_DIR"]) / FILE_NAME)
    [kept] = history.summary(model="llama3.1").pairs
    assert kept.moves == 1 and kept.failed_moves == 0
