"""Database engine and transactions: PostgreSQL through psycopg 3, SQLite as the embedded default.

Workflow state changes run in ``session_scope(write=True)``; the engine serialises writers
of one workflow with ``SELECT ... FOR UPDATE`` on the workflow row in PostgreSQL, and
``BEGIN IMMEDIATE`` (the database write lock) does it in SQLite. That is what makes
"enqueue each ready step exactly once" hold when two parents finish at the same moment.
"""

from __future__ import annotations

import logging
import os
import sqlite3
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
from sqlalchemy.exc import DBAPIError, DisconnectionError, InterfaceError, OperationalError
from sqlmodel import Session

from app import inline
from app.core.config import get_settings
from app.core.errors import ServiceUnavailable
from app.prepared import SERVER_PREPARE

log = logging.getLogger(__name__)

_engines: dict[tuple[str, int, bool, bool], Engine] = {}
_lock = threading.Lock()

# A pooled connection idle this long is pinged before it is handed out; one used more
# recently is not (HikariCP's "alive bypass window"). See _ping_when_idle.
PING_AFTER_IDLE_S = 1.0


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    # Let SQLAlchemy's pysqlite driver stop issuing its own BEGIN; we emit ours.
    dbapi_conn.isolation_level = None
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.close()


def _sqlite_pragmas_nowait(dbapi_conn: Any, record: Any) -> None:
    # The event loop's writer: a lock it cannot take at once is an error (SQLITE_BUSY),
    # and its commits leave checkpoints (an fsync of the database file) to the others.
    _sqlite_pragmas(dbapi_conn, record)
    dbapi_conn.execute("PRAGMA busy_timeout=0")
    dbapi_conn.execute("PRAGMA wal_autocheckpoint=0")


def _sqlite_begin_immediate(conn: Connection) -> None:
    # Take the write lock at the start, so a read-then-write never sees a stale snapshot.
    _sqlite_execute(conn, "BEGIN IMMEDIATE")


def _sqlite_begin_immediate_nowait(conn: Connection) -> None:
    # On the event loop: a write lock someone else holds (a writer that bypasses the
    # gate) is a reason to go to the thread pool, not to wait. Nothing was written yet.
    try:
        conn.connection.driver_connection.execute("BEGIN IMMEDIATE")  # type: ignore[union-attr]
    except sqlite3.OperationalError as exc:
        if exc.sqlite_errorcode & 0xFF != sqlite3.SQLITE_BUSY:
            raise DBAPIError.instance("BEGIN IMMEDIATE", None, exc, sqlite3.Error) from exc
        raise inline.WouldBlock("SQLite's write lock") from exc


def _sqlite_begin(conn: Connection) -> None:
    _sqlite_execute(conn, "BEGIN")


def _sqlite_execute(conn: Connection, statement: str) -> None:
    """Run ``statement`` on the driver's connection, errors raised as SQLAlchemy's.

    Every transaction starts here: straight on sqlite3, not through ``exec_driver_sql``
    (a statement's whole execution context, a quarter of an empty transaction's cost).
    """
    try:
        conn.connection.driver_connection.execute(statement)  # type: ignore[union-attr]
    except sqlite3.Error as exc:
        raise DBAPIError.instance(statement, None, exc, sqlite3.Error) from exc


def make_engine(
    url: str, *, write: bool = False, loop: bool = False, prepare: bool = True
) -> Engine:
    """Create an engine for ``url`` with Corral's per-dialect settings.

    On SQLite a ``write`` engine opens every transaction with ``BEGIN IMMEDIATE``; reads use
    a plain ``BEGIN`` so that, in WAL mode, they never wait for a writer. A ``loop`` engine
    is a pool of its own for the API's event loop, which holds one connection at a time
    (nothing there awaits), so it never waits for the thread pool's to return; a ``loop``
    writer never waits for SQLite's lock either (see :mod:`app.inline`).
    """
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        pool = {"pool_size": 1, "max_overflow": 4} if loop else {}
        engine = create_engine(
            url, connect_args={"check_same_thread": False, "timeout": 30}, **pool
        )
        nowait = write and loop
        event.listen(engine, "connect", _sqlite_pragmas_nowait if nowait else _sqlite_pragmas)
        begin = _sqlite_begin_immediate_nowait if nowait else _sqlite_begin_immediate
        event.listen(engine, "begin", begin if write else _sqlite_begin)
        return engine
    # ``prepare``: the engine's statements are prepared on each server session the first
    # time it runs them (app.prepared); off, each is sent as its text, and nothing outlives
    # a transaction on the session, as a pooler in transaction mode needs. psycopg's own
    # preparing (a statement run 5 times) is off either way: it sends DEALLOCATE ALL after
    # every rollback it sees, the pool's reset on check-in included, which would drop the
    # engine's statements with its own.
    engine = create_engine(
        url,
        pool_size=5,
        max_overflow=10,
        connect_args={"prepare_threshold": None},
        execution_options={SERVER_PREPARE: prepare},
    )
    _ping_when_idle(engine)
    return engine


def _ping_when_idle(engine: Engine) -> None:
    """Ping a pooled connection before use when it has been idle: a database server that
    restarted meanwhile costs a reconnect, never a failed request.

    SQLAlchemy's ``pool_pre_ping`` pings before every use: a round trip per transaction,
    which a step pays four times (submit, claim, result, read). A connection checked in
    less than :data:`PING_AFTER_IDLE_S` ago is handed out as it is. If the server went
    away within that window, the statement fails as a disconnect: the caller sees
    ServiceUnavailable (a 503; a step is retried), and SQLAlchemy invalidates every older
    connection of the pool, so the next checkout reconnects.
    """

    @event.listens_for(engine, "checkin")
    def _used(_dbapi_connection: Any, record: Any) -> None:
        record.info["corral_used_at"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _ping(dbapi_connection: Any, record: Any, _proxy: Any) -> None:
        used = record.info.get("corral_used_at")
        if used is not None and time.monotonic() - used < PING_AFTER_IDLE_S:
            return
        dialect = engine.dialect
        try:
            dialect.do_ping(dbapi_connection)
        except dialect.loaded_dbapi.Error as exc:
            if dialect.is_disconnect(exc, dbapi_connection, None):
                # The pool drops this connection and checks out a new one.
                raise DisconnectionError(f"stale pooled connection: {exc}") from exc
            raise


def get_engine(url: str | None = None, *, write: bool = False, loop: bool = False) -> Engine:
    """The engine for ``url`` (default: the settings') in this process; new after a fork."""
    url = url or get_settings().sqlalchemy_url
    sqlite = url.startswith("sqlite")
    # One engine serves reads and writes on PostgreSQL, the event loop's included.
    write, loop = write and sqlite, loop and sqlite
    key = (url, os.getpid(), write, loop)
    with _lock:
        engine = _engines.get(key)
        if engine is None:
            engine = _engines[key] = make_engine(
                url, write=write, loop=loop, prepare=get_settings().database_prepare
            )
        return engine


def reads_in_process() -> bool:
    """Whether a read is a call into a library in this process, not a request to a server.

    True on SQLite: no network, and in WAL mode a reader never waits for a writer (it
    reads the last commit), so a short read costs its CPU and nothing else. The API reads
    a workflow's state on its event loop then (:func:`read_scope`): less than the two
    thread hand-offs of the thread pool, which a step's path pays on every read. A write
    there is tried only as inline work (:mod:`app.inline`): it never waits for the lock.
    """
    return get_settings().sqlalchemy_url.startswith("sqlite")


@contextmanager
def read_scope() -> Iterator[Connection]:
    """A read-only Core transaction for a read made on the API's event loop
    (:func:`reads_in_process`), on a connection from the loop's own pool."""
    engine = get_engine(loop=True)
    try:
        with engine.connect() as conn, conn.begin():
            yield conn
    except (OperationalError, InterfaceError) as exc:
        raise ServiceUnavailable(f"the database is unavailable: {exc.orig}") from exc


def dispose_engines() -> None:
    """Close every pooled connection of this process (tests and shutdown)."""
    with _lock:
        for engine in _engines.values():
            engine.dispose()
        _engines.clear()


@contextmanager
def session_scope(*, write: bool = False) -> Iterator[Session]:
    """A session that commits at the end of the block, rolls back on error.

    ``write=True`` for transactions that change workflow state.
    """
    engine, gate = _writer(write)
    held = gate.hold(wait=not inline.is_active()) if gate else nullcontext()
    with held, Session(engine, expire_on_commit=False) as session:
        try:
            yield session
            session.commit()
        except (OperationalError, InterfaceError) as exc:
            session.rollback()
            raise ServiceUnavailable(f"the database is unavailable: {exc.orig}") from exc
        except BaseException:
            session.rollback()
            raise
    if gate is not None and inline.is_active():
        _checkpoint_now_and_then(engine)


@contextmanager
def connection_scope(
    *, write: bool = False, autocommit: bool = False, explicit: bool = False
) -> Iterator[Connection]:
    """A Core connection in one transaction: committed at the end, rolled back on error.

    The engine's hot paths use it (no ORM session); the same writer gate and error
    translation as :func:`session_scope`. ``autocommit=True`` is for a block that needs
    no transaction around its statements (a single statement, or reads of rows that no
    longer change): on a database server each statement is then its own transaction,
    without the round trips of ``BEGIN`` and ``COMMIT``. ``explicit=True`` is for a block
    whose statements go through :func:`app.prepared.script`, which on a database server
    sends ``BEGIN`` and ``COMMIT`` with them (a transaction in two round trips, not one per
    statement): the connection is in autocommit, a transaction the block leaves open is
    rolled back, and leaving one open without an error is a bug (``RuntimeError``).
    SQLite keeps its transaction (its ``BEGIN`` and ``COMMIT`` are calls in this process).
    """
    engine, gate = _writer(write)
    with gate.hold(wait=not inline.is_active()) if gate else nullcontext():
        try:
            if (autocommit or explicit) and engine.dialect.name != "sqlite":
                with engine.connect() as conn:
                    conn.execution_options(isolation_level="AUTOCOMMIT")
                    with _ended(conn) if explicit else nullcontext():
                        yield conn
            else:
                with engine.begin() as conn:
                    yield conn
        except (OperationalError, InterfaceError) as exc:
            raise ServiceUnavailable(f"the database is unavailable: {exc.orig}") from exc
    if gate is not None and inline.is_active():
        _checkpoint_now_and_then(engine)


@contextmanager
def _ended(conn: Connection) -> Iterator[None]:
    """Roll back a transaction the block opened on the server and did not end."""
    from psycopg.pq import TransactionStatus  # a server database here: PostgreSQL's driver

    driver: Any = conn.connection.driver_connection
    idle = TransactionStatus.IDLE
    try:
        yield
    except BaseException:
        if not conn.invalidated and driver.info.transaction_status != idle:
            driver.rollback()
        raise
    if driver.info.transaction_status != idle:
        driver.rollback()
        raise RuntimeError("a block left its transaction open (no COMMIT in its script)")


def _writer(write: bool) -> tuple[Engine, _WriterGate | None]:
    """The engine for a transaction, and the gate its writer queues on (SQLite)."""
    if not inline.is_active():
        engine = get_engine(write=write)
        return engine, _writer_gate(engine) if write else None
    # Inline work on the event loop (app.inline): the loop's own pools; a writer never
    # waits for the gate, nor for SQLite's lock. A server database never runs inline.
    if not reads_in_process():
        inline.would_wait("the database server")
    engine = get_engine(write=write, loop=True)
    return engine, _writer_gate(engine) if write else None


# The loop's writer leaves checkpoints to the others (PRAGMA wal_autocheckpoint=0); every
# this many of its commits, one runs in a thread of its own so the WAL stays bounded even
# when nothing else writes (SQLite's own default threshold is 1000 pages).
CHECKPOINT_EVERY = 500
_loop_commits = 0
_checkpointer: threading.Thread | None = None


def _checkpoint_now_and_then(engine: Engine) -> None:
    """After a commit of the loop's writer: every :data:`CHECKPOINT_EVERY` of them, a
    passive checkpoint in a thread (it never waits for a lock; the WAL frames it cannot
    copy yet wait for the next one)."""
    global _loop_commits, _checkpointer
    _loop_commits += 1
    if _loop_commits % CHECKPOINT_EVERY or (_checkpointer and _checkpointer.is_alive()):
        return
    path = str(engine.url.database)
    _checkpointer = threading.Thread(
        target=_checkpoint, args=(path,), name="corral-checkpoint", daemon=True
    )
    _checkpointer.start()


def _checkpoint(path: str) -> None:
    try:
        checkpointer = sqlite3.connect(path, timeout=0, isolation_level=None)
        try:
            checkpointer.execute("PRAGMA wal_checkpoint(PASSIVE)")
        finally:
            checkpointer.close()
    except sqlite3.Error as exc:  # the next one tries again; readers cope with a longer WAL
        log.warning("WAL checkpoint of %s failed: %s", path, exc)


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
    def hold(self, *, wait: bool = True) -> Iterator[None]:
        """Hold the gate for the block. ``wait=False`` (inline work on the event loop):
        a gate held by another thread or process raises :class:`app.inline.WouldBlock`."""
        if getattr(self._depth, "n", 0):  # nested in this thread: already held
            self._depth.n += 1
            try:
                yield
            finally:
                self._depth.n -= 1
            return
        deadline = time.monotonic() + self.timeout_s
        if not self._threads.acquire(blocking=wait, timeout=self.timeout_s if wait else -1):
            if not wait:
                raise inline.WouldBlock("SQLite's writer gate (another thread)")
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
                    if not wait:
                        raise inline.WouldBlock("SQLite's writer gate (another process)") from None
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
