"""Workflow transactions against a real database (SQLite, and PostgreSQL when configured)."""

from __future__ import annotations

import threading
from typing import Any

import pytest
from sqlalchemy import update
from sqlmodel import select

from app.core.config import Settings
from app.core.errors import ConflictError
from app.store import db, queries
from app.store.tables import StepRun, StepStatus, WorkflowRun, WorkflowStatus
from app.workflows import engine, rules
from app.workflows.engine import Dispatch, Outcome
from tests.utils.workflows import gen, validated


def create(settings: Settings, steps: list[dict[str, Any]]) -> Outcome:
    return engine.create(validated(settings, *steps))


def steps_of(workflow_id: str) -> dict[str, StepRun]:
    with db.session_scope() as session:
        rows = session.exec(select(StepRun).where(StepRun.workflow_id == workflow_id)).all()
        return {r.step_id: r for r in rows}


def workflow(workflow_id: str) -> WorkflowRun:
    with db.session_scope() as session:
        run = session.get(WorkflowRun, workflow_id)
        assert run is not None
        return run


def run_ok(d: Dispatch, text: str = "ok") -> Outcome:
    """Claim and finish a step as a worker does; what its result readied."""
    assert engine.claim(d.step_run_id, d.attempt) is not None
    outcome = engine.complete(d.step_run_id, d.attempt, {"text": text})
    assert outcome is not None
    return outcome


def test_roots_are_readied_in_the_creating_commit(settings: Settings) -> None:
    created = create(settings, [gen("a"), gen("b"), gen("c", depends_on=["a", "b"])])
    wid = created.workflow_id
    s = steps_of(wid)
    assert {d.step_run_id for d in created.dispatches} == {s["a"].id, s["b"].id}
    assert all(d.attempt == 1 and d.model == "tiny-chat" for d in created.dispatches)
    assert s["a"].status is StepStatus.queued and s["c"].status is StepStatus.pending
    assert s["a"].queued_at is not None and s["a"].dispatched_at is None


@pytest.mark.parametrize("round_", range(8))
def test_join_is_readied_exactly_once_when_parents_finish_together(
    settings: Settings, round_: int
) -> None:
    created = create(settings, [gen("a"), gen("b"), gen("c", depends_on=["a", "b"])])
    for d in created.dispatches:
        assert engine.claim(d.step_run_id, d.attempt) is not None
    barrier = threading.Barrier(2)
    outcomes: list[Outcome | None] = []
    errors: list[BaseException] = []

    def finish(d: Dispatch) -> None:
        try:
            barrier.wait()
            outcomes.append(engine.complete(d.step_run_id, d.attempt, {"text": "x"}))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=finish, args=(d,)) for d in created.dispatches]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    sent = [d for o in outcomes if o is not None for d in o.dispatches]
    assert [d.step_run_id for d in sent] == [steps_of(created.workflow_id)["c"].id]


def test_duplicate_delivery_records_one_result(settings: Settings) -> None:
    created = create(settings, [gen("a"), gen("b", depends_on=["a"])])
    wid, d = created.workflow_id, created.dispatches[0]
    assert engine.claim(d.step_run_id, 1) is not None
    assert engine.claim(d.step_run_id, 1) is not None  # a redelivery (its worker died)
    after = engine.complete(d.step_run_id, 1, {"text": "first"})
    assert after is not None and len(after.dispatches) == 1
    assert engine.complete(d.step_run_id, 1, {"text": "second"}) is None
    assert steps_of(wid)["a"].output == {"text": "first"}
    assert engine.claim(d.step_run_id, 1) is None
    assert engine.claim(after.dispatches[0].step_run_id, 2) is None  # a future attempt


def test_retry_then_fail_for_good(settings: Settings) -> None:
    created = create(
        settings,
        [
            gen("a", retry={"max_attempts": 2, "backoff_s": 2, "max_backoff_s": 10}),
            gen("b", depends_on=["a"]),
            gen("other"),
        ],
    )
    wid = created.workflow_id
    a = next(d for d in created.dispatches if d.step_run_id == steps_of(wid)["a"].id)
    assert engine.claim(a.step_run_id, 1) is not None
    retry = engine.fail(a.step_run_id, 1, "boom", retryable=True)
    assert retry is not None and retry.step_status is StepStatus.retrying
    (again,) = retry.dispatches
    assert again.attempt == 2 and 1.0 <= again.countdown <= 2.0
    assert steps_of(wid)["a"].status is StepStatus.retrying
    assert engine.claim(a.step_run_id, 2) is not None
    final = engine.fail(a.step_run_id, 2, "boom again", retryable=True)
    assert final is not None and final.step_status is StepStatus.failed and final.finished
    assert final.dispatches == ()
    s = steps_of(wid)
    assert s["b"].status is StepStatus.cancelled
    assert s["other"].status is StepStatus.cancelled  # queued, never started
    run = workflow(wid)
    assert run.status is WorkflowStatus.failed and "boom again" in (run.error or "")
    assert run.finished_at is not None and s["a"].finished_at is not None


def test_not_retryable_fails_at_once(settings: Settings) -> None:
    created = create(settings, [gen("a", retry={"max_attempts": 5})])
    d = created.dispatches[0]
    engine.claim(d.step_run_id, 1)
    out = engine.fail(d.step_run_id, 1, "bad input", retryable=False)
    assert out is not None and out.step_status is StepStatus.failed and out.dispatches == ()
    assert workflow(created.workflow_id).status is WorkflowStatus.failed


def test_conditions_and_skip_propagation(settings: Settings) -> None:
    created = create(
        settings,
        [
            gen("score"),
            gen("hi", depends_on=["score"], when="steps.score.output.text | int > 50"),
            gen("hi2", depends_on=["hi"]),
            gen("lo", depends_on=["score"], when="steps.score.output.text | int <= 50"),
            gen("join", depends_on=["hi2", "lo"]),
        ],
    )
    wid = created.workflow_id
    after = run_ok(created.dispatches[0], text="42")
    s = steps_of(wid)
    assert s["hi"].status is StepStatus.skipped and "condition" in (s["hi"].error or "")
    assert s["hi2"].status is StepStatus.skipped
    assert [d.step_run_id for d in after.dispatches] == [s["lo"].id]
    last = run_ok(after.dispatches[0])
    assert [d.step_run_id for d in last.dispatches] == [steps_of(wid)["join"].id]
    end = run_ok(last.dispatches[0])
    assert end.finished and workflow(wid).status is WorkflowStatus.succeeded


def test_a_condition_reads_outputs_stored_by_earlier_results(settings: Settings) -> None:
    created = create(
        settings,
        [
            gen("a"),
            gen("b"),
            gen(
                "c",
                depends_on=["a", "b"],
                when="steps.a.output.text == 'yes' and steps.b.attempts == 1",
            ),
            gen("d", depends_on=["a", "b"], when="steps.a.output.text == 'no'"),
        ],
    )
    wid = created.workflow_id
    a_id = steps_of(wid)["a"].id
    first, second = sorted(created.dispatches, key=lambda d: d.step_run_id != a_id)
    run_ok(first, text="yes")
    after = run_ok(second, text="whatever")
    s = steps_of(wid)
    assert [d.step_run_id for d in after.dispatches] == [s["c"].id]
    assert s["c"].status is StepStatus.queued
    assert s["d"].status is StepStatus.skipped and "is false" in (s["d"].error or "")


def test_templates_render_from_parent_outputs(settings: Settings) -> None:
    created = create(
        settings,
        [
            gen("a", timeout_s=7.5),
            gen("b", depends_on=["a"], input={"prompt": "Echo: {{ steps.a.output.text }}!"}),
        ],
    )
    engine.forget_specs()  # a worker that never saw the workflow reads its spec
    work = engine.claim(created.dispatches[0].step_run_id, 1)
    assert work is not None and work.step_id == "a" and work.workflow_id == created.workflow_id
    assert work.input == {"prompt": "hi", "max_tokens": 4, "temperature": 0}
    assert work.timeout_s == 7.5
    after = engine.complete(work.step_run_id, 1, {"text": "hello"})
    assert after is not None
    engine.forget_specs()
    work = engine.claim(after.dispatches[0].step_run_id, 1)
    assert work is not None and work.input["prompt"] == "Echo: hello!"


def test_an_input_that_does_not_render_is_reported_with_the_claim(settings: Settings) -> None:
    created = create(settings, [gen("a", input={"prompt": "{{ 1 / 0 }}"})])
    work = engine.claim(created.dispatches[0].step_run_id, 1)
    assert work is not None and "failed to render" in (work.input_error or "")


def test_cancel(settings: Settings) -> None:
    created = create(settings, [gen("a"), gen("b", depends_on=["a"])])
    wid, d = created.workflow_id, created.dispatches[0]
    engine.claim(d.step_run_id, 1)
    out = engine.cancel(wid, None)
    assert out.status is WorkflowStatus.cancelled and out.finished
    assert {s.status for s in steps_of(wid).values()} == {StepStatus.cancelled}
    assert engine.complete(d.step_run_id, 1, {"text": "late"}) is None
    assert steps_of(wid)["a"].output is None
    with pytest.raises(ConflictError, match="already cancelled"):
        engine.cancel(wid, None)


def test_another_keys_workflow_is_not_found(settings: Settings) -> None:
    created = create(settings, [gen("a")])
    with pytest.raises(engine.NotFoundError):
        engine.cancel(created.workflow_id, 12345)
    with pytest.raises(engine.NotFoundError):
        engine.read(created.workflow_id, 12345)
    assert workflow(created.workflow_id).status is WorkflowStatus.running


def test_the_claim_statement_is_rules_claim(settings: Settings) -> None:
    """The conditional UPDATE of a claim starts a step exactly when rules.claim says so,
    over every workflow status, step status, attempts and delivered attempt."""
    created = create(settings, [gen("a")])
    wid, sid = created.workflow_id, created.dispatches[0].step_run_id
    checked = 0
    for run_status in WorkflowStatus:
        for status in StepStatus:
            for attempts in range(3):
                for attempt in range(1, 4):
                    with db.connection_scope(write=True) as conn:
                        conn.execute(
                            update(queries.WORKFLOW)
                            .where(queries.WORKFLOW.c.id == wid)
                            .values(status=run_status)
                        )
                        conn.execute(
                            update(queries.STEP)
                            .where(queries.STEP.c.id == sid)
                            .values(status=status, attempts=attempts)
                        )
                    run = rules.Run(wid, "t", run_status, {"a": rules.StepState(status, attempts)})
                    expected = rules.claim(run, "a", attempt)
                    work = engine.claim(sid, attempt)
                    assert (work is not None) == expected, (run_status, status, attempts, attempt)
                    row = steps_of(wid)["a"]
                    if expected:
                        assert (row.status, row.attempts) == (StepStatus.running, attempt)
                    else:
                        assert (row.status, row.attempts) == (status, attempts)  # untouched
                    checked += 1
    assert checked == len(WorkflowStatus) * len(StepStatus) * 9


def test_a_claim_of_a_missing_step_is_step_gone(settings: Settings) -> None:
    with pytest.raises(engine.StepGone):
        engine.claim("0" * 32, 1)


@pytest.mark.parametrize("round_", range(6))
def test_claims_racing_a_failure_that_ends_the_workflow(settings: Settings, round_: int) -> None:
    """A claim either starts its step before the failure (the step keeps running) or
    finds the workflow failed (the step is cancelled): never both, never neither."""
    created = create(settings, [gen("a"), *(gen(f"b{i}") for i in range(4))])
    a = next(
        d for d in created.dispatches if d.step_run_id == steps_of(created.workflow_id)["a"].id
    )
    others = [d for d in created.dispatches if d is not a]
    assert engine.claim(a.step_run_id, 1) is not None
    barrier = threading.Barrier(len(others) + 1)
    claimed: dict[str, bool] = {}
    errors: list[BaseException] = []

    def claim(d: Dispatch) -> None:
        try:
            barrier.wait()
            claimed[d.step_run_id] = engine.claim(d.step_run_id, d.attempt) is not None
        except BaseException as exc:
            errors.append(exc)

    def fail() -> None:
        try:
            barrier.wait()
            engine.fail(a.step_run_id, 1, "boom", retryable=False)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=claim, args=(d,)) for d in others]
    threads.append(threading.Thread(target=fail))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert workflow(created.workflow_id).status is WorkflowStatus.failed
    rows = {r.id: r for r in steps_of(created.workflow_id).values()}
    for d in others:
        expected = StepStatus.running if claimed[d.step_run_id] else StepStatus.cancelled
        assert rows[d.step_run_id].status is expected
