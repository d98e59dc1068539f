"""The workflow engine against a real database (SQLite, and PostgreSQL when configured)."""

from __future__ import annotations

import threading
from typing import Any

import pytest
from sqlmodel import select

from app import claims, dispatch, engine, specs
from app.store import db
from app.core.config import Settings
from app.engine import Dispatch
from app.core.errors import ConflictError
from app.workflows.spec import validate_workflow
from app.store.tables import StepRun, StepStatus, WorkflowRun, WorkflowStatus
from models.catalog import load_catalog
from tests.utils.recording import RecordingDispatcher


def gen(step_id: str, **extra: Any) -> dict[str, Any]:
    return {
        "id": step_id,
        "kind": "generate",
        "model": "tiny-chat",
        "input": {"prompt": "hi", "max_tokens": 4},
        **extra,
    }


def create(settings: Settings, dispatcher: RecordingDispatcher, steps: list[dict[str, Any]]) -> str:
    validated = validate_workflow(
        {"name": "t", "steps": steps}, load_catalog(settings.catalog_path), settings
    )
    return engine.create_workflow(validated, dispatcher).id


def steps_of(workflow_id: str) -> dict[str, StepRun]:
    with db.session_scope() as session:
        rows = session.exec(select(StepRun).where(StepRun.workflow_id == workflow_id)).all()
        return {r.step_id: r for r in rows}


def workflow(workflow_id: str) -> WorkflowRun:
    with db.session_scope() as session:
        run = session.get(WorkflowRun, workflow_id)
        assert run is not None
        return run


def run_ok(d: Dispatch, dispatcher: RecordingDispatcher, text: str = "ok") -> None:
    """Claim and finish a step as a worker does (on PostgreSQL, with what it saw)."""
    work = claims.claim_step(d.step_run_id, d.attempt)
    assert work is not None
    stored = engine.complete_step(
        d.step_run_id, d.attempt, {"text": text}, dispatcher, seen=work.seen
    )
    assert stored


def test_roots_are_dispatched_after_commit(
    settings: Settings, dispatcher: RecordingDispatcher
) -> None:
    wid = create(settings, dispatcher, [gen("a"), gen("b"), gen("c", depends_on=["a", "b"])])
    assert {d.step_run_id for d in dispatcher.sent} == {steps_of(wid)[s].id for s in "ab"}
    assert all(d.attempt == 1 and d.model == "tiny-chat" for d in dispatcher.sent)
    s = steps_of(wid)
    assert s["a"].status is StepStatus.queued and s["c"].status is StepStatus.pending
    # Sends are confirmed by the reconciler, from the markers a real dispatcher leaves.
    assert s["a"].dispatched_at is None
    assert dispatch.undispatched(older_than_s=0)


@pytest.mark.parametrize("round_", range(8))
def test_join_is_enqueued_exactly_once_when_parents_finish_together(
    settings: Settings, round_: int
) -> None:
    first = RecordingDispatcher()
    wid = create(settings, first, [gen("a"), gen("b"), gen("c", depends_on=["a", "b"])])
    for d in first.sent:
        assert claims.claim_step(d.step_run_id, d.attempt) is not None
    barrier = threading.Barrier(2)
    finishers = [RecordingDispatcher(), RecordingDispatcher()]
    errors: list[BaseException] = []

    def finish(d: Dispatch, rec: RecordingDispatcher) -> None:
        try:
            barrier.wait()
            assert engine.complete_step(d.step_run_id, d.attempt, {"text": "x"}, rec)
        except BaseException as exc:
            errors.append(exc)

    threads = [
        threading.Thread(target=finish, args=(d, rec))
        for d, rec in zip(first.sent, finishers, strict=True)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    sent = finishers[0].sent + finishers[1].sent
    assert [d.step_run_id for d in sent] == [steps_of(wid)["c"].id]


def test_duplicate_delivery_records_one_result(
    settings: Settings, dispatcher: RecordingDispatcher
) -> None:
    wid = create(settings, dispatcher, [gen("a"), gen("b", depends_on=["a"])])
    d = dispatcher.sent[0]
    assert claims.claim_step(d.step_run_id, 1) is not None
    # A redelivery of the same attempt (the worker died) may claim it again...
    assert claims.claim_step(d.step_run_id, 1) is not None
    after = RecordingDispatcher()
    assert engine.complete_step(d.step_run_id, 1, {"text": "first"}, after)
    # ...but only the first result is stored, and b is readied once.
    assert not engine.complete_step(d.step_run_id, 1, {"text": "second"}, after)
    assert steps_of(wid)["a"].output == {"text": "first"}
    assert len(after.sent) == 1
    # A stale or future attempt is dropped.
    assert claims.claim_step(d.step_run_id, 1) is None
    assert claims.claim_step(after.sent[0].step_run_id, 2) is None


def test_retry_then_fail_for_good(settings: Settings, dispatcher: RecordingDispatcher) -> None:
    wid = create(
        settings,
        dispatcher,
        [
            gen("a", retry={"max_attempts": 2, "backoff_s": 2, "max_backoff_s": 10}),
            gen("b", depends_on=["a"]),
            gen("other"),
        ],
    )
    a = next(d for d in dispatcher.sent if d.step_run_id == steps_of(wid)["a"].id)
    assert claims.claim_step(a.step_run_id, 1) is not None
    retry = RecordingDispatcher()
    status = engine.fail_step(a.step_run_id, 1, "boom", retryable=True, dispatcher=retry)
    assert status is StepStatus.retrying
    (again,) = retry.sent
    assert again.attempt == 2 and 1.0 <= again.countdown <= 2.0
    assert claims.claim_step(a.step_run_id, 2) is not None
    final = RecordingDispatcher()
    status = engine.fail_step(a.step_run_id, 2, "boom again", retryable=True, dispatcher=final)
    assert status is StepStatus.failed
    assert final.sent == []
    s = steps_of(wid)
    assert s["b"].status is StepStatus.cancelled
    assert s["other"].status is StepStatus.cancelled  # queued, never started: nothing new starts
    run = workflow(wid)
    assert run.status is WorkflowStatus.failed and "boom again" in (run.error or "")


def test_not_retryable_fails_at_once(settings: Settings, dispatcher: RecordingDispatcher) -> None:
    wid = create(settings, dispatcher, [gen("a", retry={"max_attempts": 5})])
    d = dispatcher.sent[0]
    claims.claim_step(d.step_run_id, 1)
    rec = RecordingDispatcher()
    assert engine.fail_step(d.step_run_id, 1, "bad input", retryable=False, dispatcher=rec) is (
        StepStatus.failed
    )
    assert rec.sent == [] and workflow(wid).status is WorkflowStatus.failed


def test_conditions_and_skip_propagation(
    settings: Settings, dispatcher: RecordingDispatcher
) -> None:
    wid = create(
        settings,
        dispatcher,
        [
            gen("score"),
            gen("hi", depends_on=["score"], when="steps.score.output.text | int > 50"),
            gen("hi2", depends_on=["hi"]),
            gen("lo", depends_on=["score"], when="steps.score.output.text | int <= 50"),
            gen("join", depends_on=["hi2", "lo"]),
        ],
    )
    after = RecordingDispatcher()
    run_ok(dispatcher.sent[0], after, text="42")
    s = steps_of(wid)
    assert s["hi"].status is StepStatus.skipped and "condition" in (s["hi"].error or "")
    assert s["hi2"].status is StepStatus.skipped
    assert [d.step_run_id for d in after.sent] == [s["lo"].id]
    last = RecordingDispatcher()
    run_ok(after.sent[0], last)
    assert [d.step_run_id for d in last.sent] == [steps_of(wid)["join"].id]
    run_ok(last.sent[0], RecordingDispatcher())
    assert workflow(wid).status is WorkflowStatus.succeeded


def test_a_condition_reads_outputs_stored_by_earlier_results(
    settings: Settings, dispatcher: RecordingDispatcher
) -> None:
    """`c` waits for `a` and `b`; its condition reads `a`'s output, stored one result earlier
    (read from the database), and `b`'s attempts, changed in the same transaction."""
    wid = create(
        settings,
        dispatcher,
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
    first, second = sorted(dispatcher.sent, key=lambda d: d.step_run_id != steps_of(wid)["a"].id)
    run_ok(first, RecordingDispatcher(), text="yes")  # a
    after = RecordingDispatcher()
    run_ok(second, after, text="whatever")  # b: c and d are decided now
    s = steps_of(wid)
    assert [d.step_run_id for d in after.sent] == [s["c"].id]
    assert s["c"].status is StepStatus.queued
    assert s["d"].status is StepStatus.skipped and "is false" in (s["d"].error or "")


def test_templates_render_from_parent_outputs(
    settings: Settings, dispatcher: RecordingDispatcher
) -> None:
    create(
        settings,
        dispatcher,
        [
            gen("a"),
            gen("b", depends_on=["a"], input={"prompt": "Echo: {{ steps.a.output.text }}!"}),
        ],
    )
    after = RecordingDispatcher()
    run_ok(dispatcher.sent[0], after, text="hello")
    work = claims.claim_step(after.sent[0].step_run_id, 1)
    assert work is not None and work.input["prompt"] == "Echo: hello!"


def test_a_worker_that_never_saw_the_workflow_gets_its_spec_with_the_claim(
    settings: Settings, dispatcher: RecordingDispatcher, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pool process meets each workflow first at a claim: the claim's one statement
    returns the spec, which renders the step's input and settles its result."""
    wid = create(
        settings,
        dispatcher,
        [
            gen("a", timeout_s=7.5),
            gen("b", depends_on=["a"], input={"prompt": "Echo: {{ steps.a.output.text }}!"}),
        ],
    )
    monkeypatch.setattr(specs, "_SPECS", type(specs._SPECS)())  # a fresh process's cache
    work = claims.claim_step(dispatcher.sent[0].step_run_id, 1)
    assert work is not None and work.step_id == "a" and work.workflow_id == wid
    assert work.input == {"prompt": "hi", "max_tokens": 4} and work.timeout_s == 7.5
    after = RecordingDispatcher()
    assert engine.complete_step(work.step_run_id, 1, {"text": "hello"}, after)
    monkeypatch.setattr(specs, "_SPECS", type(specs._SPECS)())
    work = claims.claim_step(after.sent[0].step_run_id, 1)
    assert work is not None and work.input["prompt"] == "Echo: hello!"


def test_cancel(settings: Settings, dispatcher: RecordingDispatcher) -> None:
    wid = create(settings, dispatcher, [gen("a"), gen("b", depends_on=["a"])])
    d = dispatcher.sent[0]
    claims.claim_step(d.step_run_id, 1)
    run = engine.cancel_workflow(wid)
    assert run.status is WorkflowStatus.cancelled
    assert {s.status for s in steps_of(wid).values()} == {StepStatus.cancelled}
    # The running attempt's late result is discarded; nothing advances.
    late = RecordingDispatcher()
    assert not engine.complete_step(d.step_run_id, 1, {"text": "late"}, late)
    assert late.sent == [] and steps_of(wid)["a"].output is None
    with pytest.raises(ConflictError, match="already cancelled"):
        engine.cancel_workflow(wid)


def test_backoff_is_exponential_with_jitter() -> None:
    for attempt, ceiling in [(1, 1.0), (2, 2.0), (3, 4.0), (6, 10.0)]:
        delays = [engine.backoff_delay(attempt, 1.0, 10.0) for _ in range(200)]
        assert all(ceiling / 2 <= x <= ceiling for x in delays)
        assert len(set(delays)) > 100
