"""Waiting for a condition in tests: poll with a deadline, never a fixed sleep."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


def until(
    check: Callable[[], Any],
    timeout_s: float = 30.0,
    what: str = "",
    logs: Callable[[], str] | None = None,
    every_s: float = 0.1,
) -> Any:
    """``check()``'s first truthy value, polled every ``every_s``; an AssertionError naming
    ``what`` (and ending with ``logs()``) after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            tail = f"\n{logs()}" if logs is not None else ""
            raise AssertionError(f"not within {timeout_s} s: {what or check}{tail}")
        time.sleep(every_s)
