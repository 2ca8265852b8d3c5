"""Configuration: TOML file + flags + OLLAMA_HOST, and safe persistence of node changes.

Precedence is flags > config file > $OLLAMA_HOST > http://localhost:11434. The file format::

    nodes = ["http://127.0.0.1:11434", "http://127.0.0.1:11435"]
    priority_models = ["mxbai-embed-large", "llama3.1"]
    interval = 300          # seconds between optimizer passes
    keep_alive = "30m"      # passed to Ollama on every load (Go duration string or seconds)
    health_interval = 5     # seconds between node health checks
    timeout = 5             # seconds: per request to a node (status, tags); a dead node never costs more
    on_gpu_lost = "ssh {host} sudo systemctl restart ollama"   # remedy when a node loses its GPU (off)
    remedy_timeout = 120    # seconds the remedy may run
    routing = "adaptive"    # how requests are routed (adaptive, round_robin, least_loaded, lowest_latency)
    evict_to = "unload"     # room for a priority model: unload lower ones, or move them to "cpu"
    history_days = 30       # placement history kept in history.sqlite (0 = none recorded)

    [gpu]                   # declared GPU capability per node; absent = detect
    "http://127.0.0.1:11434" = false

    [gpu_metrics]           # the GPU exporter beside a node (dcgm-exporter, nvidia_gpu_exporter, nvitop)
    "http://127.0.0.1:11434" = "http://127.0.0.1:9400/metrics"

    [alerts]                # off unless a webhook or [alerts.email] is set
    webhook_url = "https://hooks.slack.com/services/..."
    webhook_format = "slack"  # json | slack | discord
    cooldown = "10m"        # one message per (node, model, kind) per cool-down

    [alerts.email]
    host = "smtp.example.com"
    port = 587              # default: 587 starttls, 465 tls, 25 none
    tls = "starttls"        # starttls | tls | none
    user = "alerts@example.com"
    password_env = "FLOCKPARSE_SMTP_PASSWORD"   # or password_file = "~/.config/flockparse/smtp-password"
    from = "alerts@example.com"
    to = ["ops@example.com"]

Node changes (`add_node`, `remove_node`) are applied to the file's own list under a lock, re-read from
disk, so concurrent consoles never drop each other's nodes; tomlkit keeps the user's comments and layout,
the file's mode is kept and a symlinked file is written through its link. A node list that came from
`--nodes` or $OLLAMA_HOST is never written.
"""

from __future__ import annotations

import contextlib
import difflib
import math
import os
import re
import stat
import tempfile
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomlkit
from tomlkit.items import Array, Table

from flockparse.alerts import DEFAULT_COOLDOWN_S, AlertSettings
from flockparse.history import DEFAULT_RETENTION_DAYS
from flockparse.notify import TLS_MODES, WEBHOOK_FORMATS, EmailSettings, check_webhook_url
from flockparse.routing import DEFAULT_STRATEGY, check_strategy
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
    "load_timeout",
    "routing",
    "evict_to",
    "gpu_metrics",
    "history_days",
    "alerts",
)
ALERT_KEYS = ("webhook_url", "webhook_format", "cooldown", "email")
EMAIL_KEYS = ("host", "port", "tls", "user", "password_env", "password_file", "from", "to")
HISTORY_DAYS_MAX = 3650.0
COOLDOWN_MAX_S = 7 * 86400.0
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(w|d|h|m|s)")
_DURATION_UNITS = {"w": 7 * 86400, "d": 86400, "h": 3600, "m": 60, "s": 1}
DEFAULT_REMEDY_TIMEOUT = 120.0
DEFAULT_LOAD_TIMEOUT = 300.0

# (minimum, maximum) seconds. Below the minimum a value busy-loops a core or floods the nodes; above the
# maximum it overflows threading waits (1e10) or means "never", which hides a dead node.
RANGES: dict[str, tuple[float, float]] = {
    "interval": (5.0, 30 * 86400.0),
    "health_interval": (0.1, 3600.0),
    "timeout": (0.1, 600.0),
    "remedy_timeout": (1.0, 3600.0),
    "load_timeout": (5.0, 3600.0),
}
# Ollama reads a string keep_alive as a Go duration ("30m", "1h30m", "-1s") and a bare number as seconds
_GO_DURATION = re.compile(r"-?((\d+(\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h))+|-?(\d+(\.\d*)?|\.\d+)|0")
_CREDENTIALS = re.compile(r"^[a-z][a-z0-9+.-]*://[^/@\s]+@", re.IGNORECASE)

NEW_FILE_HEADER = """\
# FlockParse console configuration (TOML). Written by `add_node`; comments are kept when it is changed.
# Flags override these keys for one run; a node list given by --nodes or $OLLAMA_HOST is never saved.
#
# priority_models = ["mxbai-embed-large", "llama3.1"]  # what the optimizer keeps on GPU (globs, "*")
# interval = 300          # seconds between optimizer passes (5 .. 2592000)
# health_interval = 5     # seconds between node health checks (0.1 .. 3600)
# timeout = 5             # seconds per request to a node (0.1 .. 600)
# load_timeout = 300      # seconds a model load may take, e.g. 40 GB from disk (5 .. 3600)
# keep_alive = "30m"      # how long Ollama keeps a moved model: a duration ("30m", "2h") or seconds
# on_gpu_lost = "ssh {host} sudo systemctl restart ollama"  # run once when a node loses its GPU (off)
# remedy_timeout = 120    # seconds the remedy may run (1 .. 3600)
# routing = "adaptive"    # how requests are routed: adaptive, round_robin, least_loaded, lowest_latency
# evict_to = "unload"     # room for a priority model: unload lower ones ("unload") or move them to "cpu"
# history_days = 30       # days of placement history kept in history.sqlite (0 = none recorded)
#
# [gpu]                   # declare a node's GPU instead of detecting it
# "http://cpu-box:11434" = false
#
# [gpu_metrics]           # real VRAM figures from the GPU exporter beside a node (scraped every 15 s)
# "http://gpu1:11434" = "http://gpu1:9400/metrics"   # dcgm-exporter, nvidia_gpu_exporter, nvitop-exporter
#
# [alerts]                # a message when a priority model leaves the GPU, a GPU is lost, a node goes down
# webhook_url = "https://hooks.slack.com/services/..."
# webhook_format = "slack"  # json | slack | discord
# cooldown = "10m"        # at most one message per node, model and kind per cool-down
#
# [alerts.email]
# host = "smtp.example.com"
# port = 587              # default 587 (starttls), 465 (tls), 25 (none)
# tls = "starttls"        # starttls | tls | none
# user = "alerts@example.com"
# password_env = "FLOCKPARSE_SMTP_PASSWORD"  # or password_file = "/path/to/file" (mode 0600)
# from = "alerts@example.com"
# to = ["ops@example.com"]

"""


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
    load_timeout: float = DEFAULT_LOAD_TIMEOUT
    routing: str = DEFAULT_STRATEGY  # flockparse/routing.py
    evict_to: str = "unload"  # how the optimizer makes room (flockparse/room.py): "unload" or "cpu"
    gpu_metrics: dict[str, str] = field(default_factory=dict)  # node URL -> its GPU exporter's URL
    history_days: float = DEFAULT_RETENTION_DAYS  # 0: no history recorded
    alerts: AlertSettings = field(default_factory=AlertSettings)
    path: Path | None = None  # None: nothing is persisted (e.g. --demo)
    nodes_from: str = "default"  # "flag" | "file" | "env" | "default": where `nodes` came from


def config_dir(env: dict[str, str] | None = None) -> Path:
    """$FLOCKPARSE_CONFIG_DIR, else $XDG_CONFIG_HOME/flockparse, else ~/.config/flockparse."""
    env = os.environ if env is None else env
    if env.get("FLOCKPARSE_CONFIG_DIR"):
        return Path(env["FLOCKPARSE_CONFIG_DIR"])
    base = env.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "flockparse"


def normalize_url(raw: str) -> str:
    """The core's one node-address rule (`host` -> `http://host:11434`), as a ConfigError when unusable.

    Credentials are refused: the core would drop them silently and talk to the node without them.
    """
    if _CREDENTIALS.match(str(raw).strip()) or ("@" in str(raw) and "://" not in str(raw)):
        raise ConfigError(
            "node URL with credentials (user:password@) is not supported: nodes are reached without "
            "authentication; put a proxy in front or drop the credentials"
        )
    try:
        return core_normalize_url(raw)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def ollama_host_url(value: str) -> str:
    """$OLLAMA_HOST as the official client reads it: `:11500` -> http://127.0.0.1:11500."""
    text = value.strip()
    scheme, sep, rest = text.partition("://")
    if not sep:
        scheme, rest = "", text
    if rest.startswith(":"):
        rest = "127.0.0.1" + rest
    if not rest:
        rest = "127.0.0.1"
    return normalize_url(f"{scheme}://{rest}" if sep else rest)


def read_file(path: Path) -> dict[str, Any]:
    """The raw TOML table, {} when the file does not exist; any other problem is one ConfigError line."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror or exc}") from None
    return _parse(data, path)


def _parse(data: bytes, path: Path) -> dict[str, Any]:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"cannot read config {path}: not valid UTF-8 (byte {exc.start})") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"cannot read config {path}: {exc}") from None


def check_seconds(value: Any, key: str, source: str, named: bool = False) -> float:
    """A finite number of seconds within RANGES[key]; else a one-line ConfigError naming source and key.

    `named`: `source` already names the value (a flag, a command), so the key is not repeated.
    """
    low, high = RANGES[key]
    where = source if named else f"{source}: {key}"
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise ConfigError(f"{where}: `{value}` is not a number of seconds") from None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{where}: `{value!r}` is not a number of seconds")
    if not math.isfinite(value) or not low <= value <= high:
        raise ConfigError(f"{where} must be between {low:.10g} and {high:.10g} seconds, got {value:.10g}")
    return float(value)


def parse_duration(value: Any, where: str) -> float:
    """Seconds from a number of seconds or a duration such as "90s", "10m", "24h", "7d", "2w", "1h30m"."""
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise ConfigError(f'{where}: expected a duration such as "10m", "24h" or "7d"')
    if isinstance(value, str):
        text = value.strip().lower()
        try:
            value = float(text)
        except ValueError:
            parts = _DURATION.findall(text)
            if not parts or "".join(number + unit for number, unit in parts) != text:
                raise ConfigError(f'{where}: `{value}` is not a duration (e.g. "10m", "24h", "7d")') from None
            value = sum(float(number) * _DURATION_UNITS[unit] for number, unit in parts)
    if not math.isfinite(value) or value < 0:
        raise ConfigError(f"{where}: a duration must be a finite number of seconds >= 0")
    return float(value)


def check_history_days(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigError(f"{where}: expected a number of days (0 = no history)")
    if not 0 <= value <= HISTORY_DAYS_MAX:
        raise ConfigError(f"{where} must be between 0 and {HISTORY_DAYS_MAX:g} days, got {value:g}")
    return float(value)


def _table_keys(table: Any, known: tuple[str, ...], where: str) -> dict[str, Any]:
    if not isinstance(table, dict):
        raise ConfigError(f"{where} must be a table")
    for key in table:
        if key == "password" and where.endswith("email]"):
            raise ConfigError(
                f"{where}: a password is never kept in the config: set password_env (an environment "
                "variable) or password_file (a file only you can read)"
            )
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f" (did you mean `{close[0]}`?)" if close else f" (known: {', '.join(known)})"
            raise ConfigError(f"{where}: unknown key `{key}`{hint}")
    return table


def _string(table: dict[str, Any], key: str, where: str) -> str | None:
    value = table.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{where}: {key} must be a non-empty string")
    return value.strip()


def alert_settings(table: Any, source: str) -> AlertSettings:
    """`[alerts]` and `[alerts.email]`, every key checked (a typo is an error, not a silent no-alert)."""
    where = f"{source}: [alerts]"
    table = _table_keys(table, ALERT_KEYS, where)
    url = _string(table, "webhook_url", where)
    if url is not None:
        try:
            url = check_webhook_url(url)
        except ValueError as exc:
            raise ConfigError(f"{where}: {exc}") from None
    fmt = _string(table, "webhook_format", where) or "json"
    if fmt not in WEBHOOK_FORMATS:
        raise ConfigError(f"{where}: webhook_format must be one of {', '.join(WEBHOOK_FORMATS)}, got `{fmt}`")
    cooldown = parse_duration(table.get("cooldown", DEFAULT_COOLDOWN_S), f"{where}: cooldown")
    if cooldown > COOLDOWN_MAX_S:
        raise ConfigError(f"{where}: cooldown must be at most 7 days")
    email = _email_settings(table["email"], f"{source}: [alerts.email]") if "email" in table else None
    return AlertSettings(url, fmt, cooldown, email)


def _email_settings(table: Any, where: str) -> EmailSettings:
    table = _table_keys(table, EMAIL_KEYS, where)
    host, sender = _string(table, "host", where), _string(table, "from", where)
    if host is None or sender is None:
        raise ConfigError(f"{where}: host, from and to are needed")
    to = table.get("to")
    recipients = [to] if isinstance(to, str) else to
    if (
        not isinstance(recipients, list)
        or not recipients
        or not all(isinstance(r, str) and "@" in r for r in recipients)
    ):
        raise ConfigError(f"{where}: to must be an address or a list of addresses")
    tls = _string(table, "tls", where) or "starttls"
    if tls not in TLS_MODES:
        raise ConfigError(f"{where}: tls must be one of {', '.join(TLS_MODES)}, got `{tls}`")
    port = table.get("port")
    if port is not None and (isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535):
        raise ConfigError(f"{where}: port must be a number from 1 to 65535")
    user = _string(table, "user", where)
    password_env, password_file = (
        _string(table, "password_env", where),
        _string(table, "password_file", where),
    )
    if password_env and password_file:
        raise ConfigError(f"{where}: set password_env or password_file, not both")
    if user and not (password_env or password_file):
        raise ConfigError(f"{where}: user is set: give password_env or password_file for its password")
    if (password_env or password_file) and not user:
        raise ConfigError(f"{where}: a password without user: set user too")
    return EmailSettings(
        host=host, to=tuple(recipients), sender=sender, port=port, tls=tls, user=user,
        password_env=password_env, password_file=password_file,
    )  # fmt: skip


def check_keep_alive(value: Any, source: str) -> str | int | float:
    """A Go duration string or a finite number of seconds: what Ollama accepts (else every move is a 400)."""
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise ConfigError(f'{source}: keep_alive must be a duration such as "30m" or a number of seconds')
    if isinstance(value, str) and not _GO_DURATION.fullmatch(value.strip()):
        raise ConfigError(
            f'{source}: keep_alive {value!r} is not a duration Ollama accepts (e.g. "30m", "2h", "-1")'
        )
    if isinstance(value, int | float) and not math.isfinite(value):
        raise ConfigError(f"{source}: keep_alive must be a finite number of seconds")
    return value


def check_routing(value: Any, source: str) -> str:
    """One of the routing strategies (flockparse/routing.py), else a one-line ConfigError."""
    if not isinstance(value, str):
        raise ConfigError(f"{source} must be a name (adaptive, round_robin, least_loaded, lowest_latency)")
    try:
        return check_strategy(value)
    except ValueError as exc:
        raise ConfigError(f"{source}: {exc}") from None


def _string_list(value: Any, key: str, source: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise ConfigError(f"{source}: {key} must be a list of strings")
    return list(value)


def _urls(values: list[str], source: str, key: str) -> list[str]:
    try:
        return list(dict.fromkeys(normalize_url(url) for url in values))
    except ConfigError as exc:
        raise ConfigError(f"{source}: {key}: {exc}") from None


def priority_list(names: list[str], source: str) -> list[str]:
    """Validated priority names under the console's one name rule, duplicates (by model key) dropped."""
    from flockparse.console.names import ModelNameError, unique_names

    try:
        return unique_names(names, allow_glob=True)
    except ModelNameError as exc:
        raise ConfigError(f"{source}: priority_models: {exc}") from None


def apply_table(config: Config, table: dict[str, Any], source: str) -> None:
    """Overlay a TOML table onto `config`, validating every key; a typo is an error, not silently ignored."""
    for key in table:
        if key not in KNOWN_KEYS:
            close = difflib.get_close_matches(key, KNOWN_KEYS, n=1)
            hint = f" (did you mean `{close[0]}`?)" if close else f" (known: {', '.join(KNOWN_KEYS)})"
            raise ConfigError(f"{source}: unknown key `{key}`{hint}")
    if "nodes" in table:
        config.nodes = _urls(_string_list(table["nodes"], "nodes", source), source, "nodes")
        config.nodes_from = "file"
    if "priority_models" in table:
        names = _string_list(table["priority_models"], "priority_models", source)
        config.priority_models = priority_list(names, source)
    for key in RANGES:
        if key in table:
            setattr(config, key, check_seconds(table[key], key, source))
    if "keep_alive" in table:
        config.keep_alive = check_keep_alive(table["keep_alive"], f"{source}: keep_alive")
    if "on_gpu_lost" in table:
        if not isinstance(table["on_gpu_lost"], str) or not table["on_gpu_lost"].strip():
            raise ConfigError(f"{source}: on_gpu_lost must be a command line (a non-empty string)")
        config.on_gpu_lost = table["on_gpu_lost"]
    if "routing" in table:
        config.routing = check_routing(table["routing"], f"{source}: routing")
    if "evict_to" in table:
        if table["evict_to"] not in ("unload", "cpu"):
            raise ConfigError(f'{source}: evict_to must be "unload" or "cpu"')
        config.evict_to = table["evict_to"]
    if "history_days" in table:
        config.history_days = check_history_days(table["history_days"], f"{source}: history_days")
    if "alerts" in table:
        config.alerts = alert_settings(table["alerts"], source)
    if "gpu" in table:
        gpu = table["gpu"]
        if not isinstance(gpu, dict) or not all(isinstance(v, bool) for v in gpu.values()):
            raise ConfigError(f"{source}: [gpu] must map node URLs to true/false")
        config.gpu = {_urls([url], source, "[gpu]")[0]: flag for url, flag in gpu.items()}
    if "gpu_metrics" in table:
        exporters = table["gpu_metrics"]
        if not isinstance(exporters, dict) or not all(isinstance(v, str) for v in exporters.values()):
            raise ConfigError(f"{source}: [gpu_metrics] must map node URLs to exporter URLs (strings)")
        config.gpu_metrics = {
            _urls([node], source, "[gpu_metrics]")[0]: _exporter(url, f"{source}: [gpu_metrics] {node}")
            for node, url in exporters.items()
        }


def _exporter(raw: str, where: str) -> str:
    """A GPU exporter address (`host:9400` -> `http://host:9400/metrics`), or a ConfigError naming `where`."""
    from flockparse.gpu_metrics import exporter_url

    try:
        return exporter_url(raw)
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def gpu_metrics_flags(values: list[str]) -> dict[str, str]:
    """`--gpu-metrics NODE_URL=EXPORTER_URL` (repeatable) -> {node: exporter}; one-line ConfigError."""
    exporters: dict[str, str] = {}
    for value in values:
        node, sep, exporter = value.partition("=")
        if not sep or not node.strip() or not exporter.strip():
            raise ConfigError(f"--gpu-metrics {value!r}: expected NODE_URL=EXPORTER_URL")
        where = f"--gpu-metrics {node.strip()}"
        exporters[_urls([node], "--gpu-metrics", "NODE_URL")[0]] = _exporter(exporter, where)
    return exporters


def load_config(
    config_file: str | None = None,
    nodes_flag: str | None = None,
    priority_flag: str | None = None,
    interval_flag: float | str | None = None,
    health_interval_flag: float | str | None = None,
    timeout_flag: float | str | None = None,
    env: dict[str, str] | None = None,
    load_timeout_flag: float | str | None = None,
    routing_flag: str | None = None,
    gpu_metrics_flag: list[str] | None = None,
) -> Config:
    """Build the effective Config: flags > file > $OLLAMA_HOST > default. Every mistake is a ConfigError."""
    env = os.environ if env is None else env
    if config_file is not None and not Path(config_file).is_file():
        what = "is not a file" if Path(config_file).exists() else "does not exist"
        raise ConfigError(f"--config {config_file} {what}")
    path = Path(config_file) if config_file else config_dir(env) / "config.toml"
    config = Config(path=path)
    table = read_file(path)
    apply_table(config, table, str(path))
    if nodes_flag is not None:
        config.nodes = _urls([url for url in nodes_flag.split(",") if url.strip()], "--nodes", "URL")
        if not config.nodes:
            raise ConfigError("--nodes: no node URL given")
        config.nodes_from = "flag"
    elif "nodes" not in table and env.get("OLLAMA_HOST", "").strip():  # only read when it is used
        try:
            config.nodes = [ollama_host_url(env["OLLAMA_HOST"])]
        except ConfigError as exc:
            raise ConfigError(f"$OLLAMA_HOST: {exc} (or pass --nodes)") from None
        config.nodes_from = "env"
    config.gpu_metrics.update(gpu_metrics_flags(gpu_metrics_flag or []))
    return apply_flags(
        config,
        priority_flag,
        interval_flag,
        health_interval_flag,
        timeout_flag,
        load_timeout_flag,
        routing_flag,
    )


def apply_flags(
    config: Config,
    priority_flag: str | None = None,
    interval_flag: float | str | None = None,
    health_interval_flag: float | str | None = None,
    timeout_flag: float | str | None = None,
    load_timeout_flag: float | str | None = None,
    routing_flag: str | None = None,
) -> Config:
    """The flags other than --nodes and --config, checked the same way as the file's keys."""
    if routing_flag is not None:
        config.routing = check_routing(routing_flag, "--routing")
    if priority_flag is not None:
        config.priority_models = priority_list(priority_flag.split(","), "--priority")
    for key, flag in (
        ("interval", interval_flag),
        ("health_interval", health_interval_flag),
        ("timeout", timeout_flag),
        ("load_timeout", load_timeout_flag),
    ):
        if flag is not None:
            setattr(config, key, check_seconds(flag, key, f"--{key.replace('_', '-')}", named=True))
    return config


# ---------------------------------------------------------------- persistence


def dumps(table: dict[str, Any]) -> str:
    """A whole table as TOML text (used for a new file)."""
    return tomlkit.dumps(table)


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """An exclusive advisory lock on `<file>.lock` next to the real file, held while we read-modify-write.

    The lock is on a side file because the config itself is replaced (a new inode) by every save.
    """
    lock_path = path.with_name(f".{path.name}.lock")
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            import fcntl
        except ImportError:  # not POSIX: no advisory locks; saves are still atomic
            yield
            return
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def atomic_write(path: Path, text: str, mode: int | None = None) -> None:
    """Temp file in the same directory, fsync, os.replace: readers never see half a file.

    `mode` is the permission bits to keep (the old file's); a new file gets 0600 (it may name hosts).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            if mode is not None:
                os.fchmod(handle.fileno(), mode)
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def update_nodes(
    path: Path,
    add: str | None = None,
    remove: str | None = None,
    gpu: dict[str, bool] | None = None,
    base: list[str] | None = None,
    base_gpu: dict[str, bool] | None = None,
) -> list[str]:
    """Apply one node change to the file's own list, under a lock, keeping comments, layout and mode.

    The file is re-read inside the lock, so a change made meanwhile by another console or script is kept.
    `base` is the list to start from when the file has no `nodes` key yet (the default node, so that a
    first `add_node` keeps using it) with its declared GPU flags `base_gpu`. Returns the node list now
    saved. Raises ConfigError or OSError.
    """
    real = Path(os.path.realpath(path))  # write through a symlink, never replace the link itself
    real.parent.mkdir(parents=True, exist_ok=True)
    with locked(real):
        try:
            data = real.read_bytes()
            mode: int | None = stat.S_IMODE(real.stat().st_mode)
        except FileNotFoundError:
            data, mode = NEW_FILE_HEADER.encode(), None
        table = _parse(data, path)  # validates the encoding and syntax first, with the same one-line error
        apply_table(Config(), table, str(path))
        doc = tomlkit.parse(data.decode("utf-8"))
        declared = dict(gpu or {})
        if "nodes" not in doc:
            doc["nodes"] = tomlkit.array()
            for url in base or []:
                doc["nodes"].append(url)
            declared = {**(base_gpu or {}), **declared}
        nodes: Array = doc["nodes"]
        current = [normalize_url(str(url)) for url in nodes]
        if add is not None and add not in current:
            nodes.append(add)
            current.append(add)
        if remove is not None:
            for index in reversed([i for i, url in enumerate(current) if url == remove]):
                del nodes[index]
                del current[index]
        _update_gpu_table(doc, current, declared)
        atomic_write(real, tomlkit.dumps(doc), mode)
    return current


def _update_gpu_table(doc: Any, nodes: list[str], declared: dict[str, bool]) -> None:
    """Add the declared flags, drop entries of nodes no longer in the list; no empty [gpu] left behind."""
    table: Table | None = doc.get("gpu")
    if table is None:
        if not any(url in nodes for url in declared):
            return
        table = tomlkit.table()
        doc["gpu"] = table
    for url, flag in declared.items():
        if url in nodes:
            table[url] = flag
    for key in list(table.keys()):
        try:
            url = normalize_url(key)
        except ConfigError:
            continue
        if url not in nodes:
            del table[key]
    if not table:
        del doc["gpu"]
