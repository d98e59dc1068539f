"""Small statistics and process-CPU accounting for the benchmarks (no timing assertions)."""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any


def pct(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) with linear interpolation between order statistics."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def summary(values: Sequence[float], digits: int = 3) -> dict[str, Any]:
    """n, median, p95, p99, min and max of ``values``, rounded."""
    if not values:
        return {"n": 0}
    return {
        "n": len(values),
        "median": round(statistics.median(values), digits),
        "p95": round(pct(values, 95), digits),
        "p99": round(pct(values, 99), digits),
        "min": round(min(values), digits),
        "max": round(max(values), digits),
    }


def ratio(a: float, b: float, digits: int = 3) -> float | None:
    return round(a / b, digits) if b else None


# ---- CPU time of process trees, from /proc (Linux). None elsewhere.

_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _stat(pid: int, *, reaped: bool = False) -> tuple[int, float] | None:
    """(parent pid, user + system CPU seconds) of ``pid``; with ``reaped``, plus the CPU
    of its children that have exited and been waited for (a database server's backends
    that closed, a pool process replaced), which leaves the tree with them otherwise."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2 :].split()
    # After the command: state ppid ... utime(12th) stime(13th) cutime cstime, from state = 0.
    ticks = int(fields[11]) + int(fields[12])
    if reaped:
        ticks += int(fields[13]) + int(fields[14])
    return int(fields[1]), ticks / _TICK


def _all_stats(*, reaped: bool = False) -> dict[int, tuple[int, float]] | None:
    proc = Path("/proc")
    if not proc.is_dir():
        return None
    stats: dict[int, tuple[int, float]] = {}
    for entry in proc.iterdir():
        if entry.name.isdigit():
            st = _stat(int(entry.name), reaped=reaped)
            if st is not None:
                stats[int(entry.name)] = st
    return stats


def cpu_s(pid: int) -> float | None:
    """CPU seconds used so far by ``pid`` alone (all its threads)."""
    st = _stat(pid)
    return None if st is None else st[1]


def parent_of(pid: int) -> int | None:
    """The parent process of ``pid``, if it is alive."""
    st = _stat(pid)
    return None if st is None else st[0]


def children_of(pid: int) -> list[int]:
    """The live child processes of ``pid`` (a Celery worker's pool processes)."""
    return sorted(p for p, (ppid, _cpu) in (_all_stats() or {}).items() if ppid == pid)


def run_s(pids: Iterable[int]) -> float:
    """CPU seconds used so far by ``pids`` together, to the nanosecond (the scheduler's
    own count, ``/proc/PID/schedstat``: finer than :func:`cpu_s`'s clock ticks); a pid
    that has ended counts nothing."""
    total = 0
    for pid in pids:
        try:
            total += int(Path(f"/proc/{pid}/schedstat").read_text().split()[0])
        except (OSError, IndexError, ValueError):
            continue
    return total / 1e9


def tree_cpu_s(roots: Iterable[int]) -> float | None:
    """CPU seconds used so far by ``roots`` and their descendants (pool processes, a
    server's backends): the live ones', and those that exited and were waited for."""
    stats = _all_stats(reaped=True)
    if stats is None:
        return None
    children: dict[int, list[int]] = {}
    for pid, (ppid, _cpu) in stats.items():
        children.setdefault(ppid, []).append(pid)
    total, todo, seen = 0.0, list(roots), set()
    while todo:
        pid = todo.pop()
        if pid in seen or pid not in stats:
            continue
        seen.add(pid)
        total += stats[pid][1]
        todo.extend(children.get(pid, ()))
    return total


class CpuMeter:
    """CPU seconds used inside the block by process trees, or by this process alone."""

    def __init__(self, pids: Sequence[int] | None = None) -> None:
        self.pids = None if pids is None else list(pids)
        self._start: float | None = None
        self.used_s: float | None = None

    def _now(self) -> float | None:
        return time.process_time() if self.pids is None else tree_cpu_s(self.pids)

    def __enter__(self) -> CpuMeter:
        self._start = self._now()
        return self

    def __exit__(self, *_: object) -> None:
        end = self._now()
        self.used_s = None if end is None or self._start is None else end - self._start
