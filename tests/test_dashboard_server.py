"""The dashboard's server side without a browser: the page's headers and routes on serve, the history's
`buckets`, and the console's `--dashboard` (its own server over the console's balancer, the flag's errors,
the attached console's line)."""

from __future__ import annotations

import io
import re
import socket
import threading
from pathlib import Path
from typing import Any

import pytest
import requests
from helpers import LLAMA, wait_until
from prompt_toolkit.application import create_app_session
from prompt_toolkit.input import create_pipe_input
from prompt_toolkit.output import DummyOutput
from rich.console import Console

import flockparsecli
from flockparse.console.config import Config
from flockparse.dashboard import DASHBOARD_PATH
from flockparse.dashboard.routes import load_assets
from flockparse.remote import RemoteCluster
from flockparsecli import interactive, make_balancer

TOKEN = "dash-s3cret"


def test_the_page_is_served_with_its_security_headers(sim_node, serve_over) -> None:
    server = serve_over([sim_node(vram_gb=0)], token=TOKEN)
    page = requests.get(server.url + DASHBOARD_PATH, timeout=10)  # no token: the page holds no data
    assert page.status_code == 200 and page.headers["Content-Type"].startswith("text/html")
    policy = page.headers["Content-Security-Policy"]
    assert "script-src 'self'" in policy and "unsafe-inline" not in policy and "default-src 'none'" in policy
    assert page.headers["X-Content-Type-Options"] == "nosniff"
    assert '<script type="module" src="main.js"></script>' in page.text and "<script>" not in page.text
    module = requests.get(server.url + DASHBOARD_PATH + "main.js", timeout=10)
    assert module.headers["Content-Type"].startswith("text/javascript") and "innerHTML" not in module.text
    assert requests.get(server.url + DASHBOARD_PATH + "nope.js", timeout=10).status_code == 404
    assert requests.get(server.url + DASHBOARD_PATH + "..%2f__init__.py", timeout=10).status_code == 404
    bare = requests.get(server.url + DASHBOARD_PATH.rstrip("/"), allow_redirects=False, timeout=10)
    assert bare.status_code == 302 and bare.headers["Location"] == DASHBOARD_PATH
    ollama = requests.get(server.url + "/", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10)
    assert ollama.text == "Ollama is running"  # `/` stays Ollama's
    assert requests.get(server.url + "/flockparse/v1/status", timeout=10).status_code == 200  # loopback reads


def test_history_buckets_are_asked_for_and_checked(sim_node, serve_over) -> None:
    server = serve_over([sim_node(vram_gb=24, preload=[("llama3.1", "gpu")])])
    history = server.url + "/flockparse/v1/history"
    wait_until(lambda: requests.get(history, timeout=10).json()["models"], "llama3.1 recorded")
    [pair] = requests.get(history, params={"buckets": "96"}, timeout=10).json()["models"]
    assert len(pair["timeline"]) == 96 and pair["timeline"][-1] == "gpu"
    assert len(requests.get(history, timeout=10).json()["models"][0]["timeline"]) == 24  # the default
    for bad in ("0", "481", "x", "-3"):
        reply = requests.get(history, params={"buckets": bad}, timeout=10)
        assert reply.status_code == 400 and "buckets must be" in reply.json()["error"]


# ------------------------------------------------------------------------------------------ the console
class ConsoleThread:
    """The interactive console (`flockparsecli.interactive`) on a thread, fed through prompt_toolkit's pipe
    input, its output in a buffer: the test talks to its dashboard while it runs."""

    def __init__(self, config: Config, **options: Any) -> None:
        self.buffer = io.StringIO()
        self.balancer = make_balancer(config, optimize=False)
        self.config, self.options = config, options
        self.code: int | None = None
        self._pipe: Any = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="console-under-test", daemon=True)

    def _run(self) -> None:
        console = Console(file=self.buffer, width=200, color_system=None, force_terminal=False)
        with create_pipe_input() as pipe, create_app_session(input=pipe, output=DummyOutput()):
            self._pipe = pipe
            self._ready.set()
            self.code = interactive(
                self.balancer, self.config, console=console, pt_input=pipe, pt_output=DummyOutput(),
                **self.options,
            )  # fmt: skip

    def start(self) -> ConsoleThread:
        self._thread.start()
        assert self._ready.wait(10)
        return self

    def type(self, keys: str) -> None:
        self._pipe.send_text(keys)

    def exit(self) -> int | None:
        self.type("exit\r")
        self._thread.join(20)
        self.balancer.close()
        return self.code

    def said(self, text: str) -> str | None:
        shown = self.buffer.getvalue()
        return shown if text in shown else None


@pytest.fixture
def console_config(sim_node, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Any, Config]:
    monkeypatch.setenv("FLOCKPARSE_CONFIG_DIR", str(tmp_path))
    node = sim_node(vram_gb=24, preload=[("llama3.1", "gpu")])
    return node, Config(nodes=[node.url], path=tmp_path / "config.toml", timeout=2.0, priority_models=[])


def test_the_console_serves_the_dashboard_over_its_own_balancer(console_config, tmp_path: Path) -> None:
    node, config = console_config
    running = ConsoleThread(
        config, files_dir=tmp_path, dashboard_address=("127.0.0.1", 0), dashboard_token=TOKEN
    )
    running.start()
    try:
        shown = wait_until(lambda: running.said("dashboard at "), "the dashboard's address")
        page = re.search(r"dashboard at (http://127\.0\.0\.1:\d+/flockparse/dashboard/); the token", shown)
        assert page, shown
        url = page.group(1)
        answer = requests.get(url, timeout=10)
        assert answer.status_code == 200 and answer.headers["X-Content-Type-Options"] == "nosniff"
        api = url.replace("/dashboard/", "/v1/")
        assert requests.get(api + "status", timeout=10).json()["nodes"] == [node.url]  # loopback: reads open
        assert requests.post(api + "force_cpu", json={"model": "llama3.1"}, timeout=30).status_code == 401
        moved = requests.post(
            api + "force_cpu",
            json={"model": "llama3.1"},
            headers={"Authorization": f"Bearer {TOKEN}"},
            timeout=30,
        )
        assert moved.status_code == 200 and moved.json()[0]["result"]["success"] is True
        assert [m["size_vram"] for m in node.loaded()] == [0]  # the console's balancer moved it
        history = requests.get(api + "history", timeout=10)  # the console's recorder, read by its dashboard
        assert history.status_code == 200 and history.json()["models"][0]["model"] == LLAMA
    finally:
        code = running.exit()
    assert code == 0
    with pytest.raises(requests.ConnectionError):  # closed with the console
        requests.get(url, timeout=5)


def test_a_port_in_use_is_one_line_and_the_console_carries_on(console_config, tmp_path: Path) -> None:
    _, config = console_config
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        running = ConsoleThread(config, files_dir=tmp_path, dashboard_address=("127.0.0.1", port)).start()
        try:
            wait_until(lambda: running.said("--dashboard: cannot listen"), "the dashboard's error line")
            running.type("nodes\r")
            wait_until(lambda: running.said("online"), "the console still answering")
        finally:
            code = running.exit()
    assert code == 0
    [line] = [line for line in running.buffer.getvalue().splitlines() if "--dashboard" in line]
    assert line == f"--dashboard: cannot listen on 127.0.0.1:{port} (Address already in use); no dashboard"


@pytest.mark.parametrize(
    ("flags", "error"),
    [
        (["--dashboard", "8080", "nodes"], "--dashboard goes with the interactive console"),
        (["--dashboard", "nope:x"], "--dashboard nope:x: `x` is not a port number"),
        (["--dashboard", "70000"], "--dashboard 70000: port must be 1 to 65535"),
        (["--dashboard", "0.0.0.0:8080"], "--dashboard: refusing to listen on 0.0.0.0 without a token"),
    ],
)
def test_dashboard_flag_usage_errors(
    flags: list[str], error: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("FLOCKPARSE_TOKEN", raising=False)
    monkeypatch.setattr("sys.stdin", Terminal())  # the checks are the interactive console's, before it starts
    assert flockparsecli.main(["--nodes", "http://127.0.0.1:9", *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(error) and "\n" not in err, err


class Terminal(io.StringIO):
    """A stdin that says it is a terminal: the console would be interactive."""

    def isatty(self) -> bool:
        return True


def test_an_attached_console_points_at_the_serves_dashboard(sim_node, serve_over) -> None:
    server = serve_over([sim_node(vram_gb=0)])
    remote = RemoteCluster(server.url)
    remote.connect()
    try:
        banner = flockparsecli.attached_banner(remote, dashboard=True)
    finally:
        remote.close()
    page = server.url + DASHBOARD_PATH
    assert (
        banner.splitlines()[1]
        == f"--dashboard: the serve already serves the dashboard at {page} (no second one here)"
    )
    assert "--dashboard" not in flockparsecli.attached_banner(remote)


def test_every_file_the_page_loads_is_shipped_with_the_package() -> None:
    """The page's references (index.html's script and stylesheet, each module's imports) are all package
    data of flockparse.dashboard (pyproject's package-data), served with the right content type."""
    assets = load_assets()
    html = assets["index.html"][0].decode()
    wanted = set(re.findall(r'(?:src|href)="([\w.-]+\.(?:js|css))"', html))
    for name, (body, content_type) in assets.items():
        if name.endswith(".js"):
            assert content_type == "text/javascript"
            wanted |= set(re.findall(r'from "\./([\w.-]+\.js)"', body.decode()))
    assert wanted == {"main.js", "style.css", "api.js", "chart.js", "dom.js"}
    assert wanted | {"index.html"} == set(assets)
