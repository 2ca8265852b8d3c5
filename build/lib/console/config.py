"""Configuration: TOML file + flags + OLLAMA_HOST, and atomic persistence of the node list.

Precedence is flags > config file > $OLLAMA_HOST > http://localhost:11434. The file format (only our
own keys, so a tiny writer is enough and tomllib reads it back)::

    nodes = ["http://127.0.0.1:11434", "http://127.0.0.1:11435"]
    priority_models = ["mxbai-embed-large", "llama3.1"]
    interval = 300          # seconds between optimizer passes
    keep_alive = "30m"      # passed to Ollama on every load (string duration or seconds)
    health_interval = 5     # seconds between node health checks
    timeout = 5             # seconds: per request to a node (status, tags); a dead node never costs more
    on_gpu_lost = "ssh {host} sudo systemctl restart ollama"   # remedy when a node loses its GPU (off)
    remedy_timeout = 120    # seconds the remedy may run

    [gpu]                   # declared GPU capability per node; absent = detect
    "http://127.0.0.1:11434" = false
"""

from __future__ import annotations

import difflib
import json
import os
import tempfile
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flockparse.rules import normalize_url as core_normalize_url

DEFAULT_NODE = "http://localhost:11434"
DEFAULT_INTERVAL = 300.0
DEFAULT_HEALTH_INTERVAL = 5.0
DEFAULT_TIMEOUT = 5.0
KNOWN_KEYS = (
    "nodes",
    "priority_models",
    "interval",
    "keep_alive",
    "health_interval",
    "timeout",
    "gpu",
    "on_gpu_lost",
    "remedy_timeout",
)
DEFAULT_REMEDY_TIMEOUT = 120.0


class ConfigError(ValueError):
    """A config file or flag value we cannot use; the message is one line for the user."""


@dataclass
class Config:
    """Everything the console needs to build the balancer; `path` is where node changes persist."""

    nodes: list[str] = field(default_factory=lambda: [DEFAULT_NODE])
    priority_models: list[str] | None = None  # None = the balancer's default list
    interval: float = DEFAULT_INTERVAL
    keep_alive: str | int | float | None = None
    health_interval: float = DEFAULT_HEALTH_INTERVAL
    timeout: float = DEFAULT_TIMEOUT
    gpu: dict[str, bool] = field(default_factory=dict)
    on_gpu_lost: str | None = None  # the operator's remedy command ({url}, {host}); None = off
    remedy_timeout: float = DEFAULT_REMEDY_TIMEOUT
    path: Path | None = None  # None: nothing is persisted (e.g. --demo)


def config_dir(env: dict[str, str] | None = None) -> Path:
    """$FLOCKPARSE_CONFIG_DIR, else $XDG_CONFIG_HOME/flockparse, else ~/.config/flockparse."""
    env = os.environ if env is None else env
    if env.get("FLOCKPARSE_CONFIG_DIR"):
        return Path(env["FLOCKPARSE_CONFIG_DIR"])
    base = env.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "flockparse"


def normalize_url(raw: str) -> str:
    """The core's one node-address rule (`host` -> `http://host:11434`), as a ConfigError when unusable."""
    try:
        return core_normalize_url(raw)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def read_file(path: Path) -> dict[str, Any]:
    """The raw TOML table, {} when the file does not exist."""
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        return {}
    except (tomllib.TOMLDecodeError, OSError) as exc:
        raise ConfigError(f"cannot read config {path}: {exc}") from None


def _number(value: Any, key: str, source: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise ConfigError(f"{source}: {key} must be a positive number, got {value!r}")
    return float(value)


def _string_list(value: Any, key: str, source: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise ConfigError(f"{source}: {key} must be a list of strings")
    return list(value)


def apply_table(config: Config, table: dict[str, Any], source: str) -> None:
    """Overlay a TOML table onto `config`, validating every key; a typo is an error, not silently ignored."""
    for key in table:
        if key not in KNOWN_KEYS:
            close = difflib.get_close_matches(key, KNOWN_KEYS, n=1)
            hint = f" (did you mean `{close[0]}`?)" if close else f" (known: {', '.join(KNOWN_KEYS)})"
            raise ConfigError(f"{source}: unknown key `{key}`{hint}")
    if "nodes" in table:
        config.nodes = [normalize_url(url) for url in _string_list(table["nodes"], "nodes", source)]
    if "priority_models" in table:
        config.priority_models = _string_list(table["priority_models"], "priority_models", source)
    if "interval" in table:
        config.interval = _number(table["interval"], "interval", source)
    if "health_interval" in table:
        config.health_interval = _number(table["health_interval"], "health_interval", source)
    if "timeout" in table:
        config.timeout = _number(table["timeout"], "timeout", source)
    if "keep_alive" in table:
        if not isinstance(table["keep_alive"], str | int | float):
            raise ConfigError(f"{source}: keep_alive must be a duration string or seconds")
        config.keep_alive = table["keep_alive"]
    if "on_gpu_lost" in table:
        if not isinstance(table["on_gpu_lost"], str) or not table["on_gpu_lost"].strip():
            raise ConfigError(f"{source}: on_gpu_lost must be a command line (a non-empty string)")
        config.on_gpu_lost = table["on_gpu_lost"]
    if "remedy_timeout" in table:
        config.remedy_timeout = _number(table["remedy_timeout"], "remedy_timeout", source)
    if "gpu" in table:
        gpu = table["gpu"]
        if not isinstance(gpu, dict) or not all(isinstance(v, bool) for v in gpu.values()):
            raise ConfigError(f"{source}: [gpu] must map node URLs to true/false")
        config.gpu = {normalize_url(url): flag for url, flag in gpu.items()}


def load_config(
    config_file: str | None = None,
    nodes_flag: str | None = None,
    priority_flag: str | None = None,
    interval_flag: float | None = None,
    health_interval_flag: float | None = None,
    timeout_flag: float | None = None,
    env: dict[str, str] | None = None,
) -> Config:
    """Build the effective Config: flags > file > $OLLAMA_HOST > default."""
    env = os.environ if env is None else env
    path = Path(config_file) if config_file else config_dir(env) / "config.toml"
    config = Config(path=path)
    table = read_file(path)
    if env.get("OLLAMA_HOST") and "nodes" not in table:
        config.nodes = [normalize_url(env["OLLAMA_HOST"])]
    apply_table(config, table, str(path))
    if nodes_flag:
        config.nodes = [normalize_url(url) for url in nodes_flag.split(",") if url.strip()]
    if priority_flag is not None:
        config.priority_models = [name.strip() for name in priority_flag.split(",") if name.strip()]
    if interval_flag is not None:
        config.interval = _number(interval_flag, "--interval", "flag")
    if health_interval_flag is not None:
        config.health_interval = _number(health_interval_flag, "--health-interval", "flag")
    if timeout_flag is not None:
        config.timeout = _number(timeout_flag, "--timeout", "flag")
    return config


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # JSON string escapes are valid TOML basic strings
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def dumps(table: dict[str, Any]) -> str:
    """A tiny TOML writer for our own keys: scalars and lists first, then one level of tables."""
    lines = [f"{key} = {_toml_value(value)}" for key, value in table.items() if not isinstance(value, dict)]
    for key, value in table.items():
        if isinstance(value, dict):
            lines += ["", f"[{key}]"] + [f"{json.dumps(k)} = {_toml_value(v)}" for k, v in value.items()]
    return "\n".join(lines) + "\n"


def atomic_write(path: Path, text: str) -> None:
    """Write a temp file in the same directory, fsync it, then os.replace: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def save_nodes(path: Path, nodes: list[str], gpu: dict[str, bool] | None = None) -> None:
    """Persist the node list (and declared GPU flags) into the file, keeping every other key as it was."""
    table = read_file(path)
    table["nodes"] = list(nodes)
    declared = {url: flag for url, flag in {**table.get("gpu", {}), **(gpu or {})}.items() if url in nodes}
    if declared:
        table["gpu"] = declared
    else:
        table.pop("gpu", None)
    atomic_write(path, dumps(table))
