"""The engine's statements on the driver's cursor (app/prepared.py) against SQLAlchemy's own
execution of the same statements: the same SQL, the same parameters reaching the driver,
the same rows back; driver errors raised as SQLAlchemy's. SQLite and PostgreSQL."""

from __future__ import annotations

import contextlib
from typing import Any

import pytest
from sqlalchemy import Connection, Engine, event, literal, select
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError

from app import claims, engine, prepared, rows
from app.store import db
from app.core.config import Settings
from app.workflows.spec import validate_workflow
from models.catalog import load_catalog
from tests.utils.databases import PrivatePostgres
from tests.utils.recording import RecordingDispatcher

SPEC = {
    "name": "prepared",
    "steps": [
        {
            "id": "a",
            "kind": "generate",
            "model": "tiny-chat",
            "input": {"prompt": "Hi", "max_tokens": 2},
        },
        {
            "id": "b",
            "kind": "generate",
            "model": "tiny-chat",
            "depends_on": ["a"],
            "input": {"prompt": "{{ steps.a.output.text }} again", "max_tokens": 2},
        },
    ],
}


def _sent_by_sqlalchemy(eng: Engine, stmt: Any, params: Any) -> tuple[str, Any]:
    """The SQL and parameters SQLAlchemy hands the driver for ``stmt`` (then rolled back)."""
    seen: list[tuple[str, Any]] = []

    def capture(_conn: Any, _cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
        seen.append((statement, parameters))

    event.listen(eng, "before_cursor_execute", capture)
    try:
        with eng.connect() as conn, conn.begin() as tx:
            with contextlib.suppress(IntegrityError):  # a replayed INSERT: sent is all we need
                conn.execute(stmt, params)
            tx.rollback()
    finally:
        event.remove(eng, "before_cursor_execute", capture)
    assert len(seen) == 1
    return seen[0]


def _plain(params: Any) -> Any:
    """Parameters comparable by value (psycopg's JSON wrappers compare by identity)."""

    def value(v: Any) -> Any:
        return ("json", v.obj) if type(v).__name__ in ("Json", "Jsonb") else v

    if isinstance(params, dict):
        return {k: value(v) for k, v in params.items()}
    return tuple(value(v) for v in params)


@pytest.fixture
def recorded(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> list[tuple[Any, Any]]:
    """Every (statement, parameters) the engine runs through prepared.execute or, once
    each, through prepared.script (which on SQLite runs them through execute)."""
    calls: list[tuple[Any, Any]] = []
    original, original_script = prepared.execute, prepared.script
    in_script = False

    def recording(conn: Connection, stmt: Any, params: Any = None) -> prepared.Rows:
        if not in_script:
            calls.append((stmt, params))
        return original(conn, stmt, params)

    def recording_script(conn: Connection, statements: Any, **kw: Any) -> list[prepared.Rows]:
        nonlocal in_script
        calls.extend(statements)
        in_script = True
        try:
            return original_script(conn, statements, **kw)
        finally:
            in_script = False

    monkeypatch.setattr(prepared, "execute", recording)
    monkeypatch.setattr(prepared, "script", recording_script)
    return calls


def _run_workflow(settings: Settings) -> tuple[str, str]:
    dispatcher = RecordingDispatcher()
    validated = validate_workflow(SPEC, load_catalog(settings.catalog_path), settings)
    wid = engine.create_workflow(validated, dispatcher).id
    first = dispatcher.sent[-1]
    assert claims.claim_step(first.step_run_id, first.attempt) is not None
    assert engine.complete_step(first.step_run_id, first.attempt, {"text": "yo"}, dispatcher)
    second = dispatcher.sent[-1]
    work = claims.claim_step(second.step_run_id, second.attempt)
    assert work is not None and work.input["prompt"] == "yo again"
    return wid, second.step_run_id


def test_the_driver_receives_what_sqlalchemy_would_send(
    settings: Settings, recorded: list[tuple[Any, Any]]
) -> None:
    _run_workflow(settings)
    eng = db.get_engine(write=True)
    kinds = set()
    compared = 0
    for stmt, params in recorded:
        if isinstance(params, list):
            continue  # executemany: below
        keys = sorted(params) if getattr(stmt, "is_insert", False) else None
        ready = prepared.prepare(stmt, eng.dialect, keys)
        if not ready.supported:
            continue
        sql, sent = _sent_by_sqlalchemy(eng, stmt, params)
        assert ready.sql == sql
        assert _plain(ready.parameters(params)) == _plain(sent)
        kinds.add(type(stmt).__name__)
        compared += 1
    assert kinds == {"Insert", "Update", "Select"}
    assert compared >= 5  # the run's insert, claims, locks, reads and updates


def test_executemany_rows_get_what_sqlalchemy_would_send(
    settings: Settings, recorded: list[tuple[Any, Any]]
) -> None:
    _run_workflow(settings)
    eng = db.get_engine(write=True)
    many = [(s, p) for s, p in recorded if isinstance(p, list)]
    assert many  # the steps' INSERT at least
    for stmt, params in many:
        keys = sorted(params[0]) if getattr(stmt, "is_insert", False) else None
        ready = prepared.prepare(stmt, eng.dialect, keys)
        assert ready.supported
        for one in params:  # each row as SQLAlchemy sends it alone
            sql, sent = _sent_by_sqlalchemy(eng, stmt, one)
            assert ready.sql == sql
            assert _plain(ready.parameters(one)) == _plain(sent)


def test_rows_come_back_as_sqlalchemy_returns_them(settings: Settings) -> None:
    wid, step_run_id = _run_workflow(settings)
    reads = [
        (rows.VIEW, {"workflow_id": wid}),
        (rows.STEPS, {"workflow_id": wid}),
        (rows.LOCK_BY_ID, {"workflow_id": wid}),
        (rows.LOCK_BY_STEP, {"step_run_id": step_run_id}),
        (rows.STALE, {"step_run_id": step_run_id}),
        (rows.SPEC, {"workflow_id": wid}),
    ]
    with db.connection_scope(write=True) as conn:
        for stmt, params in reads:
            expected = conn.execute(stmt, params).all()
            got = prepared.execute(conn, stmt, params)
            assert [tuple(r) for r in got] == [tuple(r) for r in expected]
            assert [r._fields for r in got] == [r._fields for r in expected]
            assert expected  # each read found its rows
    view = got_view = None
    with db.connection_scope() as conn:
        view = conn.execute(rows.VIEW, {"workflow_id": wid}).all()
        got_view = prepared.execute(conn, rows.VIEW, {"workflow_id": wid})
    assert got_view[0].step_status == view[0].step_status  # by name, typed (an enum)
    assert got_view[0].created_at == view[0].created_at
    assert got_view[0].created_at.tzinfo is not None


def test_a_returning_update_matches_sqlalchemys(settings: Settings) -> None:
    """The claim's UPDATE … RETURNING, once each way, each rolled back."""
    dispatcher = RecordingDispatcher()
    validated = validate_workflow(SPEC, load_catalog(settings.catalog_path), settings)
    engine.create_workflow(validated, dispatcher)
    d = dispatcher.sent[-1]
    params = rows.claim_params(d.step_run_id, d.attempt, engine.utcnow())
    eng = db.get_engine(write=True)
    results = []
    for use_prepared in (False, True):
        with eng.connect() as conn, conn.begin() as tx:
            if use_prepared:
                found = [tuple(r) for r in prepared.execute(conn, rows.CLAIM, params)]
            else:
                found = [tuple(r) for r in conn.execute(rows.CLAIM, params).all()]
            tx.rollback()
        results.append(found)
    assert results[0] == results[1]
    assert len(results[0]) == 1


def test_a_driver_error_is_sqlalchemys(settings: Settings) -> None:
    wid, _ = _run_workflow(settings)
    with db.connection_scope(write=True) as conn:
        row = dict(
            conn.execute(rows.WORKFLOW.select().where(rows.WORKFLOW.c.id == wid)).mappings().one()
        )
    with pytest.raises(IntegrityError), db.connection_scope(write=True) as conn:
        prepared.execute(conn, rows._INSERT_WORKFLOW, row)  # the same primary key again


def test_statements_sqlalchemy_must_complete_run_through_it(settings: Settings) -> None:
    """An expanding IN list is rendered per call: such a statement goes to conn.execute."""
    wid, _ = _run_workflow(settings)
    eng = db.get_engine()
    assert not prepared.prepare(rows.CONTEXT, eng.dialect).supported
    with db.connection_scope() as conn:
        found = prepared.execute(conn, rows.CONTEXT, {"workflow_id": wid, "step_ids": ["a"]})
    assert [(r[0], r[2]) for r in found] == [("a", {"text": "yo"})]


@pytest.mark.slow
def test_a_lost_server_fails_one_call_then_the_pool_recovers(
    private_pg_engine: Engine, private_pg: PrivatePostgres, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As through Connection.execute: the disconnect is SQLAlchemy's OperationalError, marked
    as such, and the pool's other old connections are dropped with it."""
    monkeypatch.setattr(db, "PING_AFTER_IDLE_S", 3600.0)  # no ping would catch it
    stmt = select(literal(1).label("one"))  # an empty server: no tables needed
    params: dict[str, Any] = {}
    with private_pg_engine.connect() as one, private_pg_engine.connect() as two:  # two pooled
        assert prepared.execute(one, stmt, params) == [(1,)]
        assert prepared.execute(two, stmt, params) == [(1,)]
    private_pg.stop()
    private_pg.start()
    with pytest.raises(OperationalError) as caught, private_pg_engine.connect() as conn:
        prepared.execute(conn, stmt, params)
    assert isinstance(caught.value, DBAPIError) and caught.value.connection_invalidated
    for _ in range(2):  # both old connections are gone: each checkout works
        with private_pg_engine.connect() as conn:
            assert prepared.execute(conn, stmt, params) == [(1,)]
