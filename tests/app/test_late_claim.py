"""A claim left for later (``CORRAL_CLAIM_AFTER_S``): the engine's side, against a real
database (SQLite, and PostgreSQL when configured).

A worker reads the step (``open_step``) instead of claiming it; the step is marked running
(``mark_running``) only once it has run a while, and a result stores a step it never
marked. Every rule of the claim still holds: one result per attempt, a stale or cancelled
delivery records nothing, a retry counts its attempt.
"""

from __future__ import annotations

import threading
import time
from datetime import timedelta

from app import claims, engine
from app.core.config import Settings
from app.rows import SENDABLE
from app.store.tables import StepStatus, WorkflowStatus, utcnow
from tests.app.test_engine import create, gen, steps_of, workflow
from tests.utils.recording import RecordingDispatcher


def test_a_result_stores_a_step_never_marked_running(
    settings: Settings, dispatcher: RecordingDispatcher
) -> None:
    wid = create(settings, dispatcher, [gen("a"), gen("b", depends_on=["a"])])
    (d,) = dispatcher.sent
    work = claims.open_step(d.step_run_id, d.attempt)
    assert work is not None and not work.claimed
    # The read wrote nothing: the step is as the submit left it.
    a = steps_of(wid)["a"]
    assert (a.status, a.attempts, a.started_at) == (StepStatus.queued, 0, None)
    started = utcnow() - timedelta(seconds=3)
    after = RecordingDispatcher()
    assert engine.complete_step(d.step_run_id, 1, {"text": "x"}, after, started_at=started)
    a = steps_of(wid)["a"]
    assert (a.status, a.attempts, a.output) == (StepStatus.succeeded, 1, {"text": "x"})
    assert a.started_at is not None and abs(a.started_at - started) < timedelta(milliseconds=1)
    assert a.finished_at is not None and a.finished_at >= a.started_at
    assert [s.step_run_id for s in after.sent] == [steps_of(wid)["b"].id]


def test_mark_running_claims_as_of_the_start(
    settings: Settings, dispatcher: RecordingDispatcher
) -> None:
    wid = create(settings, dispatcher, [gen("a")])
    (d,) = dispatcher.sent
    work = claims.open_step(d.step_run_id, d.attempt)
    assert work is not None
    time.sleep(0.02)  # the step has run a while when its claim is written
    assert claims.mark_running(work) and work.claimed
    a = steps_of(wid)["a"]
    assert (a.status, a.attempts) == (StepStatus.running, 1)
    assert a.started_at is not None
    assert abs(a.started_at - work.started_at) < timedelta(milliseconds=1)
    # ...and the row was last changed then, not when it started.
    assert a.updated_at is not None and a.updated_at - a.started_at >= timedelta(seconds=0.02)
    assert engine.complete_step(d.step_run_id, 1, {"text": "x"}, RecordingDispatcher())
    assert workflow(wid).status is WorkflowStatus.succeeded


def test_unmarked_duplicates_record_one_result_and_advance_once(
    settings: Settings, dispatcher: RecordingDispatcher
) -> None:
    wid = create(settings, dispatcher, [gen("a"), gen("b", depends_on=["a"])])
    (d,) = dispatcher.sent
    first, second = (claims.open_step(d.step_run_id, 1) for _ in range(2))
    assert first is not None and second is not None
    barrier = threading.Barrier(2)
    stored: list[bool] = []
    sent = [RecordingDispatcher(), RecordingDispatcher()]

    def finish(text: str, rec: RecordingDispatcher) -> None:
        barrier.wait()
        stored.append(engine.complete_step(d.step_run_id, 1, {"text": text}, rec))

    threads = [
        threading.Thread(target=finish, args=(t, r)) for t, r in zip("xy", sent, strict=True)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(stored) == [False, True]
    assert len(sent[0].sent) + len(sent[1].sent) == 1
    assert steps_of(wid)["a"].attempts == 1
    # The stored result ends every other delivery of the attempt.
    assert claims.open_step(d.step_run_id, 1) is None
    assert not claims.mark_running(second)


def test_an_unmarked_failure_counts_its_attempt_and_retries(
    settings: Settings, dispatcher: RecordingDispatcher
) -> None:
    wid = create(settings, dispatcher, [gen("a", retry={"max_attempts": 2, "backoff_s": 0.1})])
    (d,) = dispatcher.sent
    assert claims.open_step(d.step_run_id, 1) is not None
    retry = RecordingDispatcher()
    status = engine.fail_step(d.step_run_id, 1, "boom", retryable=True, dispatcher=retry)
    assert status is StepStatus.retrying
    a = steps_of(wid)["a"]
    assert (a.status, a.attempts, a.error) == (StepStatus.retrying, 1, "boom")
    assert [s.attempt for s in retry.sent] == [2]
    # The first attempt's deliveries are stale now; the second runs, unmarked too.
    assert claims.open_step(d.step_run_id, 1) is None
    assert engine.fail_step(d.step_run_id, 1, "late", retryable=True, dispatcher=retry) is None
    assert claims.open_step(d.step_run_id, 2) is not None
    assert engine.complete_step(d.step_run_id, 2, {"text": "ok"}, RecordingDispatcher())
    assert steps_of(wid)["a"].attempts == 2
    assert workflow(wid).status is WorkflowStatus.succeeded


def test_a_cancel_ends_an_unmarked_step(
    settings: Settings, dispatcher: RecordingDispatcher
) -> None:
    wid = create(settings, dispatcher, [gen("a")])
    (d,) = dispatcher.sent
    work = claims.open_step(d.step_run_id, 1)
    assert work is not None
    engine.cancel_workflow(wid)
    assert not claims.mark_running(work)
    assert not engine.complete_step(d.step_run_id, 1, {"text": "x"}, RecordingDispatcher())
    assert engine.fail_step(d.step_run_id, 1, "x", retryable=True, dispatcher=dispatcher) is None
    engine.note_cancelled(d.step_run_id, 1, "stopped after 3 tokens", claimed=False)
    a = steps_of(wid)["a"]
    assert (a.status, a.attempts, a.error) == (StepStatus.cancelled, 1, "stopped after 3 tokens")
    assert a.output is None
    assert claims.open_step(d.step_run_id, 1) is None


def test_a_workflow_that_ended_refuses_an_unmarked_result(
    settings: Settings, dispatcher: RecordingDispatcher
) -> None:
    wid = create(settings, dispatcher, [gen("a"), gen("b")])
    a_id, b_id = steps_of(wid)["a"].id, steps_of(wid)["b"].id
    assert claims.open_step(b_id, 1) is not None
    # a fails for good: the workflow fails; b's result must not be stored afterwards.
    assert claims.claim_step(a_id, 1) is not None
    engine.fail_step(a_id, 1, "bad", retryable=False, dispatcher=RecordingDispatcher())
    assert workflow(wid).status is WorkflowStatus.failed
    assert steps_of(wid)["b"].status not in SENDABLE
    assert not engine.complete_step(b_id, 1, {"text": "late"}, RecordingDispatcher())
    assert steps_of(wid)["b"].output is None


def test_a_redelivery_after_a_late_claim_runs_the_attempt_again(
    settings: Settings, dispatcher: RecordingDispatcher
) -> None:
    # The worker marked it running and died: the message comes back for the same attempt.
    wid = create(settings, dispatcher, [gen("a")])
    (d,) = dispatcher.sent
    work = claims.open_step(d.step_run_id, 1)
    assert work is not None and claims.mark_running(work)
    again = claims.open_step(d.step_run_id, 1)
    assert again is not None
    assert engine.complete_step(d.step_run_id, 1, {"text": "x"}, RecordingDispatcher())
    assert steps_of(wid)["a"].attempts == 1
