"""Packing moved leases into the free memory of other GPUs, for the cleanup planner.

Best-fit decreasing first; where it fails for at most ``EXACT_PACK_ITEMS`` leases, a
complete backtracking search within ``PACK_NODES`` steps (equal remainders tried once).
"""

from __future__ import annotations

from collections.abc import Sequence

EXACT_PACK_ITEMS = 8  # subsets this small are packed exactly when best-fit fails
PACK_NODES = 50_000  # steps of the exact packing search


def _best_fit(items: Sequence[int], caps: Sequence[int]) -> list[int] | None:
    """Best-fit decreasing (``items`` come largest first): destination per item, or None."""
    rem = list(caps)
    out = []
    for n in items:
        j = min((j for j, r in enumerate(rem) if r >= n), key=lambda j: rem[j], default=None)
        if j is None:
            return None
        rem[j] -= n
        out.append(j)
    return out


def _pack_exact(items: Sequence[int], caps: Sequence[int]) -> list[int] | None:
    """Every assignment of ``items`` to destinations (equal remainders tried once)."""
    rem = list(caps)
    out = [0] * len(items)
    steps = 0

    def go(i: int) -> bool:
        nonlocal steps
        if i == len(items):
            return True
        steps += 1
        if steps > PACK_NODES:
            return False
        tried: set[int] = set()
        for j, r in enumerate(rem):
            if r >= items[i] and r not in tried:
                tried.add(r)
                rem[j] -= items[i]
                out[i] = j
                if go(i + 1):
                    return True
                rem[j] += items[i]
        return False

    return out if go(0) else None


def pack(items: Sequence[int], caps: Sequence[int]) -> list[int] | None:
    """A destination for each of ``items`` (largest first) within ``caps``, or None: best-fit
    decreasing, and where that fails for a few items, the exact search."""
    found = _best_fit(items, caps)
    if found is None and len(items) <= EXACT_PACK_ITEMS:
        found = _pack_exact(items, caps)
    return found
