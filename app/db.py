"""Database engine and transactions: PostgreSQL through psycopg 3, SQLite as the embedded default.

Workflow state changes run in :func:`write_transaction`, which serialises writers of one
workflow: ``SELECT ... FOR UPDATE`` on the workflow row in PostgreSQL, ``BEGIN IMMEDIATE``
(the database write lock) in SQLite. That is what makes "enqueue each ready step exactly
once" hold when two parents finish at the same moment.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlmodel import Session

from app.core.config import get_settings
from app.errors import ServiceUnavailable

_engines: dict[tuple[str, int, bool], Engine] = {}
_lock = threading.Lock()


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    # Let SQLAlchemy's pysqlite driver stop issuing its own BEGIN; we emit ours.
    dbapi_conn.isolation_level = None
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.close()


def _sqlite_begin_immediate(conn: Any) -> None:
    # Take the write lock at the start, so a read-then-write never sees a stale snapshot.
    conn.exec_driver_sql("BEGIN IMMEDIATE")


def _sqlite_begin(conn: Any) -> None:
    conn.exec_driver_sql("BEGIN")


def make_engine(url: str, *, write: bool = False) -> Engine:
    """Create an engine for ``url`` with Corral's per-dialect settings.

    On SQLite a ``write`` engine opens every transaction with ``BEGIN IMMEDIATE``; reads use
    a plain ``BEGIN`` so that, in WAL mode, they never wait for a writer.
    """
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})
        event.listen(engine, "connect", _sqlite_pragmas)
        event.listen(engine, "begin", _sqlite_begin_immediate if write else _sqlite_begin)
        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=10)


def get_engine(url: str | None = None, *, write: bool = False) -> Engine:
    """The engine for ``url`` (default: the settings') in this process; new after a fork."""
    url = url or get_settings().sqlalchemy_url
    write = write and url.startswith("sqlite")  # one engine serves both on PostgreSQL
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
    """A session that commits at the end of the block, rolls back on error.

    ``write=True`` for transactions that change workflow state (see :func:`lock_workflow`).
    """
    with Session(get_engine(write=write), expire_on_commit=False) as session:
        try:
            yield session
            session.commit()
        except (OperationalError, InterfaceError) as exc:
            session.rollback()
            raise ServiceUnavailable(f"the database is unavailable: {exc.orig}") from exc
        except BaseException:
            session.rollback()
            raise


def lock_workflow(session: Session, workflow_id: str) -> None:
    """Serialise writers of one workflow for the rest of the transaction."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(
            text("SELECT id FROM workflow_run WHERE id = :id FOR UPDATE"), {"id": workflow_id}
        )
    # SQLite: BEGIN IMMEDIATE already holds the database's single write lock.


def ping() -> None:
    """Raise ServiceUnavailable unless the database answers ``SELECT 1``."""
    try:
        with get_engine().connect() as conn:
            conn.execute(text("SELECT 1"))
            conn.rollback()
    except OperationalError as exc:
        raise ServiceUnavailable(f"the database is unavailable: {exc.orig}") from exc
