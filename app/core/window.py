"""Daily time windows in UTC, written ``HH:MM-HH:MM`` (``22:00-02:00`` runs past midnight)."""

from __future__ import annotations

import re
from datetime import datetime, time

_WINDOW = re.compile(r"^([01]\d|2[0-3]):([0-5]\d)-([01]\d|2[0-3]):([0-5]\d)$")


def parse_window(value: str) -> tuple[time, time] | None:
    """The window's start and end, or None for '' (any time); ValueError when malformed."""
    value = value.strip()
    if not value:
        return None
    match = _WINDOW.match(value)
    if match is None:
        raise ValueError(f"a window is 'HH:MM-HH:MM' in UTC (e.g. '01:00-05:00'), got {value!r}")
    h1, m1, h2, m2 = (int(g) for g in match.groups())
    start, end = time(h1, m1), time(h2, m2)
    if start == end:
        raise ValueError(f"a window's start and end must differ, got {value!r}")
    return start, end


def in_window(value: str, now: datetime) -> bool:
    """Whether ``now`` (UTC) falls inside the window ``value`` (start included, end not)."""
    window = parse_window(value)
    if window is None:
        return True
    start, end = window
    at = now.time().replace(tzinfo=None)
    if start < end:
        return start <= at < end
    return at >= start or at < end  # past midnight
