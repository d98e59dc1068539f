"""Fragmentation cleanup, the planning half: stranded memory, and the fewest moves to a hole.

Pure and deterministic: it reads a snapshot of the ledger (``GpuState``: each GPU's total and
its leases, each idle or busy, standing or not) and the models waiting for room (``Waiting``),
and touches nothing. The caller carries the moves out (release the idle pool, re-place it on
its destination, then place the waiting model).

``stranded`` reports, per GPU and per host, the free memory that no waiting model can use: a
GPU's free memory is usable when some waiting model fits on it alone, or when it can be part
of a split (for a model the catalog allows to split) that fits within its host; otherwise all
of it is stranded. With nothing waiting, every free byte counts as stranded.

``plan`` goes through the waiting models, higher priority first, on a working copy of the
state, so that each result applies to the state the next one sees and two models never get
the same hole:

* ``fits``: it fits one GPU as it is (the fullest that fits, as binpack does);
* ``split``: it may be split and a split fits within one host (the largest holes first);
* ``moves``: it fits no GPU, but moving idle pools off one GPU of a host to the other GPUs of
  that host makes a hole for it. Only idle leases are moved, never a busy pool, a standing
  reservation, or one part of a pool split across GPUs; each moved lease must fit its
  destination's free memory as the moves before it left it (a destination may take several);
* ``none``: no plan, with the reason.

The search for the fewest moves, per waiting model, over every (host, GPU) target whose host
has enough free memory in all:

* Exact: for k = 1, 2, … up to ``max_moves`` (and never past the best k found on another
  target), every k-subset of the target's movable leases is tried, fewest bytes first, and
  packed into the host's other GPUs (:mod:`app.scheduler.packing`: best-fit decreasing,
  then a complete backtracking search where that fails). Wherever a target's k-subsets
  number at most ``exact_limit`` (with the defaults, any GPU with up to 20 movable leases:
  C(20, 4) = 4845), the plan has the fewest moves over all targets, then the fewest bytes
  moved, then the lowest (host, GPU index): the same as a brute force over every subset
  and every assignment to destinations.
* Greedy past that bound (a GPU with very many small idle pools): the largest idle leases
  first, each best-fit into a destination, until the hole is big enough. Always a valid plan,
  but it may use more moves than necessary.

Models are planned one at a time (priority order), so the moves are fewest per model, not
over the whole batch. Only single-GPU holes are planned: a split is used where one fits as
things stand, but no moves are planned to make one fit.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from itertools import combinations
from typing import Literal

from app.scheduler.inventory import format_bytes
from app.scheduler.packing import pack

EXACT_LIMIT = 5000  # subsets of one size tried per target before going greedy
DEFAULT_MAX_MOVES = 4

Action = Literal["fits", "split", "moves", "none"]


@dataclass(frozen=True)
class PoolLease:
    """Memory one pool (or a standing reserve) holds on one GPU."""

    pool_id: str
    model: str
    bytes: int
    busy: bool = False  # serving now: never moved
    standing: bool = False  # a standing reservation: never moved


@dataclass(frozen=True)
class GpuState:
    """One GPU in the snapshot: its total memory and the leases on it."""

    host: str
    index: int
    total: int
    leases: tuple[PoolLease, ...] = ()

    @property
    def key(self) -> str:
        return f"{self.host}:{self.index}"

    @property
    def reserved(self) -> int:
        return sum(lease.bytes for lease in self.leases)

    def free(self, headroom: int = 0) -> int:
        """Bytes a new lease could take: total − leases − headroom (negative if over)."""
        return self.total - self.reserved - headroom


@dataclass(frozen=True)
class Waiting:
    """A model waiting for room: ``need_bytes`` on one GPU.

    A split over k GPUs of one host needs ``need_bytes + (k − 1) × split_overhead_bytes`` in
    all (each extra GPU has its own compute buffer and CUDA context), and each GPU of it must
    have more than ``split_overhead_bytes`` free. Layer granularity is not modelled.
    """

    model: str
    need_bytes: int
    split_allowed: bool = False
    priority: int = 0
    split_overhead_bytes: int = 0


@dataclass(frozen=True)
class Move:
    """Release an idle pool's lease on ``from_gpu`` and re-place it on ``to_gpu``."""

    pool_id: str
    model: str
    bytes: int
    from_gpu: str
    to_gpu: str


@dataclass(frozen=True)
class Plan:
    """What to do for one waiting model: where it goes, and the moves that make room first."""

    model: str
    need_bytes: int
    priority: int
    action: Action
    placement: tuple[tuple[str, int], ...] = ()  # (GPU key, bytes) the model takes
    moves: tuple[Move, ...] = ()
    reason: str = ""  # why there is no plan (action "none")

    @property
    def ok(self) -> bool:
        return self.action != "none"

    @property
    def bytes_moved(self) -> int:
        return sum(m.bytes for m in self.moves)


@dataclass(frozen=True)
class GpuReport:
    """One GPU's free memory, and how much of it no waiting model can use."""

    key: str
    host: str
    index: int
    free: int
    stranded: int


@dataclass(frozen=True)
class HostReport:
    """One host's free and stranded memory, and its largest hole (most free on one GPU)."""

    host: str
    free: int
    stranded: int
    largest_hole: int


@dataclass(frozen=True)
class Report:
    """Stranded memory per GPU and per host (GPUs and hosts in key order)."""

    gpus: tuple[GpuReport, ...]
    hosts: tuple[HostReport, ...]

    @property
    def free(self) -> int:
        return sum(h.free for h in self.hosts)

    @property
    def stranded(self) -> int:
        return sum(h.stranded for h in self.hosts)


# The working state --------------------------------------------------------------------------
@dataclass
class _Slot:
    host: str
    index: int
    total: int
    free: int
    leases: list[PoolLease] = field(default_factory=list)
    idle: int = 0  # bytes of the leases that may move: a bound on the hole moves can make

    @property
    def key(self) -> str:
        return f"{self.host}:{self.index}"


class _State:
    """A mutable copy of the snapshot: hosts in key order, their GPUs in index order."""

    def __init__(self, gpus: Iterable[GpuState], headroom: int) -> None:
        self.by_key: dict[str, _Slot] = {}
        hosts: dict[str, list[_Slot]] = {}
        for g in gpus:
            if g.key in self.by_key:
                raise ValueError(f"GPU {g.key} is listed twice")
            slot = _Slot(g.host, g.index, g.total - headroom, g.free(headroom), list(g.leases))
            self.by_key[g.key] = slot
            hosts.setdefault(g.host, []).append(slot)
        self.hosts = {h: sorted(hosts[h], key=lambda s: s.index) for h in sorted(hosts)}
        counts: dict[str, int] = {}
        for slot in self.by_key.values():
            for pool in {lease.pool_id for lease in slot.leases}:
                counts[pool] = counts.get(pool, 0) + 1
        # Pools with leases on several GPUs (splits) move whole or not at all: never here.
        self.multi = {pool for pool, n in counts.items() if n > 1}
        for slot in self.by_key.values():
            slot.idle = sum(x.bytes for x in slot.leases if self.may_move(x))

    def may_move(self, lease: PoolLease) -> bool:
        return not (lease.busy or lease.standing or lease.pool_id in self.multi)

    def movable(self, slot: _Slot, largest_dest: int) -> list[PoolLease]:
        """The target's leases that may move and fit some destination, largest first."""
        return sorted(
            (x for x in slot.leases if 0 < x.bytes <= largest_dest and self.may_move(x)),
            key=lambda lease: (-lease.bytes, lease.pool_id),
        )

    def apply(self, plan: Plan) -> None:
        """Carry ``plan`` out on the working state, checking every step."""
        for m in plan.moves:
            src, dst = self.by_key[m.from_gpu], self.by_key[m.to_gpu]
            lease = next((x for x in src.leases if x.pool_id == m.pool_id), None)
            if (
                lease is None
                or lease.busy
                or lease.standing
                or lease.bytes != m.bytes
                or lease.pool_id in self.multi
            ):
                raise ValueError(f"{m.pool_id} is not an idle lease of {m.bytes} B on {src.key}")
            if dst.host != src.host or dst is src or dst.free < m.bytes:
                raise ValueError(f"{m.pool_id} does not fit on {dst.key}")
            src.leases.remove(lease)
            src.free += lease.bytes
            src.idle -= lease.bytes
            dst.leases.append(lease)
            dst.free -= lease.bytes
            dst.idle += lease.bytes
        for key, n in plan.placement:
            slot = self.by_key[key]
            if slot.free < n:
                raise ValueError(f"{plan.model} does not fit on {key}")
            slot.leases.append(PoolLease(f"waiting:{plan.model}", plan.model, n, busy=True))
            slot.free -= n

    def snapshot(self, headroom: int) -> list[GpuState]:
        return [
            GpuState(s.host, s.index, s.total + headroom, tuple(s.leases))
            for slots in self.hosts.values()
            for s in slots
        ]


# Stranded memory ----------------------------------------------------------------------------
def _split_members(slots: Sequence[_Slot], w: Waiting) -> list[_Slot]:
    """The GPUs of a host that can take part in a split of ``w`` that fits (else none).

    Every GPU with more than the overhead free adds to a split, so a GPU can be part of one
    that fits exactly when the split over all such GPUs fits.
    """
    ov = w.split_overhead_bytes
    members = [s for s in slots if s.free > ov]
    if len(members) < 2 or sum(s.free - ov for s in members) < w.need_bytes - ov:
        return []
    return members


def stranded(gpus: Iterable[GpuState], waiting: Sequence[Waiting], *, headroom: int = 0) -> Report:
    """Per GPU and per host: free bytes, and the free bytes no waiting placement can use."""
    state = _State(gpus, headroom)
    smallest = min((w.need_bytes for w in waiting), default=None)
    splitters = [w for w in waiting if w.split_allowed]
    gpu_rows: list[GpuReport] = []
    host_rows: list[HostReport] = []
    for host, slots in state.hosts.items():
        in_split: set[str] = set()
        for w in splitters:
            in_split.update(s.key for s in _split_members(slots, w))
        free_sum = stranded_sum = 0
        for s in slots:
            free = max(0, s.free)
            usable = (smallest is not None and free >= smallest) or s.key in in_split
            lost = 0 if usable else free
            gpu_rows.append(GpuReport(s.key, host, s.index, free, lost))
            free_sum += free
            stranded_sum += lost
        largest = max((max(0, s.free) for s in slots), default=0)
        host_rows.append(HostReport(host, free_sum, stranded_sum, largest))
    return Report(tuple(gpu_rows), tuple(host_rows))


# Placing as things stand --------------------------------------------------------------------
def _fit_one(state: _State, need: int) -> _Slot | None:
    """The fullest GPU that fits ``need`` (binpack), lowest key on a tie."""
    best: _Slot | None = None
    for slots in state.hosts.values():
        for s in slots:
            if s.free >= need and (best is None or s.free < best.free):
                best = s
    return best


def _fit_split(state: _State, w: Waiting) -> list[tuple[str, int]] | None:
    """The first host (key order) where a split fits: the fewest GPUs, largest holes first."""
    ov = w.split_overhead_bytes
    for slots in state.hosts.values():
        ordered = sorted((s for s in slots if s.free > ov), key=lambda s: (-s.free, s.index))
        room = 0
        for k, s in enumerate(ordered, start=1):
            room += s.free
            total = w.need_bytes + (k - 1) * ov
            if k >= 2 and room >= total:
                parts, left = [], total
                for t in ordered[:k]:
                    take = min(t.free, left)
                    parts.append((t.key, take))
                    left -= take
                return parts
    return None


# The fewest moves ---------------------------------------------------------------------------
@dataclass(frozen=True)
class _Found:
    rank: tuple[int, int, str, int]  # moves, bytes moved, host, GPU index
    target: _Slot
    moves: tuple[Move, ...]


def _moves(
    target: _Slot, dests: Sequence[_Slot], chosen: Sequence[PoolLease], where: Sequence[int]
) -> tuple[Move, ...]:
    return tuple(
        Move(x.pool_id, x.model, x.bytes, target.key, dests[j].key)
        for x, j in zip(chosen, where, strict=True)
    )


def _greedy(
    movable: Sequence[PoolLease], caps: Sequence[int], deficit: int
) -> tuple[list[PoolLease], list[int], int]:
    """Largest idle lease first, each best-fit into a destination, until ``deficit`` is met."""
    rem = list(caps)
    chosen: list[PoolLease] = []
    where: list[int] = []
    got = 0
    for lease in movable:
        if got >= deficit:
            break
        j = min(
            (j for j, r in enumerate(rem) if r >= lease.bytes), key=lambda j: rem[j], default=None
        )
        if j is None:
            continue
        rem[j] -= lease.bytes
        chosen.append(lease)
        where.append(j)
        got += lease.bytes
    return chosen, where, got


def _search_target(
    target: _Slot,
    dests: Sequence[_Slot],
    movable: Sequence[PoolLease],
    deficit: int,
    first_k: int,
    last_k: int,
    exact_limit: int,
) -> _Found | None:
    """The fewest moves (then bytes) off ``target`` making ``deficit`` more room, k ≤ last_k."""
    caps = [d.free for d in dests]
    room = sum(caps)
    sizes = [x.bytes for x in movable]
    for k in range(first_k, last_k + 1):
        if math.comb(len(movable), k) > exact_limit:
            chosen, where, got = _greedy(movable, caps, deficit)
            if got < deficit or len(chosen) > last_k:
                return None
            moves = _moves(target, dests, chosen, where)
            rank = (len(moves), got, target.host, target.index)
            return _Found(rank, target, moves)
        subsets = []
        for combo in combinations(range(len(sizes)), k):
            total = sum(sizes[i] for i in combo)
            if deficit <= total <= room:
                subsets.append((total, combo))
        subsets.sort()
        for total, combo in subsets:
            where_ = pack([sizes[i] for i in combo], caps)
            if where_ is not None:
                moves = _moves(target, dests, [movable[i] for i in combo], where_)
                return _Found((k, total, target.host, target.index), target, moves)
    return None


def _fewest_moves(state: _State, need: int, max_moves: int, exact_limit: int) -> _Found | None:
    """The best hole over every (host, GPU): fewest moves, then bytes, then key order."""
    targets = []
    for host, slots in state.hosts.items():
        if sum(max(0, s.free) for s in slots) < need:
            continue
        for t in slots:
            deficit = need - t.free
            if deficit <= 0 or t.idle < deficit:
                continue
            dests = [s for s in slots if s is not t and s.free > 0]
            if not dests:
                continue
            movable = state.movable(t, max(d.free for d in dests))
            got, lower = 0, None
            for k, lease in enumerate(movable, start=1):
                got += lease.bytes
                if got >= deficit:
                    lower = k
                    break
            if lower is not None and lower <= max_moves:
                targets.append((lower, host, t.index, t, dests, movable, deficit))
    targets.sort(key=lambda x: (x[0], x[1], x[2]))
    best: _Found | None = None
    for lower, _, _, t, dests, movable, deficit in targets:
        last = max_moves if best is None else best.rank[0]
        if lower > last:
            break
        found = _search_target(t, dests, movable, deficit, lower, last, exact_limit)
        if found is not None and (best is None or found.rank < best.rank):
            best = found
    return best


def _reason(state: _State, need: int, max_moves: int) -> str:
    """Why no plan: no GPU big enough, no host with the room, or what the moves could make."""
    text = f"needs {format_bytes(need)}"
    capacity = max((s.total for s in state.by_key.values()), default=0)
    if capacity < need:
        return f"{text}; no GPU can ever hold it (largest after headroom: {format_bytes(capacity)})"
    host_free = {h: sum(max(0, s.free) for s in slots) for h, slots in state.hosts.items()}
    roomy = [h for h, f in host_free.items() if f >= need]
    if not roomy:
        most = max(host_free, key=lambda h: (host_free[h], h)) if host_free else "-"
        return (
            f"{text}; no host has that much free memory (most: "
            f"{format_bytes(host_free.get(most, 0))} on host {most})"
        )
    best: tuple[int, str, int, int] = (-1, "", 0, 0)  # hole, host, index, moves to make it
    for h in roomy:
        slots = state.hosts[h]
        for t in slots:
            if t.free + t.idle <= best[0]:
                continue  # cannot beat the best hole so far
            dests = [s for s in slots if s is not t and s.free > 0]
            if not dests:
                continue
            movable = state.movable(t, max(d.free for d in dests))
            chosen, _, got = _greedy(movable, [d.free for d in dests], need - t.free)
            hole = t.free + got
            if hole > best[0]:
                best = (hole, h, t.index, len(chosen))
    hole, h, index, n = best
    if hole >= need:
        return (
            f"{text}; a hole on GPU {h}:{index} takes {n} moves of idle pools "
            f"(more than max_moves={max_moves})"
        )
    return (
        f"{text}; largest hole after moving every idle pool on host {h} is "
        f"{format_bytes(max(0, hole))} (busy pools and standing reservations hold the rest)"
    )


# Planning -----------------------------------------------------------------------------------
def _plan_one(state: _State, w: Waiting, max_moves: int, exact_limit: int) -> Plan:
    need = w.need_bytes
    base = (w.model, need, w.priority)
    slot = _fit_one(state, need)
    if slot is not None:
        return Plan(*base, "fits", ((slot.key, need),))
    if w.split_allowed:
        parts = _fit_split(state, w)
        if parts is not None:
            return Plan(*base, "split", tuple(parts))
    found = _fewest_moves(state, need, max_moves, exact_limit) if max_moves > 0 else None
    if found is not None:
        return Plan(*base, "moves", ((found.target.key, need),), found.moves)
    return Plan(*base, "none", reason=_reason(state, need, max_moves))


def plan(
    gpus: Iterable[GpuState],
    waiting: Sequence[Waiting],
    *,
    max_moves: int = DEFAULT_MAX_MOVES,
    headroom: int = 0,
    exact_limit: int = EXACT_LIMIT,
) -> list[Plan]:
    """One plan per waiting model, higher priority first (input order on a tie).

    Each plan, including a model placed as things stand, is applied to the working state
    before the next model is planned. ``max_moves=0`` plans no moves (what fits as it is).
    """
    if max_moves < 0:
        raise ValueError(f"max_moves must be ≥ 0, got {max_moves}")
    state = _State(gpus, headroom)
    out = []
    for w in sorted(waiting, key=lambda w: -w.priority):
        if w.need_bytes <= 0:
            raise ValueError(f"{w.model}: need_bytes must be > 0, got {w.need_bytes}")
        p = _plan_one(state, w, max_moves, exact_limit)
        state.apply(p)
        out.append(p)
    return out


def apply_plans(
    gpus: Iterable[GpuState],
    plans: Iterable[Plan],
    *,
    headroom: int = 0,
    place: bool = True,
) -> list[GpuState]:
    """The state after carrying ``plans`` out (``place=False``: the moves only), checked step
    by step: a move of a busy or standing lease, or one that does not fit, raises ValueError.
    """
    state = _State(gpus, headroom)
    for p in plans:
        state.apply(p if place else Plan(p.model, p.need_bytes, p.priority, p.action, (), p.moves))
    return state.snapshot(headroom)
