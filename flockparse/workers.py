"""ElasticPool: a few daemon threads that run short blocking calls (status reads), growing past a hung node.

Why not a thread per call: at 5,000 nodes the health check makes 1,000 reads a second, and starting a
thread costs about as much CPU as the read itself. Why not a fixed ThreadPoolExecutor: a hung node holds
its worker for its whole timeout, so a few hung nodes would queue every healthy node's read behind them
(a report would then call healthy nodes stale), and its workers are not daemon threads.

So: tasks wait in one FIFO; `min_workers` threads take them, an idle one woken last-in first-out (so
the workers a burst added stay idle and end, rather than all being kept alive by a round-robin).
Whenever the oldest waiting task has waited longer than `max_wait` and no worker is idle, more workers
are started (half as many again as there are, at least one, at most `max_workers` in all): healthy bursts
are absorbed by the workers already there, while each hung node soon gets a replacement, and a hung node
blocks one worker for at most its call's timeout. Workers above `min_workers` end after `idle_seconds`
without work. Every thread is a daemon: nothing here holds the interpreter at exit.

The lock guards the queue and the counters only; tasks run outside it.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

logger = logging.getLogger(__name__)


class ElasticPool:
    """See the module docstring. `submit(work)` returns a Future of `work()`; `close()` drops what waits."""

    def __init__(
        self,
        name: str,
        min_workers: int = 8,
        max_workers: int = 4096,
        max_wait: float = 0.1,
        idle_seconds: float = 30.0,
    ) -> None:
        self.name = name
        self.min_workers = max(1, min_workers)
        self.max_workers = max(self.min_workers, max_workers)
        self.max_wait = max_wait
        self.idle_seconds = idle_seconds
        self._lock = threading.Lock()
        self._idle_stack: list[_Idle] = []  # idle workers, the most recently idle last (woken first)
        self._backlog = threading.Condition(self._lock)  # wakes the watcher when tasks start waiting
        self._tasks: collections.deque[tuple[float, Future, Callable[[], Any]]] = collections.deque()
        self._workers = 0
        self._watcher_alive = False
        self._watcher_parked = False  # the watcher sleeps without a timeout: nothing waits or runs
        self._closed = False
        self.peak_workers = 0  # the most workers alive at once (benchmarks report it)

    # ------------------------------------------------------------------ public
    def submit(self, work: Callable[[], Any]) -> Future:
        future: Future = Future()
        with self._lock:
            if self._closed:
                future.cancel()
                future.set_running_or_notify_cancel()
                return future
            self._tasks.append((time.monotonic(), future, work))
            if self._idle_stack:
                idle = self._idle_stack.pop()
                idle.woken = True
                idle.event.set()
            elif self._workers < self.min_workers:
                self._start_workers(1)
            if not self._watcher_alive:
                self._watcher_alive = True
                threading.Thread(target=self._watch, name=f"{self.name}-watch", daemon=True).start()
            elif self._watcher_parked:
                self._watcher_parked = False
                self._backlog.notify()
        return future

    @property
    def workers(self) -> int:
        with self._lock:
            return self._workers

    @property
    def waiting(self) -> int:
        with self._lock:
            return len(self._tasks)

    def close(self) -> None:
        """Cancel what waits; running tasks finish on their own (daemon threads); workers then end."""
        with self._lock:
            self._closed = True
            pending, self._tasks = list(self._tasks), collections.deque()
            idle, self._idle_stack = self._idle_stack, []
            for worker in idle:
                worker.woken = True  # out of the stack: a worker timing out now must not remove itself
            self._backlog.notify_all()
        for worker in idle:
            worker.event.set()
        for _, future, _ in pending:
            future.cancel()

    # ------------------------------------------------------------------ threads
    def _start_workers(self, count: int) -> None:
        """Lock held."""
        count = min(count, self.max_workers - self._workers)
        for _ in range(count):
            self._workers += 1
            threading.Thread(target=self._work, name=f"{self.name}-{self._workers}", daemon=True).start()
        self.peak_workers = max(self.peak_workers, self._workers)

    def _work(self) -> None:
        me = _Idle()
        while True:
            with self._lock:
                if self._tasks:
                    _, future, work = self._tasks.popleft()
                elif self._closed:
                    self._workers -= 1
                    return
                else:
                    me.woken = False
                    me.event.clear()
                    self._idle_stack.append(me)
                    future = None
            if future is None:
                if not me.event.wait(self.idle_seconds):
                    with self._lock:
                        if not me.woken and self._workers > self.min_workers:
                            self._idle_stack.remove(me)  # rare: only surplus workers time out
                            self._workers -= 1
                            return
                        if not me.woken:
                            self._idle_stack.remove(me)
                continue
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(work())
            except BaseException as error:  # a task's failure is its Future's, never the worker's end
                future.set_exception(error)

    def _watch(self) -> None:
        """While tasks wait or run, look every `max_wait / 2`: grow the pool when the oldest waiting task
        has waited past `max_wait` and no worker is idle. Parked (no timeout) while the pool is idle."""
        with self._lock:
            while not self._closed:
                if not self._tasks and self._workers == len(self._idle_stack):
                    self._watcher_parked = True
                    self._backlog.wait()
                    self._watcher_parked = False
                    continue
                starved = self._tasks and not self._idle_stack and self._workers < self.max_workers
                if starved and time.monotonic() - self._tasks[0][0] >= self.max_wait:
                    self._start_workers(max(1, self._workers // 2))
                self._backlog.wait(self.max_wait / 2)
            self._watcher_alive = False


class _Idle:
    """An idle worker: woken by `event` when a task is handed to it (`woken` says it was)."""

    __slots__ = ("event", "woken")

    def __init__(self) -> None:
        self.event = threading.Event()
        self.woken = False
