"""`flockparse gpu-exporter`: NVML figures served in dcgm-exporter's names, read back by the scraper's parser.

No GPU and no NVIDIA driver exist here: a stand-in for nvidia-ml-py's `pynvml` module gives the figures
(the same calls, errors and memory structures: nvmlDeviceGetMemoryInfo v1 and v2).
"""

from __future__ import annotations

import sys
import threading
import urllib.request
from types import SimpleNamespace
from typing import Any

import pytest

from flockparse.console.gpu_exporter import main as gpu_exporter
from flockparse.gpu_metrics import parse_page
from flockparse.gpu_metrics.nvml import NvmlReader, NvmlUnavailable, listen_address, load_nvml
from flockparsecli import main

MIB = 1024 * 1024


class FakeNvml:
    """The parts of pynvml the exporter calls; `gpus` = [(name, total MiB, used MiB, reserved MiB)]."""

    class NVMLError(Exception):
        pass

    nvmlMemory_v2 = 0x02000028  # pynvml's value: sizeof(c_nvmlMemory_v2_t) | 2 << 24

    def __init__(self, gpus: list[tuple[str, int, int, int]], driver: bool = True, v2: bool = True) -> None:
        self.gpus, self.driver, self.v2 = gpus, driver, v2
        self.shut_down = False

    def nvmlInit(self) -> None:
        if not self.driver:
            raise self.NVMLError("Driver Not Loaded")

    def nvmlShutdown(self) -> None:
        self.shut_down = True

    def nvmlDeviceGetCount(self) -> int:
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        return index

    def nvmlDeviceGetName(self, handle: int) -> bytes:
        return self.gpus[handle][0].encode()  # older bindings return bytes

    def nvmlDeviceGetUUID(self, handle: int) -> str:
        return f"GPU-00000000-0000-0000-0000-00000000000{handle}"

    def nvmlDeviceGetPciInfo(self, handle: int) -> Any:
        return SimpleNamespace(busId=f"00000000:{0x17 + handle:02X}:00.0")

    def nvmlDeviceGetMemoryInfo(self, handle: int, version: int | None = None) -> Any:
        _, total, used, reserved = self.gpus[handle]
        if version is not None:
            if not self.v2:
                raise self.NVMLError("Function Not Found")
            return SimpleNamespace(total=total * MIB, used=used * MIB, free=(total - used - reserved) * MIB,
                                   reserved=reserved * MIB)  # fmt: skip
        return SimpleNamespace(
            total=total * MIB, used=(used + reserved) * MIB, free=(total - used - reserved) * MIB
        )


def run_exporter(nvml: FakeNvml) -> tuple[str, str]:
    """Start the command with the stand-in on an ephemeral port, scrape it once, stop it: (page, exit)."""
    started = threading.Event()
    box: dict[str, Any] = {}

    def ready(server: Any) -> None:
        box["server"] = server
        started.set()

    thread = threading.Thread(
        target=lambda: box.setdefault(
            "code", gpu_exporter(["--listen", "127.0.0.1:0"], nvml=nvml, ready=ready)
        ),
        daemon=True,
    )
    thread.start()
    assert started.wait(10)
    port = box["server"].server_address[1]
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        page = reply.read().decode()
    box["server"].shutdown()
    thread.join(10)
    return page, str(box["code"])


def test_the_gpus_memory_is_served_in_dcgm_exporter_names() -> None:
    nvml = FakeNvml([("NVIDIA RTX A6000", 49140, 27914, 351), ("NVIDIA RTX A6000", 49140, 4, 351)])

    page, code = run_exporter(nvml)

    parsed = parse_page(page)
    assert code == "0" and nvml.shut_down
    assert parsed.format == "dcgm"
    assert [(g.index, g.name, g.total_mb, g.used_mb, g.free_mb, g.reserved_mb) for g in parsed.gpus] == [
        ("0", "NVIDIA RTX A6000", 49140, 27914, 20875, 351),
        ("1", "NVIDIA RTX A6000", 49140, 4, 48785, 351),
    ]
    assert 'DCGM_FI_DEV_FB_USED{gpu="0",UUID="GPU-00000000-0000-0000-0000-000000000000",pci_bus_id=' in page


def test_a_driver_without_memory_info_v2_gives_v1_figures() -> None:
    reader = NvmlReader(FakeNvml([("Tesla T4", 15360, 1000, 250)], v2=False))
    [device] = reader.devices()
    assert (device.total, device.used, device.free, device.reserved) == (
        15360 * MIB,
        1250 * MIB,
        14110 * MIB,
        0,
    )


def test_no_nvidia_driver_is_one_clear_line_and_exit_1(capsys: pytest.CaptureFixture[str]) -> None:
    code = gpu_exporter(["--listen", "127.0.0.1:0"], nvml=FakeNvml([], driver=False))
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1
    assert "no NVIDIA driver answers on this machine (NVML: Driver Not Loaded): nothing to export" in err


def test_without_the_nvml_package_it_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # `import pynvml` fails as when not installed
    with pytest.raises(NvmlUnavailable, match=r"pip install 'flockparse-gpu\[nvml\]'"):
        load_nvml()
    assert main(["gpu-exporter", "--listen", "127.0.0.1:0"]) == 1
    assert "the NVML bindings are not installed" in capsys.readouterr().err


@pytest.mark.parametrize("bad", ["9400", "host:", "host:99999", ":9400", "host:port"])
def test_a_bad_listen_address_is_a_usage_error(bad: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ValueError, match="expected HOST:PORT"):
        listen_address(bad)
    assert gpu_exporter(["--listen", bad], nvml=FakeNvml([])) == 2
    assert "expected HOST:PORT" in capsys.readouterr().err


def test_listen_addresses() -> None:
    assert listen_address("0.0.0.0:9400") == ("0.0.0.0", 9400)
    assert listen_address("[::1]:9400") == ("::1", 9400)
