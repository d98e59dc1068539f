"""Database engines and transactions: PostgreSQL through psycopg 3, SQLite as the embedded
default.

A write transaction on SQLite starts with ``BEGIN IMMEDIATE`` (the database's write lock,
taken before the first read, so a read-then-write never works on a stale snapshot); a
read starts with a plain ``BEGIN`` and, in WAL mode, never waits for a writer. On
PostgreSQL the engine locks the rows it changes (``SELECT … FOR UPDATE``); psycopg
prepares the statements a connection runs often (``prepare_threshold``), and the pool
pings a connection before handing it out, so a restarted server costs a reconnect.
Errors that mean "the database cannot be reached" become :class:`ServiceUnavailable`.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

try:
    import fcntl
except ImportError:  # not POSIX: SQLite's own busy handler alone orders writers
    fcntl = None  # type: ignore[assignment]

from sqlalchemy import Connection, Engine, create_engine, event, text
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlmodel import Session

from app.core.config import get_settings
from app.core.errors import ServiceUnavailable

_engines: dict[tuple[str, int, bool], Engine] = {}
# A SQLite connection's execution option: the engine's begin hook issues no BEGIN.
_AUTOCOMMIT_SQLITE = "corral_autocommit"
_lock = threading.Lock()


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    dbapi_conn.isolation_level = None  # pysqlite issues no BEGIN of its own: we do
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.close()


def make_engine(url: str, *, write: bool = False) -> Engine:
    """An engine for ``url`` with Corral's per-dialect settings (``write``: SQLite's
    transactions take the write lock at ``BEGIN``)."""
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})
        event.listen(engine, "connect", _sqlite_pragmas)
        begin = "BEGIN IMMEDIATE" if write else "BEGIN"

        def _begin(conn: Connection) -> None:
            if not conn.get_execution_options().get(_AUTOCOMMIT_SQLITE):
                conn.exec_driver_sql(begin)

        event.listen(engine, "begin", _begin)
        return engine
    return create_engine(
        url,
        pool_size=5,
        max_overflow=10,
        pool_pre_ping=True,
        # psycopg prepares a statement the second time a connection runs it.
        connect_args={"prepare_threshold": 2 if get_settings().database_prepare else None},
    )


def get_engine(url: str | None = None, *, write: bool = False) -> Engine:
    """The engine for ``url`` (default: the settings') in this process; new after a fork."""
    url = url or get_settings().sqlalchemy_url
    write = write and url.startswith("sqlite")  # one engine serves both on a server
    key = (url, os.getpid(), write)
    with _lock:
        engine = _engines.get(key)
        if engine is None:
            engine = _engines[key] = make_engine(url, write=write)
        return engine


def dispose_engines() -> None:
    """Close every pooled connection of this process (tests and shutdown)."""
    with _lock:
        for engine in _engines.values():
            engine.dispose()
        _engines.clear()


@contextmanager
def session_scope(*, write: bool = False) -> Iterator[Session]:
    """A session that commits at the end of the block and rolls back on error;
    ``write=True`` for a transaction that changes workflow state."""
    engine = get_engine(write=write)
    gate = _writer_gate(engine) if write else None
    with gate.hold() if gate else nullcontext(), Session(engine, expire_on_commit=False) as session:
        try:
            yield session
            session.commit()
        except (OperationalError, InterfaceError) as exc:
            session.rollback()
            raise ServiceUnavailable(f"the database is unavailable: {exc.orig}") from exc
        except BaseException:
            session.rollback()
            raise


@contextmanager
def connection_scope(*, write: bool = False) -> Iterator[Connection]:
    """A Core connection in one transaction (committed at the end, rolled back on error)."""
    engine = get_engine(write=write)
    gate = _writer_gate(engine) if write else None
    with gate.hold() if gate else nullcontext():
        try:
            with engine.begin() as conn:
                yield conn
        except (OperationalError, InterfaceError) as exc:
            raise ServiceUnavailable(f"the database is unavailable: {exc.orig}") from exc


@contextmanager
def autocommit_scope(*, write: bool = False) -> Iterator[Connection]:
    """A connection whose statements each commit on their own (no ``BEGIN``, no
    ``COMMIT``: on PostgreSQL two round trips fewer than a transaction). For work that is
    one statement, or reads of rows that no longer change; ``write=True`` when a
    statement writes (on SQLite it then waits its turn for the write lock)."""
    engine = get_engine(write=write)
    gate = _writer_gate(engine) if write else None
    with gate.hold() if gate else nullcontext():
        try:
            with engine.connect() as conn:
                if engine.dialect.name == "sqlite":  # pysqlite opens no transaction itself
                    yield conn.execution_options(**{_AUTOCOMMIT_SQLITE: True})
                else:
                    yield conn.execution_options(isolation_level="AUTOCOMMIT")
        except (OperationalError, InterfaceError) as exc:
            raise ServiceUnavailable(f"the database is unavailable: {exc.orig}") from exc


class _WriterGate:
    """Lines up one host's writers of a SQLite file so its write lock passes on at once.

    SQLite's busy handler makes a writer that finds the lock taken sleep 1, 2, 5, 10, 15 …
    ms between tries, so under contention (API threads and pool processes committing
    steps) most of a transaction's latency is sleeping. Writers queue here instead: on a
    thread lock within the process, then on ``flock`` of a file next to the database,
    polled at most 1 ms apart. ``BEGIN IMMEDIATE`` still takes SQLite's own lock: this
    only orders writers, correctness never depends on it; a writer that bypasses it
    (another program) is waited for by SQLite as before.
    """

    def __init__(self, path: str, timeout_s: float = 30.0) -> None:
        self.path = path
        self.timeout_s = timeout_s
        self._threads = threading.Lock()
        self._depth = threading.local()
        self._fd: int | None = None

    @contextmanager
    def hold(self) -> Iterator[None]:
        """Hold the gate for the block (re-entrant within a thread)."""
        if getattr(self._depth, "n", 0):  # nested in this thread: already held
            self._depth.n += 1
            try:
                yield
            finally:
                self._depth.n -= 1
            return
        deadline = time.monotonic() + self.timeout_s
        if not self._threads.acquire(timeout=self.timeout_s):
            raise ServiceUnavailable(f"the database stayed locked for {self.timeout_s:g} s")
        try:
            if self._fd is None:
                self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            delay = 50e-6
            while True:
                try:
                    fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise ServiceUnavailable(
                            f"the database stayed locked for {self.timeout_s:g} s"
                        ) from None
                    time.sleep(delay)
                    delay = min(delay * 2, 0.001)
            self._depth.n = 1
            try:
                yield
            finally:
                self._depth.n = 0
                fcntl.flock(self._fd, fcntl.LOCK_UN)
        finally:
            self._threads.release()


_gates: dict[tuple[str, int], _WriterGate] = {}


def _writer_gate(engine: Engine) -> _WriterGate | None:
    """This process's gate for a SQLite file (None for other databases and for memory)."""
    if engine.dialect.name != "sqlite" or fcntl is None:
        return None
    path = engine.url.database
    if not path or path == ":memory:":
        return None
    key = (os.path.abspath(path), os.getpid())  # a forked child opens its own file
    with _lock:
        gate = _gates.get(key)
        if gate is None:
            gate = _gates[key] = _WriterGate(key[0] + "-writers.lock")
        return gate


def ping() -> None:
    """Raise ServiceUnavailable unless the database answers ``SELECT 1``."""
    try:
        with get_engine().connect() as conn:
            conn.execute(text("SELECT 1"))
            conn.rollback()
    except OperationalError as exc:
        raise ServiceUnavailable(f"the database is unavailable: {exc.orig}") from exc
