"""GpuMetricsScraper: each node's GPU exporter read at most every 15 s, on threads of its own.

A GPU exporter is a peer like a node: it may be down, hang, or answer garbage or a huge page. So every
scrape goes through the node transport (flockparse/transport.py: a total deadline, a reply cap, no
redirects), runs on the scraper's own pool (never on the health monitor's checkers, never holding a
report or the prompt), one scrape per node at a time. A failed scrape keeps the last good figures,
marked stale with the error; a scrape never delays another node's. The lock guards the targets' figures
only; no I/O runs under it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from flockparse.events import Event
from flockparse.gpu_metrics.formats import (
    FORMAT_NAMES,
    ExporterPage,
    ExporterPageError,
    GpuFigures,
    memory_lines,
    parse_memory_lines,
)
from flockparse.transport import MIB, NodeError, NodeTransport
from flockparse.workers import ElasticPool

logger = logging.getLogger(__name__)

SCRAPE_INTERVAL_S = 15.0  # at most this often per node: exporters refresh every few seconds anyway
MAX_PAGE_BYTES = 4 * MIB  # a dcgm-exporter page with 8 GPUs and many pods is a few hundred KB
STALE_AFTER_INTERVALS = 3  # figures this many intervals old are stale even without a failed scrape
DEFAULT_PATH = "/metrics"


def exporter_url(raw: str) -> str:
    """An exporter address as the user wrote it -> `http://host:port/path`; ValueError, one line, if unusable.

    `host:9400` means `http://host:9400/metrics`; credentials are refused (they would be sent in clear
    to every scrape and shown in reports); only http and https.
    """
    text = str(raw).strip()
    if not text:
        raise ValueError("empty GPU exporter address")
    if "://" not in text:
        text = "http://" + text
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"not a usable GPU exporter address: {raw!r} ({exc})") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"not a usable GPU exporter address: {raw!r} (http://HOST:PORT/metrics)")
    if "@" in parts.netloc:
        raise ValueError(f"GPU exporter address with credentials is not supported: {raw!r}")
    if any(ch.isspace() or ord(ch) < 32 for ch in text) or port == 0:
        raise ValueError(f"not a usable GPU exporter address: {raw!r}")
    path = parts.path or DEFAULT_PATH
    query = f"?{parts.query}" if parts.query else ""
    return f"{parts.scheme}://{parts.netloc}{path}{query}"


@dataclass(frozen=True)
class GpuMemory:
    """One node's GPU memory as its exporter last showed it (MiB), summed over its GPUs.

    `scraped_at` (time.time()) is when the figures were read; None: never (then there are no figures).
    `stale`: the last scrape failed (`error` says why) or the figures are old; they are the last good ones.
    """

    node: str
    exporter: str
    format: str | None = None
    gpus: tuple[GpuFigures, ...] = ()
    scraped_at: float | None = None
    stale: bool = True
    error: str | None = None

    @property
    def known(self) -> bool:
        return self.scraped_at is not None

    @property
    def gpu_count(self) -> int | None:
        """How many GPUs the exporter lists; None while it never answered."""
        return len(self.gpus) if self.known else None

    @property
    def total_mb(self) -> float | None:
        return sum(g.total_mb for g in self.gpus) if self.known else None

    @property
    def used_mb(self) -> float | None:
        return sum(g.used_mb for g in self.gpus) if self.known else None

    @property
    def free_mb(self) -> float | None:
        return sum(g.free_mb for g in self.gpus) if self.known else None

    @property
    def reserved_mb(self) -> float | None:
        return sum(g.reserved_mb for g in self.gpus) if self.known else None

    @property
    def format_name(self) -> str | None:
        return FORMAT_NAMES.get(self.format or "", self.format)


@dataclass
class _Target:
    """One node's exporter and what it last gave. Guarded by the scraper's lock."""

    url: str
    page: ExporterPage | None = None
    lines: str = ""  # the memory lines `page` was parsed from: the same lines again are not parsed again
    scraped_at: float | None = None  # time.time() of the last good scrape
    scraped_mono: float | None = None  # ... and its time.monotonic()
    error: str | None = None
    due: float = 0.0  # time.monotonic() the next scrape is due
    in_flight: bool = False
    first_done: threading.Event = field(default_factory=threading.Event)


class GpuMetricsScraper:
    """Scrapes each node's exporter every `interval` seconds (at least 15 s apart in production).

    `on_scrape(node, memory)` is called after every attempt (outside the lock, on a scrape thread);
    `emit` gets one `gpu_metrics_failed` when an exporter stops giving figures and one `gpu_metrics_back`
    when it gives them again. After `close()` nothing is sent.
    """

    def __init__(
        self,
        exporters: Mapping[str, str] | None = None,
        timeout: float = 5.0,
        interval: float = SCRAPE_INTERVAL_S,
        on_scrape: Callable[[str, GpuMemory], None] | None = None,
        emit: Callable[[Event], None] | None = None,
        max_bytes: int = MAX_PAGE_BYTES,
    ) -> None:
        self.timeout = float(timeout)
        self.interval = float(interval)
        self.max_bytes = max_bytes
        self._on_scrape = on_scrape
        self._emit = emit
        self._transport = NodeTransport(max_idle_per_node=1)
        self._pool = ElasticPool("gpu-metrics", min_workers=2, max_wait=0.25, idle_seconds=10.0)
        self._lock = threading.Lock()
        self._targets: dict[str, _Target] = {}
        self._closed = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        for node, url in (exporters or {}).items():
            self.set_exporter(node, url)

    # ------------------------------------------------------------------ configuration
    def set_exporter(self, node: str, url: str | None) -> None:
        """Scrape `url` for `node` from now on (at once); None stops scraping it and forgets its figures."""
        with self._lock:
            old = self._targets.pop(node, None)
            if url is not None:
                self._targets[node] = _Target(exporter_url(url))
        if old is not None:
            self._transport.forget(_base(old.url))
        self._wake.set()

    @property
    def nodes(self) -> list[str]:
        with self._lock:
            return list(self._targets)

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        if self._thread is not None or self._closed.is_set():
            return
        self._thread = threading.Thread(target=self._loop, name="gpu-metrics", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop within a second; nothing is sent afterwards (a scrape in flight ends at its deadline)."""
        self._closed.set()
        self._wake.set()
        self._pool.close()
        self._transport.close()
        if self._thread is not None:
            self._thread.join(1.0)

    # ------------------------------------------------------------------ reading
    def memory(self, node: str) -> GpuMemory | None:
        """The node's figures as last scraped (None: no exporter for it). No network call."""
        with self._lock:
            target = self._targets.get(node)
            return None if target is None else self._snapshot(node, target)

    def scrape_soon(self, node: str) -> None:
        """Scrape `node`'s exporter at once, on the scrape threads (its models changed: the last figures
        describe the GPU before that)."""
        with self._lock:
            target = self._targets.get(node)
            if target is None or target.in_flight:
                return
            target.due = 0.0
        self._wake.set()

    def fresh(self, node: str) -> GpuMemory | None:
        """The node's figures read now, on the caller's thread (within the timeout): for a decision that
        must not rest on figures from before a change (room on the GPU: a job that ended a moment ago
        freed its VRAM). On a failed read, the last figures marked stale. None: no exporter."""
        with self._lock:
            if node not in self._targets:
                return None
        if not self._closed.is_set():
            self._scrape(node)
        return self.memory(node)

    def wait_first(self, nodes: Iterable[str], timeout: float) -> None:
        """Wait (at most `timeout` in all) until each node's first scrape has ended, well or not; one not
        begun yet (the loop is not started: a one-shot `vram_report`) is begun now. So a report right after
        start shows figures, never more than one deadline late, and never causes a second scrape."""
        deadline = time.monotonic() + timeout
        begin: list[str] = []
        with self._lock:
            targets = [(node, t) for node in nodes if (t := self._targets.get(node)) is not None]
            for node, target in targets:
                if not target.first_done.is_set() and not target.in_flight and not self._closed.is_set():
                    target.in_flight, target.due = True, time.monotonic() + self.interval
                    begin.append(node)
        for node in begin:
            self._pool.submit(lambda n=node: self._scrape(n))
        for event in [target.first_done for _, target in targets]:
            left = deadline - time.monotonic()
            if left <= 0 or self._closed.is_set():
                return
            event.wait(left)

    def _snapshot(self, node: str, target: _Target) -> GpuMemory:
        """Lock held."""
        page = target.page
        age = None if target.scraped_mono is None else time.monotonic() - target.scraped_mono
        # older than a missed scrape can make them (one interval and a deadline, twice): the loop is stuck
        old = age is not None and age > max(
            STALE_AFTER_INTERVALS * self.interval, 2 * (self.interval + self.timeout)
        )
        error = target.error
        if error is None and old:
            error = f"no new figures for {age:.0f}s"
        return GpuMemory(
            node=node,
            exporter=target.url,
            format=page.format if page else None,
            gpus=page.gpus if page else (),
            scraped_at=target.scraped_at,
            stale=error is not None or page is None,
            error=error,
        )

    # ------------------------------------------------------------------ the loop
    def _loop(self) -> None:
        """Hand each due node's scrape to the pool, then sleep until the next one is due (or a change)."""
        while not self._closed.is_set():
            now = time.monotonic()
            due: list[str] = []
            with self._lock:
                for node, target in self._targets.items():
                    if target.due <= now and not target.in_flight:
                        target.in_flight = True
                        target.due = now + self.interval
                        due.append(node)
                waits = [t.due - now for t in self._targets.values() if not t.in_flight]
            for node in due:
                self._pool.submit(lambda n=node: self._scrape(n))
            self._wake.wait(max(0.05, min(waits, default=self.interval)))
            self._wake.clear()

    def _scrape(self, node: str) -> None:
        with self._lock:
            target = self._targets.get(node)
            url = target.url if target is not None else None
        if target is None or url is None:
            return
        page: ExporterPage | None = None
        lines, error = "", None
        if self._closed.is_set():
            return
        try:
            lines, page = self._read(url, target)
        except (NodeError, ExporterPageError) as exc:
            error = str(exc)
        except Exception as exc:  # a bug must not stop this node's scrapes: logged, shown as the error
            logger.exception("scrape of %s failed", url)
            error = f"{type(exc).__name__}: {exc}"
        self._record(node, target, page, lines, error)

    def _read(self, url: str, target: _Target | None = None) -> tuple[str, ExporterPage]:
        """(memory lines, page) of one scrape; the last page again when its memory lines did not change
        (an idle GPU's figures stay the same; the parser, not the HTTP exchange, is most of the CPU)."""
        reply = self._transport.call(
            _base(url), "GET", _path(url), timeout=self.timeout, max_bytes=self.max_bytes
        )
        if reply.status != 200:
            raise ExporterPageError(f"{url} answered HTTP {reply.status}")
        lines = memory_lines(reply.text)
        with self._lock:
            last = target.page if target is not None and target.lines == lines else None
        if last is not None:
            return lines, last
        try:
            return lines, parse_memory_lines(lines, dcgm_page="DCGM_FI_" in reply.text)
        except ExporterPageError as exc:
            raise ExporterPageError(f"{url}: {exc}") from None

    def _record(
        self, node: str, target: _Target, page: ExporterPage | None, lines: str, error: str | None
    ) -> None:
        with self._lock:
            target.in_flight = False  # with the figures: the next scrape starts from this one's result
            if self._targets.get(node) is not target or self._closed.is_set():
                return  # removed, replaced or closed meanwhile
            was_failing = target.error is not None
            first = not target.first_done.is_set()
            if page is not None:
                target.page, target.lines, target.error = page, lines, None
                target.scraped_at, target.scraped_mono = time.time(), time.monotonic()
            else:
                target.error = error
            memory = self._snapshot(node, target)
        target.first_done.set()
        self._tell(node, memory, was_failing, first)
        if self._on_scrape is not None:
            try:
                self._on_scrape(node, memory)
            except Exception:  # the receiver's bug must not stop the scrapes
                logger.exception("gpu metrics receiver failed for %s", node)

    def _tell(self, node: str, memory: GpuMemory, was_failing: bool, first: bool) -> None:
        """One event when an exporter stops giving figures, one when it gives them again."""
        if self._emit is None:
            return
        if memory.error is not None and (first or not was_failing):
            kept = "its last figures are kept, marked stale" if memory.known else "no figures yet"
            message = f"the GPU exporter of {node} gives no figures: {memory.error} ({kept})"
            event = Event("gpu_metrics_failed", node=node, message=message, data={"error": memory.error})
        elif memory.error is None and was_failing:
            message = f"the GPU exporter of {node} answers again ({len(memory.gpus)} GPU(s))"
            event = Event("gpu_metrics_back", node=node, message=message, data={"exporter": memory.exporter})
        else:
            return
        self._emit(event)  # EventBus.emit never raises: it logs a failing subscriber itself


def _base(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


def _path(url: str) -> str:
    parts = urlsplit(url)
    return (parts.path or DEFAULT_PATH) + (f"?{parts.query}" if parts.query else "")
