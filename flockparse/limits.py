"""The process's file-descriptor budget: raised at start, and said in one line when it cannot suffice.

Why: each node keeps a keep-alive connection for its health checks and opens a second one while a report,
a pass or a move overlaps a check. With the usual soft `ulimit -n` of 1024 about 1,000 nodes already fail
with `Too many open files`, shown as healthy nodes going down. The hard limit is usually far higher, and a
process may raise its soft limit up to it without privileges, so the balancer does that at start; when
even the hard limit is too small it says so once, with how many nodes can be checked.
"""

from __future__ import annotations

import contextlib
import gc
import resource
from dataclasses import dataclass

DESCRIPTORS_PER_NODE = 3  # the poller's kept connection (checks, reports, passes), one more when a report
# overlaps a check, and the transport's kept one for /api/tags, /api/version and moves
RESERVED_DESCRIPTORS = 64  # standard streams, logs, history, the console's terminal, a remedy's pipes ...
UNLIMITED_TARGET = 1 << 20  # what an "unlimited" hard limit is raised to (the kernel's nr_open default)
GC_LARGE_CLUSTER = 1_000  # nodes from which the collector's young generation is enlarged (relax_gc)
GC_YOUNG_THRESHOLD = 50_000  # allocations between young collections then (CPython's default is 700)


@dataclass(frozen=True)
class FdBudget:
    """The soft and hard RLIMIT_NOFILE after the raise, and what it means for a cluster of `nodes`."""

    soft: int
    hard: int
    nodes: int

    @property
    def needed(self) -> int:
        return descriptors_needed(self.nodes)

    @property
    def checkable_nodes(self) -> int:
        """How many nodes fit in the soft limit."""
        return max(0, (self.soft - RESERVED_DESCRIPTORS) // DESCRIPTORS_PER_NODE)

    @property
    def enough(self) -> bool:
        return self.soft >= self.needed

    def warning(self) -> str | None:
        """One line when the cluster needs more descriptors than the process can have; None when it fits."""
        if self.enough:
            return None
        checkable = f"{self.checkable_nodes} node{'' if self.checkable_nodes == 1 else 's'}"
        return (
            f"{self.nodes} nodes need about {self.needed} open files but this process may have only "
            f"{self.soft} (hard limit {self.hard}): about {checkable} can be checked, the "
            f"others will show `too many open files`; raise `ulimit -n` to at least {self.needed} "
            "(or the hard limit in /etc/security/limits.conf) and start again"
        )


def descriptors_needed(nodes: int) -> int:
    return RESERVED_DESCRIPTORS + DESCRIPTORS_PER_NODE * max(0, nodes)


def raise_fd_limit(wanted: int | None = None) -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE towards the hard one (to `wanted` only, when given and lower);
    never lowers it. Returns (soft, hard) after. A refused raise leaves the limit as it was."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    ceiling = UNLIMITED_TARGET if hard == resource.RLIM_INFINITY else hard
    target = ceiling if wanted is None else min(ceiling, max(wanted, 0))
    if soft != resource.RLIM_INFINITY and target > soft:
        with contextlib.suppress(ValueError, OSError):  # refused: the limit stays as it was
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def fd_budget(nodes: int) -> FdBudget:
    """Raise the limit as far as it goes, then judge it for `nodes` nodes."""
    soft, hard = raise_fd_limit()
    unlimited = UNLIMITED_TARGET
    return FdBudget(
        soft=unlimited if soft == resource.RLIM_INFINITY else soft,
        hard=unlimited if hard == resource.RLIM_INFINITY else hard,
        nodes=nodes,
    )


def relax_gc(nodes: int) -> int:
    """Enlarge the cyclic collector's young generation for a large cluster; returns its threshold after.

    Why (issue 8, scale, measured with bench/scale.py): a steady pass over 5,000 nodes keeps thousands of
    reads, their futures and statuses alive for a second or two. With CPython's default threshold (700)
    they are promoted into the old generation and set off two or three full collections per pass, each
    walking every node's state with the interpreter lock held: 0.3 to 0.9 s of a 1.7 to 4 s pass. With
    50,000 they mostly die young; a pass then meets two or three young collections of about 0.05 s.
    Process-wide, like the descriptor limit; never lowered; below GC_LARGE_CLUSTER nodes left alone."""
    threshold, older, oldest = gc.get_threshold()
    if nodes >= GC_LARGE_CLUSTER and threshold < GC_YOUNG_THRESHOLD:
        gc.set_threshold(GC_YOUNG_THRESHOLD, older, oldest)
    return gc.get_threshold()[0]
