"""The project installs as one package with a `flockparse` command; the design card's imports still work."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys

import flockparse


def test_the_installed_distribution_has_the_package_version_and_the_flockparse_command() -> None:
    assert importlib.metadata.version("flockparse-gpu") == flockparse.__version__
    [script] = [e for e in importlib.metadata.entry_points(group="console_scripts") if e.name == "flockparse"]
    assert script.value == "flockparsecli:cli"


def test_the_design_cards_imports_work_and_no_generic_module_is_top_level() -> None:
    from flockparsecli import OllamaLoadBalancer
    from gpu_controller import GPUController

    assert OllamaLoadBalancer is flockparse.OllamaLoadBalancer and GPUController is flockparse.GPUController
    top_level = importlib.metadata.distribution("flockparse-gpu").read_text("top_level.txt")
    generic = {"balancer", "optimizer", "events", "console"} & set((top_level or "").split())
    assert not generic, f"generic top-level names would collide once installed: {generic}"


def test_the_command_runs_from_anywhere(tmp_path) -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            "import flockparsecli, sys; sys.argv = ['flockparse', '--help']; flockparsecli.cli()",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0 and "--nodes" in done.stdout
