"""SQLite transactions: a write takes the write lock at its BEGIN, a read keeps a snapshot.

The engine's ``begin`` hook starts every SQLite transaction itself, on the driver's
connection (``isolation_level=None`` stops the driver's own implicit ``BEGIN``); these
check that the statement really runs, and that its errors arrive as SQLAlchemy's.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from sqlalchemy import text

from app.core.config import Settings, use_settings
from app.core.errors import ServiceUnavailable
from app.store import db
from app.store.migrate import upgrade


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'tx.db'}"
    upgrade(url)
    return url


def _other(url: str) -> sqlite3.Connection:
    """Another program's connection: no busy wait, no implicit transactions."""
    return sqlite3.connect(url.split("///", 1)[1], timeout=0, isolation_level=None)


def test_a_write_transaction_holds_the_write_lock_from_its_begin(sqlite_url: str) -> None:
    engine = db.make_engine(sqlite_url, write=True)
    other = _other(sqlite_url)
    try:
        # No statement yet: only BEGIN IMMEDIATE has run.
        with engine.begin(), pytest.raises(sqlite3.OperationalError, match="locked"):
            other.execute("BEGIN IMMEDIATE")
        other.execute("BEGIN IMMEDIATE")  # released at the commit
        other.execute("ROLLBACK")
    finally:
        other.close()
        engine.dispose()


def test_a_read_transaction_reads_one_snapshot(sqlite_url: str) -> None:
    engine = db.make_engine(sqlite_url)
    other = _other(sqlite_url)
    other.execute("CREATE TABLE t (n INTEGER)")
    other.execute("INSERT INTO t VALUES (1)")
    try:
        with engine.begin() as conn:
            first = conn.execute(text("SELECT count(*) FROM t")).scalar_one()
            other.execute("INSERT INTO t VALUES (2)")  # committed by another connection
            again = conn.execute(text("SELECT count(*) FROM t")).scalar_one()
        with engine.begin() as conn:
            after = conn.execute(text("SELECT count(*) FROM t")).scalar_one()
    finally:
        other.close()
        engine.dispose()
    assert (first, again, after) == (1, 1, 2)


def test_a_begin_that_cannot_get_the_lock_is_a_503(sqlite_url: str, tmp_path: Path) -> None:
    """Another program holds the write lock past the busy timeout: the transaction's
    BEGIN fails, as ServiceUnavailable (what the API answers 503 and a worker retries)."""
    other = _other(sqlite_url)
    with use_settings(Settings(database_url=sqlite_url, data_dir=tmp_path / "data")):
        try:
            with db.connection_scope(write=True) as conn:  # the pool's one connection
                conn.connection.driver_connection.execute("PRAGMA busy_timeout=50")  # type: ignore[union-attr]
            other.execute("BEGIN IMMEDIATE")
            with (
                pytest.raises(ServiceUnavailable, match="database is locked"),
                db.connection_scope(write=True),
            ):
                pass
            other.execute("ROLLBACK")
            with db.connection_scope(write=True) as conn:  # the lock is free again
                assert conn.execute(text("SELECT 1")).scalar_one() == 1
        finally:
            other.close()
            db.dispose_engines()
