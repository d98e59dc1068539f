"""Statements sent as one script (app/prepared.py's ``script``): on PostgreSQL one round trip
of client-bound statements with their BEGIN or COMMIT; on SQLite the statements one by one.
The rows a script writes and reads are the ones the statements write and read one at a
time; a script without BEGIN and COMMIT is one transaction; an explicit block rolls back
what it leaves open. SQLite and PostgreSQL."""

from __future__ import annotations

import threading
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from app import prepared, rows
from app.store import db
from app.core.config import Settings
from app.store.tables import StepStatus, WorkflowStatus, new_id
from tests.utils.engine_rows import AWKWARD, run_row, step_rows


def _stored(workflow_id: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The run's and its steps' rows as stored, ids left out (they differ by design)."""
    ids = ("id", "workflow_id")
    with db.connection_scope() as conn:
        run = conn.execute(select(rows.WORKFLOW).where(rows.WORKFLOW.c.id == workflow_id))
        steps = conn.execute(
            select(rows.STEP)
            .where(rows.STEP.c.workflow_id == workflow_id)
            .order_by(rows.STEP.c.position)
        )
        return (
            {k: v for k, v in run.mappings().one().items() if k not in ids},
            [{k: v for k, v in s.items() if k not in ids} for s in steps.mappings()],
        )


def test_a_script_writes_what_the_statements_write_one_by_one(settings: Settings) -> None:
    one, other = new_id(), new_id()
    run, steps = run_row(one), step_rows(one, 5)
    with db.connection_scope(write=True, explicit=True) as conn:
        prepared.script(conn, rows.inserts(run, steps))
    copy = {**run, "id": other}
    copies = [{**s, "id": new_id(), "workflow_id": other} for s in steps]
    with db.connection_scope(write=True) as conn:
        conn.execute(rows._INSERT_WORKFLOW, copy)
        conn.execute(rows._INSERT_STEP, copies)
    by_script, one_by_one = _stored(one), _stored(other)
    assert by_script == one_by_one
    assert len(by_script[1]) == 5
    assert by_script[0]["name"] == AWKWARD
    assert by_script[1][1]["output"] == {"text": AWKWARD, "n": 1}


def test_a_script_returns_each_statements_rows_in_order(settings: Settings) -> None:
    wid = new_id()
    steps = step_rows(wid, 3)
    with db.connection_scope(write=True, explicit=True) as conn:
        prepared.script(conn, rows.inserts(run_row(wid), steps))
    by_step = {"step_run_id": steps[2]["id"]}
    with db.connection_scope(write=True, explicit=True) as conn:
        lock, found = prepared.script(
            conn, [(rows.LOCK_BY_STEP, by_step), (rows.STEPS_BY_STEP, by_step)], begin=True
        )
        assert [tuple(r) for r in lock] == [(wid, AWKWARD, WorkflowStatus.running, "s2")]
        assert [(r.step_id, r.status) for r in found] == [
            ("s0", StepStatus.queued),
            ("s1", StepStatus.pending),
            ("s2", StepStatus.pending),
        ]
        # Two rows of one set of columns and one of another: three UPDATEs, then COMMIT.
        state = {r.step_id: rows.StepState(*r) for r in found}
        state["s0"].set(status=StepStatus.succeeded, output={"text": "%s it's"})
        state["s1"].set(status=StepStatus.queued, output={"text": "x"})
        state["s2"].set(error="50%")
        written = prepared.script(conn, rows.writes(None, state.values()), commit=True)
        assert written == [[], []]  # writes return no rows
    stored = _stored(wid)[1]
    assert [(s["status"], s["output"], s["error"]) for s in stored] == [
        (StepStatus.succeeded, {"text": "%s it's"}, None),
        (StepStatus.queued, {"text": "x"}, None),
        (StepStatus.pending, None, "50%"),
    ]


def test_a_script_without_begin_or_commit_is_all_or_nothing(settings: Settings) -> None:
    wid = new_id()
    steps = step_rows(wid, 3)
    steps[2]["id"] = steps[1]["id"]  # the last row's primary key taken by the one before
    with (
        pytest.raises(IntegrityError) as caught,
        db.connection_scope(write=True, explicit=True) as conn,
    ):
        prepared.script(conn, rows.inserts(run_row(wid), steps))
    assert "INSERT INTO step_run" in str(caught.value)  # the statement is named
    if settings.sqlalchemy_url.startswith("postgresql"):
        assert AWKWARD not in str(caught.value)  # not the script's values (prompts, outputs)
    with db.connection_scope() as conn:
        assert prepared.execute(conn, rows.LOCK_BY_ID, {"workflow_id": wid}) == []
        assert prepared.execute(conn, rows.STEPS, {"workflow_id": wid}) == []


def test_a_read_after_the_lock_in_one_script_sees_what_the_lock_waited_for(
    settings: Settings,
) -> None:
    """The lock and the steps' read go in one script: the read must see the commit of the
    transaction whose lock the script waited on (each statement's own snapshot)."""
    wid = new_id()
    steps = step_rows(wid, 2)
    with db.connection_scope(write=True, explicit=True) as conn:
        prepared.script(conn, rows.inserts(run_row(wid), steps))
    by_id = {"workflow_id": wid}
    locked, waiting, seen = threading.Event(), threading.Event(), []

    def second() -> None:
        locked.wait(10)
        with db.connection_scope(write=True, explicit=True) as conn:
            waiting.set()
            _, found = prepared.script(
                conn, [(rows.LOCK_BY_ID, by_id), (rows.STEPS, by_id)], begin=True
            )
            seen.extend((r.step_id, r.status) for r in found)
            prepared.script(conn, [], commit=True)

    thread = threading.Thread(target=second)
    thread.start()
    with db.connection_scope(write=True, explicit=True) as conn:
        _, found = prepared.script(
            conn, [(rows.LOCK_BY_ID, by_id), (rows.STEPS, by_id)], begin=True
        )
        state = {r.step_id: rows.StepState(*r) for r in found}
        state["s0"].set(status=StepStatus.succeeded)
        locked.set()
        if settings.sqlalchemy_url.startswith("postgresql"):
            waiting.wait(10)  # the other script is sent (SQLite's writers queue before it)
            threading.Event().wait(0.2)  # and blocked on the lock
        prepared.script(conn, rows.writes(None, state.values()), commit=True)
    thread.join(10)
    assert seen == [("s0", StepStatus.succeeded), ("s1", StepStatus.pending)]


@pytest.mark.parametrize("ending", ["error", "no commit"])
def test_an_explicit_block_never_leaves_a_transaction_open(settings: Settings, ending: str) -> None:
    if not settings.sqlalchemy_url.startswith("postgresql"):
        pytest.skip("on SQLite the block's transaction is the connection's own")
    wid = new_id()
    with db.connection_scope(write=True, explicit=True) as conn:
        prepared.script(conn, rows.inserts(run_row(wid), step_rows(wid, 1)))
    change = rows.WorkflowState(wid, "x", WorkflowStatus.running)
    change.set(error="not committed")
    drivers: list[Any] = []

    def block() -> None:
        with db.connection_scope(write=True, explicit=True) as conn:
            prepared.script(conn, [(rows.LOCK_BY_ID, {"workflow_id": wid})], begin=True)
            prepared.script(conn, rows.writes(change))
            drivers.append(conn.connection.driver_connection)
            assert drivers[0].info.transaction_status != 0  # open on the server
            if ending == "error":
                _ = 1 / 0

    with pytest.raises(RuntimeError if ending == "no commit" else ZeroDivisionError):
        block()
    assert drivers[0].info.transaction_status == 0  # rolled back before the pool took it
    with db.connection_scope() as conn:
        run = conn.execute(select(rows.WORKFLOW.c.error).where(rows.WORKFLOW.c.id == wid)).one()
    assert run.error is None
