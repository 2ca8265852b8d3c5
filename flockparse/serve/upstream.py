"""serve's calls to the nodes (aiohttp client), under the project's hostile-node rules, stated once here.

flockparse/transport.py explains the rules for the core's synchronous client; the asynchronous one keeps
them the same way:
- connecting takes at most `connect_timeout`; a reply's headers come within its deadline (for a generation
  that includes a model load, `request_timeout`); a whole (non-streamed) reply is read within that same
  deadline; a stream may then pause at most `chunk_timeout` between two chunks (a hung node mid-stream);
- every reply is read with a counted cap (`transport.reply_limit` per path; STREAM_MAX_BYTES for a stream)
  and never buffered past it; a stream is relayed as it comes, only its last line is kept (the final
  object: done, metrics, or Ollama's error line);
- redirects are never followed (`allow_redirects=False`; a 3xx is an error naming where it pointed);
  `Accept-Encoding: identity` is sent and a reply with any other Content-Encoding is refused
  (`auto_decompress=False`: a gzip bomb costs nothing);
- every failure is a `transport.NodeError` whose message is one phrase in the transport's words
  (`transport.describe`): `connection refused`, `did not answer /api/chat within 300s`, ...

One ClientSession (one connection pool) per server, sized for MAX_STREAMS concurrent streams per node;
proxy variables from the environment are ignored, as by the core's transport.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from typing import Any

import aiohttp

from flockparse.transport import MIB, NodeError, describe

MAX_STREAMS = 256  # concurrent requests per node the pool holds open (256 streams, the bench's figure)
STREAM_MAX_BYTES = 256 * MIB  # one streamed reply, at most (~2 million tokens of NDJSON)
ERROR_BODY_MAX = 64 * 1024  # the body of a node's error reply (Ollama's are one short JSON object)
CHUNK_TIMEOUT_S = 60.0  # a stream that sends nothing this long mid-generation is a hung node
LINE_MAX_BYTES = 16 * MIB  # a stream's last line is kept up to this (a final object carries `context`)
UPSTREAM_HEADERS = {"Accept-Encoding": "identity", "Content-Type": "application/json"}


def new_session(max_per_node: int = MAX_STREAMS) -> aiohttp.ClientSession:
    """The server's one connection pool (create it inside the running event loop)."""
    connector = aiohttp.TCPConnector(limit=0, limit_per_host=max_per_node, ttl_dns_cache=60)
    return aiohttp.ClientSession(
        connector=connector,
        auto_decompress=False,  # Ollama never compresses; a compressed reply is refused, never inflated
        trust_env=False,  # nodes are reached directly: no proxy from HTTP_PROXY and friends
        skip_auto_headers=("User-Agent", "Accept-Encoding", "Content-Type"),
        timeout=aiohttp.ClientTimeout(total=None),  # deadlines are per call (see `open_reply`)
    )


async def open_reply(
    session: aiohttp.ClientSession,
    method: str,
    node: str,
    path: str,
    body: bytes | None,
    headers: Mapping[str, str],
    *,
    connect_timeout: float,
    timeout: float,
) -> aiohttp.ClientResponse:
    """Send one request and wait for the reply's headers within `timeout` (connecting within
    `connect_timeout`); a redirect or a compressed reply is refused. NodeError on any failure."""
    per_call = aiohttp.ClientTimeout(total=None, connect=None, sock_connect=connect_timeout, sock_read=None)
    try:
        async with asyncio.timeout(timeout):
            response = await session.request(
                method,
                node + path,
                data=body,
                headers={**headers, **UPSTREAM_HEADERS},
                allow_redirects=False,
                timeout=per_call,
            )
    except aiohttp.ConnectionTimeoutError:
        raise NodeError(
            "timeout", f"{node} did not accept a connection within {connect_timeout:g}s"
        ) from None
    except TimeoutError:
        raise NodeError("timeout", f"{node} did not answer {path} within {timeout:g}s") from None
    except (aiohttp.ClientError, OSError) as exc:
        raise failure(node, path, exc, replied=False) from None
    try:
        _refuse_redirect_or_encoding(node, path, response)
    except NodeError:
        response.close()
        raise
    return response


async def read_whole(
    response: aiohttp.ClientResponse, node: str, path: str, timeout: float, limit: int
) -> bytes:
    """The whole body within `timeout`, never more than `limit` bytes read (a declared larger size is not
    read at all). NodeError on any failure; the connection is closed then."""
    if response.content_length is not None and response.content_length > limit:
        response.close()
        raise _too_large(node, path, limit)
    parts: list[bytes] = []
    total = 0
    try:
        async with asyncio.timeout(timeout):
            while data := await response.content.readany():
                total += len(data)
                if total > limit:
                    raise _too_large(node, path, limit)
                parts.append(data)
    except TimeoutError:
        response.close()
        raise NodeError("timeout", f"{node} did not send its {path} reply within {timeout:g}s") from None
    except NodeError:
        response.close()
        raise
    except (aiohttp.ClientError, OSError) as exc:
        response.close()
        raise failure(node, path, exc, replied=True) from None
    return b"".join(parts)


class ChunkReader:
    """A streamed reply's chunks as they come: at most `chunk_timeout` between two, STREAM_MAX_BYTES in all.

    `next()` gives the next bytes (b"" at the end); it raises NodeError on a pause too long, a cap passed or
    a connection lost mid-body. `final_line()` is the stream's last line (kept up to LINE_MAX_BYTES; earlier
    lines are relayed and forgotten): Ollama's final object (done, metrics) or its error line.
    """

    def __init__(
        self,
        response: aiohttp.ClientResponse,
        node: str,
        path: str,
        chunk_timeout: float = CHUNK_TIMEOUT_S,
        limit: int = STREAM_MAX_BYTES,
    ) -> None:
        self.response, self.node, self.path = response, node, path
        self.chunk_timeout, self.limit = chunk_timeout, limit
        self.total = 0
        self._line = bytearray()  # the line being received
        self._line_too_long = False
        self._last_line: bytes | None = b""  # the last complete line (None: it was too long to keep)

    async def next(self) -> bytes:
        try:
            async with asyncio.timeout(self.chunk_timeout):
                data = await self.response.content.readany()
        except TimeoutError:
            raise NodeError(
                "timeout",
                f"{self.node} sent nothing for {self.chunk_timeout:g}s in the middle of {self.path}",
            ) from None
        except (aiohttp.ClientError, OSError) as exc:
            raise failure(self.node, self.path, exc, replied=True) from None
        self.total += len(data)
        if self.total > self.limit:
            raise _too_large(self.node, self.path, self.limit)
        self._track_lines(data)
        return data

    def _track_lines(self, data: bytes) -> None:
        start = 0
        while (end := data.find(b"\n", start)) != -1:
            self._keep(data[start:end])
            self._last_line = None if self._line_too_long else bytes(self._line)
            self._line.clear()
            self._line_too_long = False
            start = end + 1
        self._keep(data[start:])

    def _keep(self, piece: bytes) -> None:
        if self._line_too_long or not piece:
            return
        if len(self._line) + len(piece) > LINE_MAX_BYTES:
            self._line_too_long = True
            self._line.clear()
            return
        self._line += piece

    def final_line(self) -> bytes | None:
        """The stream's last line (a line not ended by a newline counts); None when too long to keep."""
        if self._line or self._line_too_long:
            return None if self._line_too_long else bytes(self._line)
        return self._last_line


def final_object(line: bytes | None) -> Any:
    """A final line (or a whole reply) parsed when it is JSON, else None."""
    if not line:
        return None
    try:
        return json.loads(line)
    except (ValueError, RecursionError):
        return None


def failure(node: str, path: str, exc: BaseException, replied: bool) -> NodeError:
    """One phrase for a failed call, in the transport's words."""
    if isinstance(exc, aiohttp.ClientConnectorError):
        reason, phrase = describe(exc.os_error, connected=False)
        if reason == "unreachable":
            return NodeError(reason, f"{node} is unreachable ({phrase})")
        return NodeError(reason, f"cannot connect to {node}: {phrase}")
    if isinstance(exc, aiohttp.ServerDisconnectedError | aiohttp.ClientPayloadError):
        if replied:
            return NodeError("error", f"{node}: {path} failed (the reply stopped before its end)")
        return NodeError("unreachable", f"{node}: {path} failed (closed the connection without a reply)")
    if isinstance(exc, aiohttp.ClientResponseError):
        return NodeError("error", f"{node}: {path} failed (the reply is not HTTP)")
    reason, phrase = describe(exc)
    return NodeError(reason, f"{node}: {path} failed ({phrase})")


def _refuse_redirect_or_encoding(node: str, path: str, response: aiohttp.ClientResponse) -> None:
    if 300 <= response.status < 400:
        where = response.headers.get("Location") or "nowhere"
        raise NodeError(
            "error", f"{node} answered {path} with a redirect to {where[:200]}; redirects are not followed"
        )
    encoding = (response.headers.get("Content-Encoding") or "identity").strip().lower()
    if encoding != "identity":
        raise NodeError(
            "error",
            f"{node} sent a {encoding[:40]}-encoded {path} reply; only plain (identity) replies are read",
        )


def _too_large(node: str, path: str, limit: int) -> NodeError:
    size = f"{limit // MIB} MiB" if limit >= MIB else f"{limit // 1024} KiB"
    return NodeError("error", f"{node} sent a {path} reply too large to read (over {size})")


def as_text(raw: bytes, limit: int = 200) -> str:
    """A node's error body as one short text: Ollama's `{"error": ...}`, else the start of the body."""
    try:
        value: Any = json.loads(raw)
    except ValueError:
        value = None
    if isinstance(value, dict) and isinstance(value.get("error"), str):
        return value["error"][:limit]
    return raw[:limit].decode("utf-8", "replace").strip()
