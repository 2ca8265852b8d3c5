"""End to end in a real terminal: the console in a pty (pexpect), its output rendered by pyte into the
screen a user would see, against a simulated Ollama node started by the test.

The key check: an optimizer line printed from a background thread while a command is half typed lands
above the prompt, and the prompt line still reads `⚡ Enter command: force_g` afterwards.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pexpect
import pyte
import pytest

REPO = Path(__file__).resolve().parent.parent
COLUMNS, LINES = 120, 40
PROMPT = "⚡ Enter command: "


class Terminal:
    """A pty running the console, mirrored into a pyte screen; every wait has a deadline."""

    def __init__(self, args: list[str], env: dict[str, str], columns: int = COLUMNS) -> None:
        self.child = pexpect.spawn(
            sys.executable, ["flockparsecli.py", *args], cwd=str(REPO), env=env, dimensions=(LINES, columns)
        )
        self.screen = pyte.Screen(columns, LINES)
        self.screen.write_process_input = self._answer  # cursor position reports go back to the app
        self.stream = pyte.ByteStream(self.screen)

    def _answer(self, data: str) -> None:
        if not self.child.closed:  # output replayed after the console ended needs no answer
            self.child.send(data.encode())

    def lines(self) -> list[str]:
        return [line.rstrip() for line in self.screen.display]

    def text(self) -> str:
        return "\n".join(self.lines())

    def cursor_line(self) -> str:
        return self.lines()[self.screen.cursor.y]

    def pump(self) -> None:
        try:
            self.stream.feed(self.child.read_nonblocking(65536, timeout=0.05))
        except pexpect.TIMEOUT:
            return

    def wait_for(self, predicate: Callable[[], bool], what: str, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                pytest.fail(f"timed out waiting for {what}; screen:\n{self.text()}")
            self.pump()

    def type(self, keys: str) -> None:
        self.child.send(keys.encode())

    def wait_for_exit(self, timeout: float = 15.0) -> int | None:
        """Wait (bounded) for the console to end; its exit status."""
        self.child.expect(pexpect.EOF, timeout=timeout)
        self.child.close()
        return self.child.exitstatus

    def __enter__(self) -> Terminal:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.child.isalive():
            self.child.terminate(force=True)


def load_sent(node) -> bool:
    return any(entry[1] in ("/api/generate", "/api/embed") for entry in node.request_log)


@pytest.fixture
def terminal_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("OLLAMA_HOST", "NO_COLOR")}
    env.update(FLOCKPARSE_CONFIG_DIR=str(tmp_path), TERM="xterm", COLUMNS=str(COLUMNS), LINES=str(LINES))
    return env


def test_console_in_a_real_terminal(sim_node, terminal_env: dict[str, str]) -> None:
    node = sim_node(vram_gb=24, preload=[("mxbai-embed-large", "gpu")])
    short = node.url.split("://")[1]
    with Terminal(
        [
            "--nodes",
            node.url,
            "--priority",
            "mxbai-embed-large",
            "--interval",
            "300",
            "--health-interval",
            "0.2",
        ],
        terminal_env,
    ) as term:
        term.wait_for(lambda: PROMPT.strip() in term.cursor_line(), "the prompt")
        term.wait_for(lambda: "GPU auto-optimization enabled" in term.text(), "the optimizer start line")
        term.wait_for(lambda: "1/1 nodes online  1 with GPU  optimizer on" in term.text(), "the toolbar")

        term.type("vram_report\r")
        term.wait_for(lambda: "mxbai-embed-large:latest │ 100% GPU" in term.text(), "the vram_report table")
        assert f"{short}  online" in term.text()

        # half a command, no Enter; then make the optimizer act in the background
        term.type("force_g")
        term.wait_for(lambda: term.cursor_line().endswith("force_g"), "the half-typed line")
        node.restart()  # comes back with the model on CPU: the monitor sees it and the optimizer moves it
        term.wait_for(lambda: "mxbai-embed-large:latest now on GPU" in term.text(), "the optimizer line")
        # prompt_toolkit erases and redraws the prompt around the line: wait (bounded) for the redraw
        term.wait_for(lambda: term.cursor_line().endswith(f"{PROMPT}force_g"), "the prompt redrawn intact")
        [prompt_row] = [i for i, line in enumerate(term.lines()) if line.endswith(f"{PROMPT}force_g")]
        event_row = max(i for i, line in enumerate(term.lines()) if "now on GPU" in line)
        assert event_row < prompt_row  # the background line landed above the prompt

        term.type("pu mxbai-embed-large\r")
        term.wait_for(lambda: f"{short}  already there: GPU (VRAM)" in term.text(), "the force_gpu result")

        term.type("exit\r")
        assert term.wait_for_exit() == 0


def test_unreachable_default_node_and_bad_input_in_a_terminal(sim_node, terminal_env: dict[str, str]) -> None:
    dead = sim_node(vram_gb=0)
    dead.set_fault("down")
    terminal_env["OLLAMA_HOST"] = dead.url
    with Terminal(["--health-interval", "0.2"], terminal_env) as term:
        term.wait_for(lambda: "--demo" in term.text(), "the --demo suggestion")
        term.wait_for(lambda: PROMPT.strip() in term.cursor_line(), "the prompt")
        term.type("vram_repotr\r")
        term.wait_for(lambda: "did you mean `vram_report`?" in term.text(), "the did-you-mean line")
        term.wait_for(lambda: term.cursor_line().endswith(PROMPT.strip()), "a fresh prompt")
        term.type("\x04")  # Ctrl-D
        assert term.wait_for_exit() == 0


def test_ctrl_c_cancels_a_long_move_and_exit_is_prompt(sim_node, terminal_env: dict[str, str]) -> None:
    node = sim_node(vram_gb=24, preload=[("mxbai-embed-large", "cpu")], load_seconds_per_gb=60)
    with Terminal(["--nodes", node.url, "--no-optimizer", "--health-interval", "0.2"], terminal_env) as term:
        term.wait_for(lambda: "1/1 nodes online" in term.text(), "the toolbar")
        term.type("force_gpu mxbai-embed-large\r")
        term.wait_for(lambda: "forcing mxbai-embed-large to GPU" in term.text(), "the move to start")
        term.wait_for(lambda: load_sent(node), "the load")
        term.type("\x03")  # Ctrl-C while the node is still loading (a minute of simulated load)
        term.wait_for(lambda: "cancelled" in term.text(), "the cancel line")
        term.wait_for(lambda: term.cursor_line().endswith(PROMPT.strip()), "a fresh prompt")
        term.type("exit\r")
        assert term.wait_for_exit() == 0  # well before the simulated load would end


def test_demo_shows_freed_vram_and_a_restart(terminal_env: dict[str, str], tmp_path: Path) -> None:
    terminal_env["FLOCKPARSE_DEMO_PACE"] = "0.1"  # the demo's timeline, ten times faster
    with Terminal(["--demo"], terminal_env) as term:
        term.wait_for(lambda: "demo: 3 simulated Ollama nodes" in term.text(), "the demo banner")
        banner = next(line for line in term.lines() if line.startswith("demo: 3 simulated"))

        def flat() -> str:  # long event lines wrap at the terminal's width
            return term.text().replace("\n", "")

        _, training, restarting = banner.split("(", 1)[1].split(")", 1)[0].split(", ")
        term.wait_for(lambda: PROMPT.strip() in term.cursor_line(), "the prompt")
        no_room = f"llama3.1:latest on 127.0.0.1:{training}: does not fit: needs ~"
        term.wait_for(lambda: no_room in flat(), "the start-up pass saying why it moves nothing")
        term.type("vram_report\r")  # the "before" state: llama3.1 split next to the training job
        term.wait_for(lambda: "CPU/GPU" in term.text(), "llama3.1 split on the training node")
        term.wait_for(lambda: "ended. Ollama moves nothing by itself" in flat(), "the job's end")
        term.type("optimizer now\r")
        moved = f"127.0.0.1:{training}  llama3.1:latest  llama3.1:latest now on GPU"  # the pass's own line
        term.wait_for(lambda: moved in flat(), "llama3.1 moved once the VRAM is free")
        term.wait_for(lambda: f"127.0.0.1:{restarting} is restarting" in flat(), "the restart")
        warmed = f"mxbai-embed-large:latest now on GPU on 127.0.0.1:{restarting}"
        term.wait_for(lambda: warmed in flat(), "the warm-up after the restart")
        term.type("exit\r")
        assert term.wait_for_exit() == 0
        assert list(tmp_path.iterdir()) == []  # no config, history or log in the user's config dir


def test_ctrl_d_typed_while_a_command_runs_is_not_lost(sim_node, terminal_env: dict[str, str]) -> None:
    node = sim_node(vram_gb=24, preload=[("mxbai-embed-large", "cpu")], load_seconds_per_gb=2)
    with Terminal(["--nodes", node.url, "--no-optimizer", "--health-interval", "0.2"], terminal_env) as term:
        term.wait_for(lambda: "1/1 nodes online" in term.text(), "the toolbar")
        term.type("force_gpu mxbai-embed-large\r")
        term.wait_for(lambda: "forcing mxbai-embed-large to GPU" in term.text(), "the command to start")
        term.type("\x04")  # Ctrl-D while the node is still loading
        status = term.wait_for_exit(timeout=30)
        term.stream.feed(term.child.before)  # what it printed before it ended
        assert status == 0
        assert "done: GPU (VRAM)" in term.text()  # the command finished, then the Ctrl-D ended the console


def test_ctrl_c_in_one_shot_exits_130(sim_node, terminal_env: dict[str, str]) -> None:
    node = sim_node(vram_gb=24, preload=[("mxbai-embed-large", "cpu")], load_seconds_per_gb=60)
    with Terminal(["--nodes", node.url, "force_gpu", "mxbai-embed-large"], terminal_env) as term:
        term.wait_for(lambda: "forcing mxbai-embed-large to GPU" in term.text(), "the move to start")
        term.wait_for(lambda: load_sent(node), "the load sent")
        term.type("\x03")
        assert term.wait_for_exit() == 130


def test_no_color_flag_sends_no_colour_codes(sim_node, terminal_env: dict[str, str]) -> None:
    node = sim_node(vram_gb=24, preload=[("mxbai-embed-large", "cpu")])
    with Terminal(["--no-color", "--nodes", node.url, "vram_report"], terminal_env) as term:
        raw = term.child.read()
        assert b"100% CPU" in raw and b"\x1b[3" not in raw and b"\x1b[9" not in raw  # no SGR colours


def test_sixty_columns_keep_addresses_and_model_names_whole(sim_node, terminal_env: dict[str, str]) -> None:
    node = sim_node(vram_gb=24, preload=[("mxbai-embed-large", "cpu")])
    short = node.url.split("://")[1]
    terminal_env.update(COLUMNS="60")
    args = ["--nodes", node.url, "--no-optimizer", "--health-interval", "0.2"]
    with Terminal(args, terminal_env, columns=60) as term:
        term.wait_for(lambda: "1/1 nodes online" in term.text(), "the toolbar")
        for command, shown in (("vram_report", "943 MB RAM"), ("nodes", "seen"), ("lb_stats", "in flight")):
            term.type(f"{command}\r")
            term.wait_for(lambda shown=shown: shown in term.text(), f"{command}'s output")
        text = term.text()
        assert "mxbai-embed-large:latest" in text and "…" not in text
        assert all(short in line for line in term.lines() if "127.0.0.1:" in line)  # never cut or split
        term.type("exit\r")
        assert term.wait_for_exit() == 0


def test_vram_report_watch_leaves_on_q(sim_node, terminal_env: dict[str, str]) -> None:
    node = sim_node(vram_gb=24, preload=[("mxbai-embed-large", "cpu")])
    with Terminal(["--nodes", node.url, "vram_report", "--watch", "0.5"], terminal_env) as term:
        term.wait_for(lambda: "(q or Ctrl-C leaves)" in term.text(), "the live report")
        term.wait_for(lambda: "mxbai-embed-large:latest │ 100% CPU" in term.text(), "the table")
        term.type("q")
        assert term.wait_for_exit() == 0


def test_ctrl_c_while_waiting_for_a_hung_node_exits_130(sim_node, terminal_env: dict[str, str]) -> None:
    hung = sim_node(vram_gb=0)
    hung.set_fault("hang")
    with Terminal(["--nodes", hung.url, "--timeout", "30", "nodes"], terminal_env) as term:
        term.wait_for(lambda: any(entry[1] == "/api/ps" for entry in hung.request_log), "the first check")
        term.type("\x03")  # during the first health round, before the command runs
        assert term.wait_for_exit() == 130
        term.stream.feed(term.child.before)
        assert "Traceback" not in term.text() and "cancelled" in term.text()


def test_sigterm_ends_the_demo_like_exit_and_removes_its_files(
    terminal_env: dict[str, str], tmp_path: Path
) -> None:
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    terminal_env["TMPDIR"] = str(scratch)  # where --demo keeps its history and console.log
    with Terminal(["--demo"], terminal_env) as term:
        term.wait_for(lambda: PROMPT.strip() in term.cursor_line(), "the prompt")
        assert list(scratch.glob("flockparse-demo-*"))
        term.child.kill(signal.SIGTERM)
        assert term.wait_for_exit() == 128 + signal.SIGTERM
    assert list(scratch.glob("flockparse-demo-*")) == []
