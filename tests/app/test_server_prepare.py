"""The engine's statements prepared on each PostgreSQL session (app/prepared.py): prepared
the first time a connection runs them, then run by name, so the server parses and plans
each once per connection; kept across rollbacks; a session that lost them, or a script
that prepared and failed, costs that connection and nothing else; with
``CORRAL_DATABASE_PREPARE=false`` nothing is prepared and the rows are the same."""

from __future__ import annotations

import asyncio
import math
import uuid
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta, timezone
from typing import Any

import psycopg
import pytest
from psycopg.types.json import Json
from sqlalchemy import Connection, Engine
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.sql import Executable

from app import prepared, rows
from app.store import db
from app.core.config import Settings
from app.store.migrate import upgrade
from app.store.tables import StepStatus, new_id
from tests.utils.databases import create_pg_database, drop_pg_database
from tests.utils.engine_rows import AWKWARD, run_row, step_rows


def test_the_server_form_numbers_each_placeholder_once() -> None:
    form = prepared._server_form("SELECT %(a)s, %(b)s::VARCHAR, %(a)s, '50%%' FROM t")
    assert form is not None
    name, prepare, execute, order = form
    assert name.startswith("corral_") and len(name) <= 63  # PostgreSQL's identifier limit
    assert prepare == f"PREPARE {name} AS SELECT $1, $2::VARCHAR, $1, '50%' FROM t"
    assert execute == f"EXECUTE {name}(%(a)s, %(b)s)"
    assert order == ("a", "b")
    plain = prepared._server_form("SELECT 1")
    assert plain is not None
    assert plain[1:] == (f"PREPARE {plain[0]} AS SELECT 1", f"EXECUTE {plain[0]}", ())
    assert prepared._server_form("SELECT %s") is None  # positional: not this form
    assert plain[0] != name  # the name follows the text: another statement, another name


@pytest.fixture
def pg_engine(settings: Settings) -> Iterator[Engine]:
    if not settings.sqlalchemy_url.startswith("postgresql"):
        pytest.skip("statements are prepared on a PostgreSQL session")
    engine = db.make_engine(settings.sqlalchemy_url)
    yield engine
    engine.dispose()


# Values of each kind the engine binds, and the awkward ones of each: (value, its cast).
VALUES: list[tuple[Any, str]] = [
    (AWKWARD, "text"),
    ("", "text"),
    ("back\\slash at the end\\", "text"),
    ("''; DROP TABLE workflow_run; --", "text"),
    ("ünïcode ☃ 𝄞", "text"),
    (0, "bigint"),
    (-(2**40), "bigint"),
    (1.5, "float8"),
    (-0.0, "float8"),
    (math.inf, "float8"),
    (True, "boolean"),
    (False, "boolean"),
    (None, "text"),
    (datetime(2026, 11, 23, 10, 49, 4, 119660, tzinfo=UTC), "timestamptz"),
    (
        datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone(timedelta(hours=-3, minutes=-30))),
        "timestamptz",
    ),
    (date(2026, 2, 28), "date"),
    (uuid.UUID("3f1c2d4e-5a6b-7c8d-9e0f-1a2b3c4d5e6f"), "uuid"),
    (Json({"text": AWKWARD, "n": [1, 2.5, None]}), "json"),
    (b"\x00\xff'\\", "bytea"),
]


def _form(casts: list[str]) -> tuple[prepared.ServerForm, dict[str, Any]]:
    names = [f"v{i}" for i in range(len(casts))]
    sql = "SELECT " + ", ".join(f"%({n})s::{c}" for n, c in zip(names, casts, strict=True))
    form = prepared._server_form(sql + ", %(v0)s::text")  # a name used twice: bound once
    assert form is not None and form.order == tuple(names)
    return form, {n: v for n, (v, _) in zip(names, VALUES, strict=True)}


def test_a_named_call_is_bound_as_psycopgs_client_cursor_binds_it(pg_engine: Engine) -> None:
    """The Binder binds each value of a named statement's call as ``mogrify`` would, on
    the worker's cursor and the API's async one; the values read back are the ones bound;
    a value psycopg refuses is refused the same way, before anything is sent."""
    form, params = _form([c for _, c in VALUES])
    with pg_engine.connect() as conn:
        driver = conn.connection.driver_connection
        assert isinstance(driver, psycopg.Connection)
        cursor = psycopg.ClientCursor(driver)
        bound = prepared.Binder(cursor).call(form, params)
        assert bound == cursor.mogrify(form.execute, params)
        assert bound.startswith(f"EXECUTE {form.name}(") and "DROP TABLE workflow_run; --'" in bound
        cursor.execute(form.prepare)
        cursor.execute(bound)
        row = cursor.fetchone()
        assert row is not None
        expected = [v.obj if isinstance(v, Json) else v for v, _ in VALUES]
        assert list(row[:-1]) == expected and row[-1] == AWKWARD
        with pytest.raises(psycopg.DataError, match="NUL"):
            prepared.Binder(cursor).call(form, {**params, "v1": "a\x00b"})
        with pytest.raises(psycopg.DataError, match="NUL"):
            cursor.mogrify(form.execute, {**params, "v1": "a\x00b"})
        plain = prepared._server_form("SELECT 1")
        assert plain is not None and prepared.Binder(cursor).call(plain, {}) == plain.execute
        cursor.execute("DEALLOCATE " + form.name)
        dsn = driver.info.dsn

    async def on_the_loop() -> tuple[str, str]:
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as aconn:
            acursor = psycopg.AsyncClientCursor(aconn)
            return prepared.Binder(acursor).call(form, params), acursor.mogrify(
                form.execute, params
            )

    on_loop, by_mogrify = asyncio.run(on_the_loop())
    assert on_loop == by_mogrify == bound


def _workflow(conn: Connection, n: int = 2) -> tuple[str, list[str]]:
    wid = new_id()
    steps = step_rows(wid, n)
    prepared.script(conn, rows.inserts(run_row(wid), steps))
    return wid, [s["id"] for s in steps]


def _on_session(conn: Connection) -> dict[str, int]:
    """This session's prepared statements of the engine: name → times planned (each
    execution plans anew or reuses the generic plan; either counts once)."""
    found = conn.exec_driver_sql(
        "SELECT name, generic_plans + custom_plans FROM pg_prepared_statements "
        "WHERE starts_with(name, 'corral_')"
    )
    return {name: int(n) for name, n in found}


def _name(conn: Connection, stmt: Executable, params: dict[str, Any]) -> str:
    server = prepared.prepared_for(conn, stmt, params).server
    assert server is not None
    return server[0]


def test_a_statement_is_prepared_once_per_connection_and_then_run_by_name(
    pg_engine: Engine,
) -> None:
    with pg_engine.connect() as conn:
        conn.execution_options(isolation_level="AUTOCOMMIT")
        wid, _ = _workflow(conn)
        by_id = {"workflow_id": wid}
        lock = _name(conn, rows.LOCK_BY_ID, by_id)
        steps = _name(conn, rows.STEPS, by_id)
        for _ in range(3):
            found = prepared.script(
                conn, [(rows.LOCK_BY_ID, by_id), (rows.STEPS, by_id)], begin=True
            )
            prepared.script(conn, [], commit=True)
            assert [r.step_id for r in found[1]] == ["s0", "s1"]
        view = prepared.execute(conn, rows.VIEW, by_id)  # a lone statement, the same way
        assert [r.step_id for r in view] == ["s0", "s1"]
        on_session = _on_session(conn)
        with pg_engine.connect() as other:  # another session: nothing of this one's
            assert lock not in _on_session(other)
    # Each ran three times through the one statement its first script prepared.
    assert on_session[lock] == 3 and on_session[steps] == 3
    assert on_session[_name(conn, rows.VIEW, by_id)] == 1


def test_statements_outlive_a_rollback(pg_engine: Engine) -> None:
    """The driver's own preparing is off: psycopg sends ``DEALLOCATE ALL`` after a
    rollback once it has prepared a statement of its own (5 runs), which would drop the
    engine's statements with its own."""
    with pg_engine.connect() as conn:
        with conn.begin():
            wid, _ = _workflow(conn)
        by_id = {"workflow_id": wid}
        assert [r.step_id for r in prepared.execute(conn, rows.STEPS, by_id)] == ["s0", "s1"]
        for _ in range(6):  # what psycopg would prepare with its default threshold
            conn.exec_driver_sql("SELECT 1").all()
        conn.rollback()
        conn.exec_driver_sql("SELECT 1").all()  # psycopg would deallocate here
        assert _on_session(conn)[_name(conn, rows.STEPS, by_id)] == 1
        assert [r.step_id for r in prepared.execute(conn, rows.STEPS, by_id)] == ["s0", "s1"]
        assert _on_session(conn)[_name(conn, rows.STEPS, by_id)] == 2
        conn.rollback()


def test_a_session_that_lost_its_statements_costs_its_connection_only(
    pg_engine: Engine,
) -> None:
    with pg_engine.connect() as conn:
        with conn.begin():
            wid, _ = _workflow(conn)
        by_id = {"workflow_id": wid}
        prepared.execute(conn, rows.STEPS, by_id)
        conn.rollback()
        conn.exec_driver_sql("DEALLOCATE ALL")  # a pooler's reset, say
        with pytest.raises(DBAPIError, match="does not exist") as caught:
            prepared.execute(conn, rows.STEPS, by_id)
        assert "SELECT step_run.id" in str(caught.value)  # the statement is named
        assert conn.invalidated  # its session is dropped, and its bookkeeping with it
    with pg_engine.connect() as conn:  # a new session prepares anew
        assert [r.step_id for r in prepared.execute(conn, rows.STEPS, by_id)] == ["s0", "s1"]
        conn.rollback()


def test_a_schema_change_under_a_prepared_statement_costs_its_connection_only(
    pg_engine: Engine,
) -> None:
    """A column whose type changes (a migration while the platform runs) changes what a
    prepared read returns, which PostgreSQL refuses: that session goes, the next one
    prepares the statement anew. In a database of its own."""
    url = create_pg_database()
    try:
        upgrade(url)
        engine = db.make_engine(url.replace("postgresql://", "postgresql+psycopg://"))
        with engine.connect() as conn:
            conn.execution_options(isolation_level="AUTOCOMMIT")
            wid, _ = _workflow(conn)
            by_id = {"workflow_id": wid}
            assert len(prepared.execute(conn, rows.STEPS, by_id)) == 2
            with engine.connect() as admin:
                admin.exec_driver_sql("ALTER TABLE step_run ALTER COLUMN model TYPE text")
                admin.commit()
            with pytest.raises(DBAPIError, match="cached plan must not change result type"):
                prepared.execute(conn, rows.STEPS, by_id)
            assert conn.invalidated
        with engine.connect() as conn:
            found = prepared.execute(conn, rows.STEPS, by_id)
            assert [r.model for r in found] == ["tiny-chat", "tiny-chat"]
            conn.rollback()
        engine.dispose()
    finally:
        drop_pg_database(url)


def test_a_script_that_prepared_and_failed_drops_its_connection(pg_engine: Engine) -> None:
    """``PREPARE`` is not undone by the script's failure: which of its statements the
    server kept is unknown, so the session goes (a later script on it would prepare a
    name that exists, or run one that does not)."""
    with pg_engine.connect() as conn:
        conn.execution_options(isolation_level="AUTOCOMMIT")
        wid, step_ids = _workflow(conn)
        fresh = pg_engine.connect()
        fresh.execution_options(isolation_level="AUTOCOMMIT")
        try:
            change = rows.StepState(step_ids[0], "s0", "tiny-chat", StepStatus.queued, 0, 3)
            change.set(step_id="s1")  # taken by the other step: a unique violation
            with pytest.raises(IntegrityError):
                prepared.script(fresh, rows.writes(None, [change]))
            assert fresh.invalidated
        finally:
            fresh.close()
        # The same statement on a session that had prepared it: the error, no more.
        change = rows.StepState(step_ids[0], "s0", "tiny-chat", StepStatus.queued, 0, 3)
        change.set(step_id="s9")
        prepared.script(conn, rows.writes(None, [change]))
        change.set(step_id="s1")
        with pytest.raises(IntegrityError):
            prepared.script(conn, rows.writes(None, [change]))
        assert not conn.invalidated
        found = prepared.execute(conn, rows.STEPS, {"workflow_id": wid})
        assert [r.step_id for r in found] == ["s9", "s1"]


def test_with_prepare_off_nothing_is_prepared_and_the_rows_are_the_same(
    settings: Settings, pg_engine: Engine
) -> None:
    off = db.make_engine(settings.sqlalchemy_url, prepare=False)
    try:
        seen = []
        for engine in (pg_engine, off):
            with engine.connect() as conn:
                conn.execution_options(isolation_level="AUTOCOMMIT")
                wid, _ = _workflow(conn, 3)
                by_id = {"workflow_id": wid}
                lock, steps = prepared.script(
                    conn, [(rows.LOCK_BY_ID, by_id), (rows.STEPS, by_id)], begin=True
                )
                prepared.script(conn, [], commit=True)
                view = prepared.execute(conn, rows.VIEW, by_id)
                seen.append(
                    (
                        [(r.name, r.status) for r in lock],
                        [tuple(r)[1:] for r in steps],
                        [(r.status, r.step_id, r.kind, r.step_status, r.depends_on) for r in view],
                        bool(_on_session(conn)),
                    )
                )
        assert seen[0][:3] == seen[1][:3]
        assert len(seen[0][1]) == 3 and len(seen[0][2]) == 3
        assert seen[0][3] and not seen[1][3]  # prepared on, nothing prepared off
    finally:
        off.dispose()
