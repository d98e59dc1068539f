"""Placement: choose GPUs for a model's pool and reserve them, or say exactly why not.

Policies are small objects that order candidate GPUs: ``binpack`` (the fullest GPU that
fits, keeping big holes for big models), ``spread`` (the emptiest), and ``pinned`` (one
index). A model too big for any one GPU is split across GPUs of one host when the catalog
allows it; one too big for the host is refused with the bytes needed and the room per GPU.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from app.scheduler.estimate import MemoryEstimate, plan_split
from app.scheduler.inventory import format_bytes
from app.scheduler.ledger import Ledger, Reservation


@dataclass(frozen=True)
class Candidate:
    """A GPU a pool could go to, with the room a new lease of this model would have."""

    host: str
    index: int
    total: int
    room: int

    @property
    def key(self) -> str:
        return f"{self.host}:{self.index}"


class Policy(Protocol):
    """Orders the GPUs that could hold a model, best first."""

    name: str

    def order(self, candidates: list[Candidate], need: int) -> list[Candidate]: ...


class Binpack:
    """Fill the fullest GPU that still fits, so large holes stay free for large models."""

    name = "binpack"

    def order(self, candidates: list[Candidate], need: int) -> list[Candidate]:
        return sorted((c for c in candidates if c.room >= need), key=lambda c: (c.room, c.key))


class Spread:
    """Use the emptiest GPU, so pools share bandwidth as little as possible."""

    name = "spread"

    def order(self, candidates: list[Candidate], need: int) -> list[Candidate]:
        return sorted((c for c in candidates if c.room >= need), key=lambda c: (-c.room, c.key))


@dataclass
class Pinned:
    """Only the GPU with this index (``corral worker --gpu N``)."""

    index: int
    name: str = "pinned"

    def order(self, candidates: list[Candidate], need: int) -> list[Candidate]:
        return [c for c in candidates if c.index == self.index and c.room >= need]


POLICIES: dict[str, Callable[[], Policy]] = {"binpack": Binpack, "spread": Spread}


@dataclass
class Placement:
    """Where a pool goes: reserved GPUs and the layer split (empty for one GPU)."""

    reservations: list[Reservation]
    split: tuple[int, ...] = ()
    estimate: MemoryEstimate | None = None

    @property
    def indices(self) -> list[int]:
        return [r.gpu for r in self.reservations]


@dataclass
class Refusal:
    """No placement: ``permanent`` when the model can never fit here, else retry later."""

    reason: str
    permanent: bool
    need: int
    rooms: dict[str, int] = field(default_factory=dict)


def _rooms_text(rooms: dict[str, int]) -> str:
    return ", ".join(f"GPU {k}: {format_bytes(v)}" for k, v in sorted(rooms.items())) or "none"


def place(
    ledger: Ledger,
    est: MemoryEstimate,
    *,
    model: str,
    holder: str,
    gpus: list[tuple[str, int, int]],
    policy: Policy,
    priority: int = 0,
    split_allowed: bool = False,
    estimate_split: Callable[[tuple[int, ...]], MemoryEstimate] | None = None,
) -> Placement | Refusal:
    """Reserve room for ``est`` on one of ``gpus`` ((host, index, total)), or explain why not."""
    need = est.total_bytes
    rooms = ledger.rooms(model, priority, [f"{h}:{i}" for h, i, _ in gpus])
    candidates = [Candidate(h, i, t, rooms[f"{h}:{i}"]) for h, i, t in gpus]
    for c in policy.order(candidates, need):
        got = ledger.reserve(model, holder, [(c.host, c.index, need)], priority=priority)
        if got.ok:
            return Placement(got.reservations, (), est)
    if split_allowed and estimate_split is not None and not isinstance(policy, Pinned):
        split = _try_split(ledger, est, candidates, model, holder, priority, estimate_split)
        if split is not None:
            return split
    return _refusal(est, candidates, need, split_allowed, ledger.headroom)


def _try_split(
    ledger: Ledger,
    est: MemoryEstimate,
    candidates: list[Candidate],
    model: str,
    holder: str,
    priority: int,
    estimate_split: Callable[[tuple[int, ...]], MemoryEstimate],
) -> Placement | None:
    by_host: dict[str, list[Candidate]] = {}
    for c in candidates:
        by_host.setdefault(c.host, []).append(c)
    for host_gpus in by_host.values():
        ordered = sorted(host_gpus, key=lambda c: (-c.room, c.index))
        counts = plan_split(est, [c.room for c in ordered])
        if counts is None or len(counts) < 2:
            continue
        split_est = estimate_split(counts)
        used = ordered[: len(counts)]
        parts = [(c.host, c.index, b) for c, b in zip(used, split_est.per_gpu_bytes(), strict=True)]
        got = ledger.reserve(model, holder, parts, priority=priority)
        if got.ok:
            return Placement(got.reservations, counts, split_est)
    return None


def _refusal(
    est: MemoryEstimate, candidates: list[Candidate], need: int, split_allowed: bool, headroom: int
) -> Refusal:
    rooms = {c.key: c.room for c in candidates}
    if not candidates:
        return Refusal("no GPU is registered for this host", True, need, rooms)
    capacity = {c.key: c.total - headroom for c in candidates}
    hosts: dict[str, list[int]] = {}
    for c in candidates:
        hosts.setdefault(c.host, []).append(c.total - headroom)
    fits_one = any(cap >= need for cap in capacity.values())
    fits_split = split_allowed and any(
        plan_split(est, sorted(caps, reverse=True)) is not None for caps in hosts.values()
    )
    if not fits_one and not fits_split:
        how = "" if split_allowed else " (the catalog does not allow splitting it across GPUs)"
        return Refusal(
            f"needs {format_bytes(need)} ({need} bytes){how}; no GPU of this host can ever "
            f"hold it — capacity after headroom: {_rooms_text(capacity)}",
            True,
            need,
            rooms,
        )
    return Refusal(
        f"needs {format_bytes(need)}; free now: {_rooms_text(rooms)}", False, need, rooms
    )
