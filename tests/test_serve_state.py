"""What a serve keeps across its restart (flockparse/serve/state.py) and how it tells consoles it runs
(flockparse/serve/registry.py)."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import LLAMA, Recorder, on_cpu, wait_until
from serving import ServedApp, control_app

from flockparse.remote import RemoteCluster
from flockparse.serve.registry import (
    register_serve,
    registered_serves,
    same_address,
    serves_managing,
    unregister_serve,
)
from flockparse.serve.state import StateError, StateKeeper, read_state, state_path

TOKEN = "t0ken"


def first_check(balancer) -> None:
    wait_until(lambda: all(s.online and s.installed for s in balancer.node_states()), "the first check")


def test_pins_and_back_offs_round_trip_through_the_optimizer(make_balancer) -> None:
    one, two = "http://127.0.0.1:1", "http://127.0.0.1:2"
    lb = make_balancer([one, two])
    backoff = {
        "node": two,
        "model": "codellama",
        "failures": 2,
        "passes_to_skip": 3,
        "reason": "out_of_memory",
    }
    saved = {
        "pinned_cpu": [{"node": one, "model": "LLaMA3.1"}, {"node": "http://gone:1", "model": "x"}],
        "backed_off": [backoff, {**backoff, "model": "bad", "failures": True}, "not an entry"],
    }
    assert lb.optimizer.import_state(saved, nodes=lb.nodes) == 2  # the gone node and malformed ones dropped
    exported = lb.optimizer.export_state()
    assert exported["pinned_cpu"] == [{"node": one, "model": "llama3.1:latest"}]
    assert exported["backed_off"] == [{**backoff, "model": "codellama:latest"}]
    assert lb.optimizer.is_pinned(one, "llama3.1")
    assert lb.optimizer_status()["backed_off"][0]["passes_to_skip"] == 3


def test_a_cpu_pin_survives_a_restart_of_the_serve(sim_node, make_balancer, tmp_path: Path) -> None:
    """Today's bug: a force_cpu pin lived in one process only. Here it is the serve's, and its file's."""
    node = sim_node(vram_gb=24, preload=[("llama3.1", "gpu")])
    path = state_path(tmp_path, "127.0.0.1:11435")
    lb = make_balancer([node.url], gpu_priority_models=["llama3.1"])
    keeper = StateKeeper(lb, path)
    assert keeper.load() == []  # no file yet
    keeper.start()
    first_check(lb)
    with ServedApp(control_app(lb, TOKEN)) as app:
        remote = RemoteCluster(app.url, token=TOKEN)
        remote.connect()
        remote.force_cpu_all_nodes("llama3.1")
        remote.gpu_priority_models = [*remote.gpu_priority_models, "codellama"]
        wait_until(lambda: (read_state(path) or {}).get("pinned_cpu"), "the pin in the state file")
    keeper.stop()
    lb.close()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp file left behind

    again = make_balancer([node.url], gpu_priority_models=["llama3.1"], auto_optimize_gpu=True, start=False)
    notes = StateKeeper(again, path).load()  # before its first pass, as the serve does at start
    assert any("CPU pin" in note for note in notes)
    assert again.gpu_priority_models == ["llama3.1", "codellama"]
    events = Recorder(again)
    again.start()
    events.wait("pass_finished")
    first_check(again)
    with ServedApp(control_app(again, TOKEN)) as app:
        remote = RemoteCluster(app.url, token=TOKEN)
        remote.connect()
        actions = remote.optimize_gpu_once()
    assert {"node": node.url, "model": LLAMA, "action": "skipped", "reason": "pinned_cpu"}.items() <= actions[
        0
    ].items()
    assert on_cpu(node, LLAMA)
    assert again.optimizer_status()["pinned_cpu"] == [{"node": node.url, "model": LLAMA}]


def test_a_changed_configuration_wins_over_saved_priorities(make_balancer, tmp_path: Path) -> None:
    path = state_path(tmp_path, "0.0.0.0:11435")
    lb = make_balancer([], gpu_priority_models=["llama3.1"])
    keeper = StateKeeper(lb, path)
    lb.gpu_priority_models = ["llama3.1", "codellama"]
    keeper.stop()  # writes what changed
    edited = make_balancer([], gpu_priority_models=["mxbai-embed-large"])
    notes = StateKeeper(edited, path).load()
    assert edited.gpu_priority_models == ["mxbai-embed-large"]
    assert any("changed in the configuration" in note for note in notes)


def test_an_unusable_state_file_is_one_line_and_an_unwritable_one_one_event(
    make_balancer, tmp_path: Path
) -> None:
    broken = tmp_path / "state.json"
    broken.write_text("{not json")
    with pytest.raises(StateError, match="state.json: not a readable state file"):
        StateKeeper(make_balancer([]), broken).load()
    broken.write_text(json.dumps({"version": 99}))
    with pytest.raises(StateError, match="not a state file of this version"):
        read_state(broken)

    lb = make_balancer([])
    events = Recorder(lb)
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    keeper = StateKeeper(lb, blocked / "state.json")  # its directory cannot be made
    for names in (["a"], ["b"]):
        lb.gpu_priority_models = names
        assert keeper.save() is False
    assert len(events.of("state_not_saved")) == 1  # said once, not at every try


def test_a_serve_registers_and_a_dead_one_is_ignored(tmp_path: Path) -> None:
    path = register_serve(tmp_path, "127.0.0.1:11435", ["http://127.0.0.1:11434"])
    assert [(s.url, s.nodes) for s in registered_serves(tmp_path)] == [
        ("http://127.0.0.1:11435", ("http://127.0.0.1:11434",))
    ]
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    register_serve(tmp_path, "127.0.0.1:11500", ["http://127.0.0.1:11434"], pid=int(dead.stdout))
    (path.parent / "junk.json").write_text("{]")
    assert [s.url for s in registered_serves(tmp_path)] == ["http://127.0.0.1:11435"]
    unregister_serve(path)
    unregister_serve(path)  # twice is fine
    wildcard = register_serve(tmp_path, "0.0.0.0:11435", [])
    assert [s.url for s in registered_serves(tmp_path)] == ["http://127.0.0.1:11435"]  # what --connect takes
    unregister_serve(wildcard)
    assert registered_serves(tmp_path) == []
    assert os.getpid() != int(dead.stdout)


def test_a_console_sees_the_serves_that_manage_its_nodes(make_balancer, served, tmp_path: Path) -> None:
    register_serve(tmp_path, "127.0.0.1:9", ["http://localhost:11434", "http://gpu2:11434"])
    found = serves_managing(["http://127.0.0.1:11434", "http://gpu9:11434"], tmp_path, probe_url=None)
    assert [(info.url, shared) for info, shared in found] == [
        ("http://127.0.0.1:9", ["http://127.0.0.1:11434"])
    ]
    assert serves_managing(["http://gpu9:11434"], tmp_path, probe_url=None) == []

    # a serve with no file here (another user's, a systemd unit) is found by asking its address
    url = served(make_balancer(["http://gpu9:11434"]))
    found = serves_managing(["gpu9"], tmp_path / "empty", probe_url=url)
    assert [(info.url, shared) for info, shared in found] == [(url, ["http://gpu9:11434"])]
    assert serves_managing(["gpu9"], tmp_path / "empty", probe_url="http://127.0.0.1:1") == []
    assert same_address("http://localhost:11434", "http://[::1]:11434")
    assert not same_address("http://localhost:11434", "http://127.0.0.1:11435")
    assert not same_address("http://gpu1:11434", "http://gpu2:11434")
