"""One optimizer per cluster: a running serve says where it is; a local console looks before it starts one.

A serve calls `register_serve(config_dir, url, nodes)` when it starts listening and `unregister_serve(path)`
when it stops: a small JSON file (`serves/HOST-PORT.json` in the config directory: its URL, pid and nodes),
written atomically. A file whose pid is gone (the serve was killed) is ignored. A local console calls
`serves_managing(nodes, config_dir)`: the registered serves whose nodes overlap its own, and the serve at
the default address (127.0.0.1:11435) asked with a short deadline (a serve run by another user, e.g. a
systemd unit, has another config directory). Two addresses name one node when they are equal after the
node-address rule, or when both are loopback (`localhost`, `127.x`, `::1`) with the same port.

Standard library only: the console imports this without the server's dependencies.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import os
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from flockparse.control_client import ControlClient, RemoteError, serve_url
from flockparse.rules import normalize_url

logger = logging.getLogger(__name__)

DEFAULT_SERVE_URL = "http://127.0.0.1:11435"
PROBE_TIMEOUT_S = 0.5
REGISTRY_DIR = "serves"
MAX_FILE_BYTES = 1024 * 1024


@dataclass(frozen=True)
class ServeInfo:
    """A serve this machine can see: where it listens, its pid (None when only probed) and its nodes."""

    url: str
    pid: int | None
    nodes: tuple[str, ...]
    path: Path | None = None  # its registry file, when it has one


def registry_dir(config_dir: Path) -> Path:
    return Path(config_dir) / REGISTRY_DIR


def register_serve(config_dir: Path, url: str, nodes: Iterable[str], pid: int | None = None) -> Path:
    """Write this serve's file (atomically: temp file + rename); returns its path for `unregister_serve`."""
    address = reachable_url(serve_url(url))
    folder = registry_dir(config_dir)
    folder.mkdir(parents=True, exist_ok=True)
    parts = urlsplit(address)
    path = folder / f"{str(parts.hostname).replace(':', '_')}-{parts.port}.json"
    record = {
        "url": address,
        "pid": os.getpid() if pid is None else pid,
        "nodes": list(nodes),
        "started_at": time.time(),
    }
    atomic_write(path, json.dumps(record, indent=2) + "\n")
    return path


def reachable_url(url: str) -> str:
    """A serve bound to every address (`0.0.0.0`, `::`) is reached on loopback from this machine."""
    parts = urlsplit(url)
    loopback = {"0.0.0.0": "127.0.0.1", "::": "[::1]"}.get(str(parts.hostname))
    return f"{parts.scheme}://{loopback}:{parts.port}" if loopback else url


def unregister_serve(path: Path | None) -> None:
    """Remove the file at a clean exit (a file already gone is fine)."""
    if path is not None:
        with contextlib.suppress(FileNotFoundError):
            Path(path).unlink()


def registered_serves(config_dir: Path) -> list[ServeInfo]:
    """The serves registered in `config_dir` whose process is alive; unreadable files are skipped."""
    serves = []
    folder = registry_dir(config_dir)
    if not folder.is_dir():
        return []
    for path in sorted(folder.glob("*.json")):
        info = _read(path)
        if info is not None and info.pid is not None and pid_alive(info.pid):
            serves.append(info)
    return serves


def _read(path: Path) -> ServeInfo | None:
    try:
        if path.stat().st_size > MAX_FILE_BYTES:
            return None
        record = json.loads(path.read_text(encoding="utf-8"))
        url = serve_url(record["url"])
        pid = record["pid"]
        nodes = tuple(normalize_url(node) for node in record["nodes"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        logger.debug("ignoring the serve registry file %s: %s", path, exc)
        return None
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return None
    return ServeInfo(url, pid, nodes, path)


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists (one of another user's counts: it exists)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    return True


def probe_serve(url: str, token: str | None = None, timeout: float = PROBE_TIMEOUT_S) -> ServeInfo | None:
    """The serve answering at `url` (its status, within `timeout`), or None when none answers there.

    A serve that asks a token for reads and was given none cannot say its nodes: None as well (its
    registry file still says them when it runs as the same user)."""
    try:
        status = ControlClient(url, token, timeout).request("GET", "/status").data
    except RemoteError:
        return None
    if not isinstance(status, dict) or status.get("service") != "flockparse":
        return None
    try:
        nodes = tuple(normalize_url(str(node)) for node in status.get("nodes") or [])
    except ValueError:
        return None
    pid = status.get("pid")
    return ServeInfo(serve_url(url), pid if isinstance(pid, int) else None, nodes)


def serves_managing(
    nodes: Iterable[str],
    config_dir: Path,
    probe_url: str | None = DEFAULT_SERVE_URL,
    token: str | None = None,
    timeout: float = PROBE_TIMEOUT_S,
) -> list[tuple[ServeInfo, list[str]]]:
    """The serves that manage any of `nodes`, each with the nodes it shares with them."""
    wanted = [normalize_url(node) for node in nodes]
    serves = registered_serves(config_dir)
    if probe_url and not any(same_address(info.url, probe_url) for info in serves):
        probed = probe_serve(probe_url, token, timeout)
        if probed is not None:
            serves.append(probed)
    found = []
    for info in serves:
        shared = [node for node in wanted if any(same_address(node, other) for other in info.nodes)]
        if shared:
            found.append((info, shared))
    return found


def same_address(a: str, b: str) -> bool:
    """Equal URLs, or the same scheme and port on two loopback names (`localhost` and `127.0.0.1`)."""
    if a == b:
        return True
    left, right = urlsplit(a), urlsplit(b)
    return (
        left.scheme == right.scheme
        and left.port == right.port
        and _loopback(left.hostname)
        and _loopback(right.hostname)
    )


def _loopback(host: str | None) -> bool:
    if not host:
        return False
    if host.lower() in ("localhost", "localhost.localdomain", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def atomic_write(path: Path, text: str, mode: int = 0o600) -> None:
    """Write `text` to `path` so a reader sees the old file or the new one, never half of one: a temp file
    in the same directory, flushed to disk, then renamed over it."""
    path = Path(path)
    handle, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(temp, mode)
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        raise
