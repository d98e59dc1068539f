"""The API's PostgreSQL connections on its event loop: a submit and a status read that
await the server instead of waiting for it in the thread pool.

On SQLite a submit runs on the loop as inline work (:mod:`app.inline`): calls into this
process that never wait. A database server has to be waited for, and the loop must never
block; so on PostgreSQL a submit went to the thread pool, two thread hand-offs (each a
wake-up of an idle thread, 60–260 µs on a small host) and a thread that contends for the
GIL with the loop. Here the same scripts (:func:`app.prepared.script_async`: the same
statements, one round trip, prepared once per session) go out on psycopg's
``AsyncConnection``, and the loop serves other requests while the server answers.

A :class:`LoopDatabase` belongs to one event loop (an asyncio connection cannot move to
another): :func:`for_loop` finds or makes the running loop's. It holds up to ``size``
connections in autocommit (a script sends its own ``BEGIN``/``COMMIT``, or is one
implicit transaction); a request that finds them all in use waits for one, on the loop.
A connection idle for :data:`app.store.db.PING_AFTER_IDLE_S` is pinged before use, as the
thread pool's are. After any error a connection is closed, not reused: its session's
state (a transaction left open, statements half prepared) is unknown; a lost server
closes every idle one too. Errors are raised as :func:`app.store.db.connection_scope` raises
them: a server that cannot be reached is :class:`ServiceUnavailable` (503), anything else
SQLAlchemy's error for the driver's.
"""

from __future__ import annotations

import asyncio
import time
import weakref
from collections import deque
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from typing import Any

import psycopg
from sqlalchemy import Engine
from sqlalchemy.exc import InterfaceError, OperationalError

from app import prepared
from app.store import db
from app.core.config import get_settings
from app.core.errors import ServiceUnavailable

# Connections one loop holds at most: the thread pool's engine holds 5 (and 10 more
# while busy); a request beyond these waits for one on the loop.
SIZE = 8


@dataclass(eq=False)
class _Slot:
    conn: psycopg.AsyncConnection[Any]
    names: set[str] = field(default_factory=set)  # statements prepared on its session
    used_at: float = 0.0


class LoopDatabase:
    """PostgreSQL connections for one event loop (see the module)."""

    def __init__(self, engine: Engine, size: int = SIZE) -> None:
        self.engine = engine
        self.dialect = engine.dialect
        args, kwargs = self.dialect.create_connect_args(engine.url)
        # The dialect's adapters (how its types are bound) travel as the connection's
        # context, as they do on the thread pool's connections; the rest is libpq's.
        self._context = kwargs.pop("context", None)
        self._conninfo = psycopg.conninfo.make_conninfo(*args, **kwargs)
        self._prepare = bool(engine.get_execution_options().get(prepared.SERVER_PREPARE, True))
        self._idle: deque[_Slot] = deque()
        self._room = asyncio.Semaphore(size)
        self._open: set[_Slot] = set()
        self.connects = 0  # connections made so far

    async def script(
        self,
        statements: Sequence[prepared.Statement],
        *,
        begin: bool = False,
        commit: bool = False,
    ) -> list[prepared.Rows]:
        """:func:`app.prepared.script` on a connection of this loop, awaited."""
        async with self._slot() as slot:
            names = slot.names if self._prepare else None
            try:
                return await prepared.script_async(
                    slot.conn, self.dialect, statements, names, begin=begin, commit=commit
                )
            except (OperationalError, InterfaceError) as exc:
                if exc.connection_invalidated:  # the server went away: the idle ones with it
                    await self._drop_idle()
                raise ServiceUnavailable(f"the database is unavailable: {exc.orig}") from exc

    @asynccontextmanager
    async def _slot(self) -> AsyncIterator[_Slot]:
        async with self._room:
            slot = await self._checkout()
            try:
                yield slot
            except BaseException:
                # An error, or the request cancelled mid-query: the session's state is
                # unknown, so the connection goes.
                await self._discard(slot)
                raise
            slot.used_at = time.monotonic()
            self._idle.append(slot)

    async def _checkout(self) -> _Slot:
        while self._idle:
            slot = self._idle.pop()  # the most recently used: the likeliest to be warm
            if slot.conn.closed:
                self._open.discard(slot)
                continue
            if time.monotonic() - slot.used_at < db.PING_AFTER_IDLE_S:
                return slot
            try:
                await slot.conn.execute(";")  # an empty query: SQLAlchemy's ping on psycopg
            except psycopg.Error:  # went away while idle: so did the others, likely
                await self._discard(slot)
                await self._drop_idle()
                continue
            return slot
        try:
            conn = await psycopg.AsyncConnection.connect(
                self._conninfo, autocommit=True, prepare_threshold=None, context=self._context
            )
        except psycopg.OperationalError as exc:
            raise ServiceUnavailable(f"the database is unavailable: {exc}") from exc
        self.connects += 1
        slot = _Slot(conn)
        self._open.add(slot)
        return slot

    async def _discard(self, slot: _Slot) -> None:
        self._open.discard(slot)
        with suppress(psycopg.Error, OSError):
            await slot.conn.close()

    async def _drop_idle(self) -> None:
        while self._idle:
            await self._discard(self._idle.pop())

    async def aclose(self) -> None:
        """Close every connection (the API's shutdown; a test's end)."""
        await self._drop_idle()
        for slot in list(self._open):
            await self._discard(slot)


_by_loop: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, LoopDatabase] = (
    weakref.WeakKeyDictionary()
)


def for_loop() -> LoopDatabase | None:
    """The running loop's connections to the settings' PostgreSQL database; ``None`` on
    SQLite (reads and inline writes there are calls in this process, :mod:`app.inline`)
    or when ``CORRAL_DATABASE_LOOP`` is off."""
    if db.reads_in_process() or not get_settings().database_loop:
        return None
    loop = asyncio.get_running_loop()
    found = _by_loop.get(loop)
    if found is None or found.engine is not db.get_engine():
        found = _by_loop[loop] = LoopDatabase(db.get_engine())
    return found


async def close_loop() -> None:
    """Close the running loop's connections, if it has any."""
    found = _by_loop.pop(asyncio.get_running_loop(), None)
    if found is not None:
        await found.aclose()
