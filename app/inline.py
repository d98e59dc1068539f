"""Work the API does on its event loop only when none of it has to wait.

A submit on SQLite is all calls into this process (validation, the token count, SQLite's
insert and commit) and one message to Redis, which the loop sends without blocking. On
the event loop it saves the two thread hand-offs of the thread pool, which on a small host
cost more than the work itself. But the loop serves every other request: it must never
wait. So a submit runs there inside :func:`active`, and whatever would have to wait —
SQLite's write lock held by a worker, a model's vocabulary not loaded yet, the live-pool
view due for a refresh from Redis — raises :class:`WouldBlock` instead, before anything
is written; the caller then runs the same submit in the thread pool, as before.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

_active: ContextVar[bool] = ContextVar("corral_inline", default=False)


class WouldBlock(Exception):
    """Inline work found something it would have to wait for; nothing was written."""


@contextmanager
def active() -> Iterator[None]:
    """Run the block as inline work: a wait anywhere inside it raises :class:`WouldBlock`."""
    token = _active.set(True)
    try:
        yield
    finally:
        _active.reset(token)


def is_active() -> bool:
    return _active.get()


def would_wait(what: str) -> None:
    """Call where the code is about to wait for ``what``: inline, it raises instead."""
    if _active.get():
        raise WouldBlock(what)
