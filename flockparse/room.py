"""Room on the GPU: does a model fit on a node, and what to unload to make room. Pure functions.

Why the tool decides this itself: when a load does not fit, Ollama makes room by its own order (the
shortest keep_alive first, then the blob's file name; an idle runner before a busy one, sched.go
findRunnerToUnload), which knows nothing of priorities. Left to Ollama, moving a priority model can unload
a higher one, and two priority models that do not fit together swap forever. So the optimizer unloads
lower-ranked, idle models first, and never moves a model whose load could push out a higher one.

What is known of a node's VRAM (`VramBounds`, in MB as /api/ps reports it):
- `floor`: the most VRAM its models were ever seen to hold at once; the GPU has at least that;
- `ceiling`: learned when Ollama had to unload models to load another (what was held, plus what the new
  one needed, did not fit), or the exporter's figure; unknown until then;
- `too_big`: sets of models seen not to fit together (that model and those on the GPU when Ollama had to
  unload some of them for it): any set holding one of them does not fit either, whatever the sizes say.
Ollama's pre-flight (sched.go:547) loads a model next to others only if its predicted VRAM is at most 80%
of the free VRAM, so a model "fits" when `need <= 0.8 x (floor - held by the others)`, "does not fit" when
`need >= 0.8 x (ceiling - held by the others)`, and is "unknown" between the two.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from flockparse.rules import outranks

FIT_FRACTION = 0.8  # sched.go:547: predicted VRAM <= 80% of the free VRAM, else evict first
FITS, NO_FIT, UNKNOWN = "fits", "does_not_fit", "unknown"
MOVE, EVICT, NO_ROOM, BUSY = "move", "evict", "no_room", "busy"  # what a RoomPlan says to do
MB_PER_GB = 1024.0
MAX_TOO_BIG = 32  # sets of models remembered per node as not fitting together


@dataclass(frozen=True)
class VramBounds:
    """What a node's GPU can hold for Ollama's models, as far as it was seen (MB)."""

    floor_mb: float = 0.0
    ceiling_mb: float | None = None
    too_big: frozenset[frozenset[str]] = frozenset()

    def seen(self, held_mb: float, on_gpu: Iterable[str] = ()) -> VramBounds:
        """The models were seen holding `held_mb` together, `on_gpu` fully in VRAM: a ceiling below that, or
        a set of them said not to fit, was wrong (another program gave its VRAM back since): dropped."""
        floor = max(self.floor_mb, held_mb)
        ceiling = self.ceiling_mb if self.ceiling_mb is None or self.ceiling_mb > floor else None
        together = frozenset(on_gpu)
        too_big = frozenset(s for s in self.too_big if not s <= together)
        if (floor, ceiling, too_big) == (self.floor_mb, self.ceiling_mb, self.too_big):
            return self
        return VramBounds(floor, ceiling, too_big)

    def evicted(
        self, held_before_mb: float, need_mb: float, evicted_mb: Iterable[float], together: Iterable[str] = ()
    ) -> VramBounds:
        """Ollama unloaded `evicted_mb` to load a model needing `need_mb` next to `held_before_mb`: with all
        but the largest of them still loaded, it did not fit (sched.go:547-562 evicts one at a time).
        `together`: that model and every model in VRAM before; they do not fit together."""
        gone = sorted(evicted_mb)
        if not gone:
            return self
        still_held = held_before_mb - sum(gone[:-1])
        learned = still_held + need_mb / FIT_FRACTION
        ceiling = learned if self.ceiling_mb is None else min(self.ceiling_mb, learned)
        too_big = self.too_big
        if together:
            too_big = frozenset(sorted(too_big | {frozenset(together)}, key=len)[:MAX_TOO_BIG])
        return VramBounds(self.floor_mb, ceiling if ceiling > self.floor_mb else None, too_big)


@dataclass(frozen=True)
class Fit:
    verdict: str  # FITS | NO_FIT | UNKNOWN
    need_mb: float | None
    free_at_least_mb: float
    free_at_most_mb: float | None
    seen_not_fitting: tuple[str, ...] = ()  # the other models it was seen not to fit with


def fit(
    need_mb: float | None,
    held_by_others_mb: float,
    bounds: VramBounds,
    model: str = "",
    others: Iterable[str] = (),
) -> Fit:
    """Whether `model`, needing `need_mb` (None: not known), fits next to what the `others` hold."""
    at_least = max(0.0, bounds.floor_mb - held_by_others_mb)
    at_most = None if bounds.ceiling_mb is None else max(0.0, bounds.ceiling_mb - held_by_others_mb)
    proposed = frozenset([model, *others])
    clash = next((s for s in sorted(bounds.too_big, key=sorted) if model in s and s <= proposed), None)
    if clash is not None:
        return Fit(NO_FIT, need_mb, at_least, at_most, tuple(sorted(clash - {model})))
    if need_mb is None:
        return Fit(UNKNOWN, None, at_least, at_most)
    if need_mb <= FIT_FRACTION * at_least:
        return Fit(FITS, need_mb, at_least, at_most)
    if at_most is not None and need_mb >= FIT_FRACTION * at_most:
        return Fit(NO_FIT, need_mb, at_least, at_most)
    return Fit(UNKNOWN, need_mb, at_least, at_most)


def no_fit_text(result: Fit) -> str:
    """`does not fit: needs ~X GB, at most ~Y GB seen free` (Ollama keeps 20% of the free VRAM spare), or
    `does not fit next to A, B (Ollama had to unload them for it before)`."""
    if result.seen_not_fitting:
        names = ", ".join(result.seen_not_fitting)
        return f"does not fit next to {names} (Ollama had to unload some of them for it before)"
    need = (result.need_mb or 0.0) / MB_PER_GB
    free = (result.free_at_most_mb or 0.0) / MB_PER_GB
    return f"does not fit: needs ~{need:.1f} GB, at most ~{free:.1f} GB seen free"


@dataclass(frozen=True)
class Resident:
    """A model loaded on the node, as the room planner sees it."""

    name: str
    vram_mb: float
    rank: int | None  # None: not a priority model
    busy: bool  # requests routed through this tool are running on it now
    expires_at: str = ""  # RFC 3339: the one expiring first has been idle the longest (same keep_alive)


@dataclass(frozen=True)
class RoomPlan:
    action: str  # MOVE | EVICT (unload `victims`, then move) | NO_ROOM | BUSY (wait: a load could evict it)
    fit: Fit
    victims: tuple[Resident, ...] = ()
    message: str = ""


def plan_room(model: str, rank: int | None, need_mb: float | None, residents: Iterable[Resident],
              bounds: VramBounds) -> RoomPlan:  # fmt: skip
    """What to do to put `model` (of `rank`) fully on the GPU.

    Victims are only models it outranks (non-priority ones first, then the lowest priority), idle ones
    only, the longest idle first, and only as many as it takes to fit; nothing is unloaded when that would
    not be enough. When the fit is unknown, the move is tried as it is (Ollama evicts only if it must; the
    optimizer undoes a move that pushed out a higher model), unless a busy model holds VRAM: Ollama would
    wait for its requests and then unload it.
    """
    others = [r for r in residents if r.name != model and r.vram_mb > 0]

    def fit_without(gone: list[Resident]) -> Fit:
        left = [r for r in others if r not in gone]
        return fit(need_mb, sum(r.vram_mb for r in left), bounds, model, [r.name for r in left])

    now = fit_without([])
    if now.verdict == FITS:
        return RoomPlan(MOVE, now)
    busy = [r for r in others if r.busy]
    if now.verdict == UNKNOWN:
        if busy:
            return RoomPlan(BUSY, now, message=_busy_text(busy))
        return RoomPlan(MOVE, now)
    lower = [r for r in others if outranks(rank, r.rank)]
    order = sorted(
        (r for r in lower if not r.busy),
        key=lambda r: (r.rank is not None, -(r.rank or 0), r.expires_at, r.name),
    )
    victims: list[Resident] = []
    after = now
    for resident in order:
        if after.verdict != NO_FIT:
            break
        victims.append(resident)
        after = fit_without(victims)
    if after.verdict == NO_FIT:
        freed_by_busy = fit_without(lower)
        busy_lower = [r for r in lower if r.busy]
        if busy_lower and freed_by_busy.verdict != NO_FIT:
            return RoomPlan(BUSY, now, message=_busy_text(busy_lower))
        return RoomPlan(NO_ROOM, now, message=_no_room_text(now, [r for r in others if r not in lower]))
    if after.verdict == UNKNOWN and busy:
        return RoomPlan(BUSY, now, message=_busy_text(busy))
    if after.verdict == FITS:  # the greedy order may have taken one too many: keep what is not needed
        for victim in list(victims):
            spared = [v for v in victims if v is not victim]
            if fit_without(spared).verdict == FITS:
                victims = spared
    return RoomPlan(EVICT, now, tuple(victims))


def _busy_text(busy: list[Resident]) -> str:
    names = ", ".join(sorted(r.name for r in busy))
    return f"waiting: {names} {'is' if len(busy) == 1 else 'are'} serving requests and may not be unloaded"


def _no_room_text(result: Fit, kept: list[Resident]) -> str:
    text = no_fit_text(result)
    if kept:
        holders = ", ".join(f"{r.name} {r.vram_mb / MB_PER_GB:.1f} GB" for r in sorted(kept, key=_by_rank))
        text += f"; held by {holders}, not of lower priority"
    return text


def _by_rank(resident: Resident) -> tuple[bool, int, str]:
    return (resident.rank is None, resident.rank or 0, resident.name)
