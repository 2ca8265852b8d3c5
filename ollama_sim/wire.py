"""Ollama's wire texts, written the way its Go code writes them; no state, no threads, no I/O.

Owns: Go's duration and keep_alive parsing (with Go's error texts), RFC 3339 timestamps, the JSON decoding
errors gin and encoding/json produce, request decoding per Go request struct, Options.FromMap (option type
errors), ApiError (an error reply), model-name syntax and the constants the wire shows (FOREVER_NS,
VERSION, BUSY_TEXT).

Reading order: durations and keep_alive -> timestamps -> decode_request -> parse_options.
"""

from __future__ import annotations

import contextlib
import json
import re
import time
from datetime import UTC, datetime
from typing import Any

FOREVER_NS = 2**63 - 1  # Go's time.Duration(math.MaxInt64): keep_alive < 0
VERSION = "0.33.0-rc2"
BUSY_TEXT = "server busy, please try again.  maximum pending requests exceeded"


def go_quote(text: str) -> str:
    """strconv.Quote / %q for the texts we meet (JSON escaping is the same for ASCII)."""
    return json.dumps(text, ensure_ascii=False)


_DURATION_UNITS = {"ns": 1, "us": 1e3, "µs": 1e3, "μs": 1e3, "ms": 1e6, "s": 1e9, "m": 60e9, "h": 3600e9}


def parse_go_duration(text: str) -> int:
    """Go's time.ParseDuration, in ns, with Go's error texts ('time: missing unit in duration "-1"')."""
    quoted = go_quote(text)
    rest, negative = text, False
    if rest[:1] in ("+", "-"):
        negative, rest = rest[0] == "-", rest[1:]
    if rest == "0":
        return 0
    if not rest:
        raise ValueError(f"time: invalid duration {quoted}")
    total = 0.0
    while rest:
        number = re.match(r"(\d*)(\.\d*)?", rest)
        whole, frac = number.group(1), number.group(2) or ""
        if not whole and frac in ("", "."):
            raise ValueError(f"time: invalid duration {quoted}")
        rest = rest[number.end() :]
        unit = re.match(r"[^\d.]*", rest).group(0)
        if not unit:
            raise ValueError(f"time: missing unit in duration {quoted}")
        if unit not in _DURATION_UNITS:
            raise ValueError(f"time: unknown unit {go_quote(unit)} in duration {quoted}")
        total += float((whole or "0") + frac) * _DURATION_UNITS[unit]
        rest = rest[len(unit) :]
    return -int(total) if negative else int(total)


def parse_keep_alive(value: Any) -> int | None:
    """api.Duration.UnmarshalJSON: number = seconds, string = Go duration, < 0 = forever, None = unset."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError("Unsupported type: 'bool'")
    if isinstance(value, int | float):
        return FOREVER_NS if value < 0 else int(value * 1e9)
    if isinstance(value, str):
        ns = parse_go_duration(value)
        return FOREVER_NS if ns < 0 else ns
    go_type = "[]interface {}" if isinstance(value, list) else "map[string]interface {}"
    raise ValueError(f"Unsupported type: '{go_type}'")


def parse_env_keep_alive(value: str | int | float) -> int:
    """OLLAMA_KEEP_ALIVE: like the API, but a bare integer string means seconds ("-1" works there)."""
    if isinstance(value, int | float):
        return parse_keep_alive(value)  # type: ignore[return-value]
    with contextlib.suppress(ValueError):
        return parse_keep_alive(float(value))  # type: ignore[return-value]
    return parse_keep_alive(value)  # type: ignore[return-value]


def rfc3339(ns: int, utc: bool) -> str:
    """Go's RFC3339Nano: nanoseconds with trailing zeros trimmed; 'Z' for a zero offset."""
    seconds, nanos = divmod(ns, 10**9)
    moment = datetime.fromtimestamp(seconds, UTC)
    if not utc:
        moment = moment.astimezone()
    text = moment.strftime("%Y-%m-%dT%H:%M:%S")
    if nanos:
        text += "." + f"{nanos:09d}".rstrip("0")
    offset = moment.utcoffset()
    if not offset:
        return text + "Z"
    minutes = int(offset.total_seconds() // 60)
    sign = "+" if minutes >= 0 else "-"
    return f"{text}{sign}{abs(minutes) // 60:02d}:{abs(minutes) % 60:02d}"


def created_at() -> str:
    return rfc3339(time.time_ns(), utc=True)


def _go_json_error(body: bytes, err: json.JSONDecodeError) -> str:
    """The Go decoder's wording for the common malformed bodies (truncated, or a stray character)."""
    if err.pos >= len(body.rstrip()):
        return "unexpected EOF"
    wanted = "object key string" if err.msg.startswith("Expecting property name") else "value"
    return f"invalid character '{err.doc[err.pos]}' looking for beginning of {wanted}"


_JSON_KIND = {str: "string", bool: "bool", int: "number", float: "number", list: "array", dict: "object"}
# Go types of the request fields we check, per request struct (only the fields clients really send).
_FIELD_TYPES: dict[str, dict[str, tuple[type, str]]] = {
    "GenerateRequest": {
        "model": (str, "string"),
        "prompt": (str, "string"),
        "suffix": (str, "string"),
        "system": (str, "string"),
        "template": (str, "string"),
        "stream": (bool, "bool"),
        "raw": (bool, "bool"),
        "options": (dict, "map[string]interface {}"),
        "context": (list, "[]int"),
    },
    "ChatRequest": {
        "model": (str, "string"),
        "messages": (list, "[]api.Message"),
        "stream": (bool, "bool"),
        "options": (dict, "map[string]interface {}"),
    },
    "EmbedRequest": {"model": (str, "string"), "options": (dict, "map[string]interface {}")},
    "EmbeddingRequest": {
        "model": (str, "string"),
        "prompt": (str, "string"),
        "options": (dict, "map[string]interface {}"),
    },
    "ShowRequest": {"model": (str, "string"), "name": (str, "string"), "verbose": (bool, "bool")},
}


class ApiError(Exception):
    """An error reply: status + the exact `{"error": text}` Ollama sends."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def decode_request(body: bytes, go_struct: str) -> dict:
    """Decode a JSON body like gin's ShouldBindJSON would, raising ApiError(400) with Go's texts."""
    if not body.strip():
        raise ApiError(400, "missing request body")
    try:
        data = json.loads(body)
    except json.JSONDecodeError as err:
        raise ApiError(400, _go_json_error(body, err)) from None
    if not isinstance(data, dict):
        kind = _JSON_KIND.get(type(data), "null")
        raise ApiError(400, f"json: cannot unmarshal {kind} into Go value of type api.{go_struct}")
    for key, (py_type, go_type) in _FIELD_TYPES.get(go_struct, {}).items():
        value = data.get(key)
        if value is None:
            continue
        ok = isinstance(value, py_type) and not (py_type is not bool and isinstance(value, bool))
        if not ok:
            kind = _JSON_KIND.get(type(value), "null")
            raise ApiError(
                400, f"json: cannot unmarshal {kind} into Go struct field {go_struct}.{key} of type {go_type}"
            )
    try:
        data["_keep_alive_ns"] = parse_keep_alive(data.get("keep_alive"))
    except ValueError as err:
        raise ApiError(400, str(err)) from None
    return data


_INT_OPTIONS = ("num_ctx", "num_batch", "num_gpu", "main_gpu", "num_thread", "num_predict", "num_keep")
_INT_OPTIONS += ("seed", "top_k", "repeat_last_n")
_BOOL_OPTIONS = ("use_mmap", "use_mlock", "numa")


def parse_options(options: dict | None) -> dict:
    """Options.FromMap: wrong types are a 500 with Go's text; unknown keys are ignored."""
    parsed: dict = {}
    for key, value in (options or {}).items():
        if value is None:
            continue
        if key in _INT_OPTIONS:
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ApiError(500, f"option {go_quote(key)} must be of type integer")
            parsed[key] = int(value)
        elif key in _BOOL_OPTIONS:
            if not isinstance(value, bool):
                raise ApiError(500, f"option {go_quote(key)} must be of type boolean")
            parsed[key] = value
        else:
            parsed[key] = value
    return parsed


NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-/]*(:[A-Za-z0-9_][A-Za-z0-9_.\-]*)?$")


def go_value(value: Any) -> str:
    """Go's %#v for the option values a Modelfile stores: numbers bare, strings quoted."""
    if isinstance(value, str):
        return go_quote(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)
