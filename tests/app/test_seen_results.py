"""A result stored in one round trip against the states its worker saw (PostgreSQL).

When a worker takes a step that no other step of its workflow runs beside, the same round
trip reads the workflow's states (``StepWork.seen``). Its result is then settled in memory
and written by one script that locks the workflow, checks the states are still those
(``rows.UNCHANGED``) and writes; the locked path (lock and read, then write) takes over
when they changed, when the settle needs a read, or when the spec left the cache. Each
case against a real PostgreSQL; SQLite reads in process and never takes the states.
"""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import update
from sqlalchemy.exc import DataError

from app import claims, engine, prepared, rows, specs
from app.store import db
from app.core.config import Settings
from app.store.tables import StepStatus, WorkflowStatus
from tests.app.test_engine import create, gen, steps_of, workflow
from tests.utils.recording import RecordingDispatcher

# Columns that differ between two runs of the same spec, or with the time a path took.
_VOLATILE = {"id", "workflow_id", "created_at", "updated_at", "queued_at", "started_at"}
_VOLATILE |= {"finished_at", "dispatched_at"}


@pytest.fixture
def pg(settings: Settings) -> Settings:
    if not settings.sqlalchemy_url.startswith("postgresql"):
        pytest.skip("the states are taken where a result costs round trips: PostgreSQL")
    return settings


def _counts() -> dict[str, int]:
    return dict(engine.SEEN_RESULTS)


def _delta(before: dict[str, int]) -> dict[str, int]:
    return {k: engine.SEEN_RESULTS[k] - before.get(k, 0) for k in ("stored", "changed")}


def _take(wid: str, step_id: str, *, claim: bool = False) -> claims.StepWork:
    step = steps_of(wid)[step_id]
    taken = (claims.claim_step if claim else claims.open_step)(step.id, step.attempts + 1)
    assert taken is not None
    return taken


def _finish(work: claims.StepWork, text: str, sent: RecordingDispatcher, **kw: Any) -> bool:
    return engine.complete_step(
        work.step_run_id, work.attempt, {"text": text}, sent, started_at=work.started_at, **kw
    )


def _stable(wid: str) -> list[dict[str, Any]]:
    return [
        {k: v for k, v in vars(s).items() if k not in _VOLATILE and not k.startswith("_")}
        for s in sorted(steps_of(wid).values(), key=lambda s: s.position)
    ]


@pytest.mark.parametrize("claim", [False, True])
def test_a_chain_s_result_is_one_round_trip(
    pg: Settings, dispatcher: RecordingDispatcher, scripts: list[list[Any]], claim: bool
) -> None:
    wid = create(pg, dispatcher, [gen("a"), gen("b", depends_on=["a"])])
    work = _take(wid, "a", claim=claim)
    assert work.seen is not None and work.seen.step_id == "a"
    before, after = _counts(), RecordingDispatcher()
    scripts.clear()
    assert _finish(work, "x", after, seen=work.seen)
    # One script: the lock, the check, the writes (no read in between).
    assert len(scripts) == 1 and scripts[0][:2] == [rows.LOCK_BY_ID, rows.UNCHANGED]
    assert _delta(before) == {"stored": 1, "changed": 0}
    found = steps_of(wid)
    assert (found["a"].status, found["a"].attempts, found["a"].output) == (
        StepStatus.succeeded,
        1,
        {"text": "x"},
    )
    assert found["b"].status is StepStatus.queued
    assert [d.step_run_id for d in after.sent] == [found["b"].id]
    # The chain's next step is taken the same way; its result ends the workflow.
    work_b = _take(wid, "b", claim=claim)
    assert work_b.seen is not None
    assert _finish(work_b, "y", RecordingDispatcher(), seen=work_b.seen)
    assert _delta(before) == {"stored": 2, "changed": 0}
    assert workflow(wid).status is WorkflowStatus.succeeded


def test_both_paths_write_the_same_rows(pg: Settings, dispatcher: RecordingDispatcher) -> None:
    spec = [
        gen("a"),
        gen("b", depends_on=["a"], when="steps.a.output.text == 'go'"),
        gen("c", depends_on=["a"], when="steps.a.output.text == 'stop'"),
        gen("d", depends_on=["c"]),
    ]
    ends: list[list[dict[str, Any]]] = []
    for as_seen in (True, False):
        wid = create(pg, dispatcher, spec)
        before = _counts()
        work = _take(wid, "a")
        assert _finish(work, "go", RecordingDispatcher(), seen=work.seen if as_seen else None)
        # The condition read the parent's output from memory: no read, no locked path.
        assert _delta(before)["stored"] == (1 if as_seen else 0)
        ends.append(_stable(wid))
    assert ends[0] == ends[1]
    assert [s["status"] for s in ends[0]] == [
        StepStatus.succeeded,
        StepStatus.queued,
        StepStatus.skipped,
        StepStatus.skipped,
    ]


def test_a_change_since_the_step_was_taken_goes_the_locked_way(
    pg: Settings, dispatcher: RecordingDispatcher, scripts: list[list[Any]]
) -> None:
    wid = create(pg, dispatcher, [gen("a"), gen("b", depends_on=["a"])])
    first = _take(wid, "a")  # read, not claimed: the step is still queued
    # Another delivery of the same attempt claims it meanwhile: the states changed.
    second = _take(wid, "a", claim=True)
    assert first.seen is not None and second.seen is not None
    before, after = _counts(), RecordingDispatcher()
    scripts.clear()
    assert _finish(first, "first", after, seen=first.seen)
    # The check failed and wrote nothing; the locked path read the step running this
    # attempt and stored the result.
    assert _delta(before) == {"stored": 0, "changed": 1}
    assert [s[0] for s in scripts] == [rows.LOCK_BY_ID, rows.LOCK_BY_STEP, scripts[2][0]]
    found = steps_of(wid)
    assert (found["a"].status, found["a"].output) == (StepStatus.succeeded, {"text": "first"})
    assert [d.step_run_id for d in after.sent] == [found["b"].id]
    # The other delivery's result finds the step done: its check fails, the locked path
    # refuses it, nothing is sent twice.
    late = RecordingDispatcher()
    assert not _finish(second, "second", late, seen=second.seen)
    assert _delta(before) == {"stored": 0, "changed": 2}
    assert late.sent == [] and steps_of(wid)["a"].output == {"text": "first"}


def test_a_cancel_since_the_step_was_taken_stores_nothing(
    pg: Settings, dispatcher: RecordingDispatcher
) -> None:
    wid = create(pg, dispatcher, [gen("a"), gen("b", depends_on=["a"])])
    work = _take(wid, "a")
    engine.cancel_workflow(wid)
    before, after = _counts(), RecordingDispatcher()
    assert not _finish(work, "x", after, seen=work.seen)
    assert _delta(before) == {"stored": 0, "changed": 1}
    found = steps_of(wid)
    assert (found["a"].status, found["a"].output) == (StepStatus.cancelled, None)
    assert after.sent == [] and workflow(wid).status is WorkflowStatus.cancelled


def test_a_late_claim_is_part_of_what_was_seen(
    pg: Settings, dispatcher: RecordingDispatcher
) -> None:
    wid = create(pg, dispatcher, [gen("a")])
    work = _take(wid, "a")
    assert claims.mark_running(work) and work.seen is not None
    before = _counts()
    assert _finish(work, "x", RecordingDispatcher(), seen=work.seen)
    assert _delta(before) == {"stored": 1, "changed": 0}
    a = steps_of(wid)["a"]
    assert (a.status, a.attempts) == (StepStatus.succeeded, 1)
    assert a.started_at is not None and a.started_at == work.started_at


def test_a_settle_that_needs_a_read_goes_the_locked_way(
    pg: Settings, dispatcher: RecordingDispatcher, scripts: list[list[Any]]
) -> None:
    # c's condition reads a's output, which b's result does not hold in memory.
    spec = [
        gen("a"),
        gen("b", depends_on=["a"]),
        gen("c", depends_on=["b"], when="steps.a.output.text == 'go'"),
    ]
    wid = create(pg, dispatcher, spec)
    work_a = _take(wid, "a")
    assert _finish(work_a, "go", RecordingDispatcher(), seen=work_a.seen)
    work_b = _take(wid, "b")
    before, after = _counts(), RecordingDispatcher()
    scripts.clear()
    assert _finish(work_b, "x", after, seen=work_b.seen)
    assert _delta(before) == {"stored": 0, "changed": 0}  # nothing was sent to check
    assert rows.UNCHANGED not in [s[0] for s in scripts]
    found = steps_of(wid)
    assert found["c"].status is StepStatus.queued
    assert [d.step_run_id for d in after.sent] == [found["c"].id]


def test_a_spec_gone_from_the_cache_goes_the_locked_way(
    pg: Settings, dispatcher: RecordingDispatcher
) -> None:
    wid = create(pg, dispatcher, [gen("a"), gen("b", depends_on=["a"])])
    work = _take(wid, "a")
    specs.forget_all()
    before, after = _counts(), RecordingDispatcher()
    assert _finish(work, "x", after, seen=work.seen)
    assert _delta(before) == {"stored": 0, "changed": 0}
    assert [d.step_run_id for d in after.sent] == [steps_of(wid)["b"].id]


def test_no_states_are_taken_beside_a_running_sibling(
    settings: Settings, dispatcher: RecordingDispatcher
) -> None:
    wid = create(settings, dispatcher, [gen("a"), gen("b"), gen("c", depends_on=["a", "b"])])
    work = _take(wid, "a")
    # b is queued beside a: its result would change the states before a's is stored.
    assert work.seen is None
    if settings.sqlalchemy_url.startswith("postgresql"):
        alone = create(settings, dispatcher, [gen("a")])
        assert _take(alone, "a").seen is not None
    else:
        # SQLite reads in process: a result there costs no round trip to save.
        alone = create(settings, dispatcher, [gen("a")])
        assert _take(alone, "a").seen is None


def test_the_check_reads_the_states_as_seen_writes_them(
    pg: Settings, dispatcher: RecordingDispatcher
) -> None:
    wid = create(pg, dispatcher, [gen("a"), gen("b", depends_on=["a"])])
    work = _take(wid, "a", claim=True)
    assert work.seen is not None
    text = work.seen.text()
    a, b = steps_of(wid)["a"], steps_of(wid)["b"]
    assert text == f"running|{a.id}:running:1,{b.id}:pending:0"
    check = {"workflow_id": wid, "seen": text}
    with db.connection_scope(autocommit=True) as conn:
        assert prepared.script(conn, [(rows.UNCHANGED, check)])[0].first() == (1,)
    with db.connection_scope() as conn:
        conn.execute(update(rows.STEP).where(rows.STEP.c.id == b.id).values(attempts=3))
    with pytest.raises(DataError) as raised, db.connection_scope(autocommit=True) as conn:
        prepared.script(conn, [(rows.UNCHANGED, check)])
    # The error names what the server holds now.
    assert rows.STATES_CHANGED in str(raised.value.orig)
    assert f"{b.id}:pending:3" in str(raised.value.orig)
