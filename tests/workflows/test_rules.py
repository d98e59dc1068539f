"""The workflow rules as plain functions: examples, and properties over random DAGs."""

from __future__ import annotations

from collections.abc import Mapping

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app.store.tables import StepStatus, WorkflowStatus
from app.workflows import rules
from app.workflows.rules import Run, Send, StepDef, StepState

S = StepStatus


def dag(*steps: StepDef) -> dict[str, StepDef]:
    return {s.id: s for s in steps}


def new_run(defs: Mapping[str, StepDef]) -> Run:
    return Run("wf", "t", WorkflowStatus.running, {sid: StepState() for sid in defs})


def statuses(run: Run) -> dict[str, StepStatus]:
    return {sid: s.status for sid, s in run.steps.items()}


def deliver(defs: Mapping[str, StepDef], run: Run, send: Send, output: object = None) -> Run:
    """Claim ``send`` and succeed it; the run after."""
    assert rules.claim(run, send.step_id, send.attempt)
    run = rules.started(run, send.step_id, send.attempt).run
    nxt = rules.succeed(defs, run, send.step_id, send.attempt, output or {"text": "ok"})
    assert nxt is not None
    return nxt.run


def test_roots_are_queued_and_the_rest_waits() -> None:
    defs = dag(StepDef("a"), StepDef("b"), StepDef("c", depends_on=("a", "b")))
    nxt = rules.start(defs, new_run(defs))
    assert statuses(nxt.run) == {"a": S.queued, "b": S.queued, "c": S.pending}
    assert nxt.sends == (Send("a", 1), Send("b", 1))
    assert not nxt.finished


def test_a_join_is_sent_once_when_its_last_parent_succeeds() -> None:
    defs = dag(StepDef("a"), StepDef("b"), StepDef("c", depends_on=("a", "b")))
    run = rules.start(defs, new_run(defs)).run
    run = deliver(defs, run, Send("a", 1))
    assert run.steps["c"].status is S.pending
    assert rules.claim(run, "b", 1)
    run = rules.started(run, "b", 1).run
    nxt = rules.succeed(defs, run, "b", 1, {"text": "b"})
    assert nxt is not None and nxt.sends == (Send("c", 1),)


def test_a_stale_delivery_runs_nothing_and_one_result_is_stored() -> None:
    defs = dag(StepDef("a"))
    run = rules.start(defs, new_run(defs)).run
    assert not rules.claim(run, "a", 2)  # not the attempt it is ready for
    run = rules.started(run, "a", 1).run
    assert rules.claim(run, "a", 1)  # delivered again: its first worker may have died
    assert not rules.claim(run, "a", 2)
    done = rules.succeed(defs, run, "a", 1, {"text": "x"})
    assert done is not None and done.finished and done.run.status is WorkflowStatus.succeeded
    assert rules.succeed(defs, done.run, "a", 1, {"text": "again"}) is None


def test_a_retryable_failure_is_retried_with_backoff_then_fails_the_workflow() -> None:
    defs = dag(StepDef("a", max_attempts=2, backoff_s=4, max_backoff_s=10), StepDef("b"))
    run = rules.start(defs, new_run(defs)).run
    run = rules.started(run, "a", 1).run
    retry = rules.fail(defs, run, "a", 1, "boom", retryable=True, jitter=0.0)
    assert retry is not None and retry.run.steps["a"].status is S.retrying
    assert retry.sends == (Send("a", 2, 2.0),)  # half of 4 s at jitter 0
    run = rules.started(retry.run, "a", 2).run
    final = rules.fail(defs, run, "a", 2, "boom again", retryable=True)
    assert final is not None and final.finished
    assert final.run.status is WorkflowStatus.failed
    assert final.run.error == "step 'a' failed: boom again"
    assert final.run.steps["b"].status is S.cancelled  # queued, not started: cancelled


def test_a_step_that_is_not_retryable_fails_at_once() -> None:
    defs = dag(StepDef("a", max_attempts=5))
    run = rules.started(rules.start(defs, new_run(defs)).run, "a", 1).run
    nxt = rules.fail(defs, run, "a", 1, "bad input", retryable=False)
    assert nxt is not None and nxt.run.steps["a"].status is S.failed and nxt.sends == ()


def test_running_steps_finish_after_the_workflow_failed() -> None:
    defs = dag(StepDef("a"), StepDef("b"))
    run = rules.start(defs, new_run(defs)).run
    run = rules.started(rules.started(run, "a", 1).run, "b", 1).run
    failed = rules.fail(defs, run, "a", 1, "x", retryable=False)
    assert failed is not None and failed.run.steps["b"].status is S.running
    late = rules.succeed(defs, failed.run, "b", 1, {"text": "late"})
    assert late is not None and late.run.steps["b"].status is S.succeeded
    assert late.run.status is WorkflowStatus.failed and not late.finished


def test_conditions_skip_and_skips_propagate() -> None:
    defs = dag(
        StepDef("a"),
        StepDef("yes", depends_on=("a",), when="steps.a.output.text == 'go'"),
        StepDef("no", depends_on=("a",), when="steps.a.output.text != 'go'"),
        StepDef("after_no", depends_on=("no",)),
        StepDef("bad", depends_on=("a",), when="steps.a.output.text +"),
    )
    run = rules.start(defs, new_run(defs)).run
    run = rules.started(run, "a", 1).run
    nxt = rules.succeed(defs, run, "a", 1, {"text": "go"})
    assert nxt is not None
    got = statuses(nxt.run)
    assert got["yes"] is S.queued or got["yes"] is S.cancelled
    assert got["no"] is S.skipped and got["after_no"] is S.skipped
    assert got["bad"] is S.failed  # a condition that cannot be evaluated fails its step
    assert nxt.run.status is WorkflowStatus.failed and got["yes"] is S.cancelled


def test_cancel_ends_every_unfinished_step_once() -> None:
    defs = dag(StepDef("a"), StepDef("b", depends_on=("a",)))
    run = rules.started(rules.start(defs, new_run(defs)).run, "a", 1).run
    nxt = rules.cancel(run)
    assert nxt is not None and nxt.finished
    assert statuses(nxt.run) == {"a": S.cancelled, "b": S.cancelled}
    assert rules.cancel(nxt.run) is None
    assert rules.succeed(defs, nxt.run, "a", 1, {}) is None  # its result is refused


@pytest.mark.parametrize(
    ("attempt", "jitter", "expected"),
    [(1, 0.0, 0.5), (1, 1.0, 1.0), (3, 0.5, 3.0), (10, 1.0, 60.0)],
)
def test_backoff_is_exponential_with_equal_jitter_and_a_cap(
    attempt: int, jitter: float, expected: float
) -> None:
    assert rules.backoff_delay(attempt, 1.0, 60.0, jitter) == pytest.approx(expected)


# ---- properties over random DAGs -------------------------------------------------------

CONDITIONS = [None, None, "true", "false", "steps | length >= 0", "1 +"]


@st.composite
def dags(draw: st.DrawFn) -> dict[str, StepDef]:
    n = draw(st.integers(1, 30))
    defs: dict[str, StepDef] = {}
    for i in range(n):
        earlier = list(defs)
        deps = draw(st.lists(st.sampled_from(earlier), max_size=3, unique=True)) if earlier else []
        defs[f"s{i}"] = StepDef(
            f"s{i}",
            depends_on=tuple(deps),
            when=draw(st.sampled_from(CONDITIONS)),
            max_attempts=draw(st.integers(1, 3)),
        )
    return defs


OUTCOMES = st.sampled_from(["ok", "ok", "ok", "retryable", "final"])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(defs=dags(), data=st.data())
def test_every_run_terminates_and_keeps_the_invariants(
    defs: dict[str, StepDef], data: st.DataObject
) -> None:
    """Deliveries in any order, duplicated, results in any order, a cancel at any time."""
    first = rules.start(defs, new_run(defs))
    run = first.run
    queue: list[Send] = list(first.sends)  # sent, not delivered yet
    running: list[Send] = []  # claimed, result not stored yet
    delivered: list[Send] = []
    sent: set[tuple[str, int]] = {(s.step_id, s.attempt) for s in first.sends}
    assert len(sent) == len(first.sends)
    succeeded: dict[str, int] = {}
    skipped = {sid for sid, s in run.steps.items() if s.status is S.skipped}
    cancel_at = data.draw(st.one_of(st.none(), st.integers(0, 80)), label="cancel_at")
    for tick in range(2000):
        if not queue and not running:
            break
        if tick == cancel_at and (ended := rules.cancel(run)) is not None:
            run = ended.run
        deliver_next = queue and (not running or data.draw(st.booleans(), label="deliver"))
        if deliver_next:
            if delivered and data.draw(st.booleans(), label="duplicate"):
                send = data.draw(st.sampled_from(delivered), label="again")
            else:
                send = queue.pop(data.draw(st.integers(0, len(queue) - 1), label="which"))
                delivered.append(send)
            if rules.claim(run, send.step_id, send.attempt):
                run = rules.started(run, send.step_id, send.attempt).run
                running.append(send)
            continue
        send = running.pop(data.draw(st.integers(0, len(running) - 1), label="finish"))
        outcome = data.draw(OUTCOMES, label="outcome")
        before = run
        if outcome == "ok":
            nxt = rules.succeed(defs, run, send.step_id, send.attempt, {"text": "ok"})
        else:
            nxt = rules.fail(
                defs, run, send.step_id, send.attempt, "x", retryable=outcome == "retryable"
            )
        step = run.steps[send.step_id]
        owns = step.status is S.running and step.attempts == send.attempt
        assert (nxt is not None) == owns  # only the running attempt's result is stored
        if nxt is None:
            continue
        if outcome == "ok":
            succeeded[send.step_id] = succeeded.get(send.step_id, 0) + 1
        if nxt.run.status is WorkflowStatus.failed and before.status is WorkflowStatus.running:
            # The failure that ends the workflow cancels exactly the steps not started.
            for sid, old in before.steps.items():
                new = nxt.run.steps[sid]
                if old.status is S.pending and new.status is S.failed:
                    assert defs[sid].when == "1 +"  # a condition that failed is a cause
                elif old.status is S.pending and new.status is S.skipped:
                    assert new.error is not None and new.error.startswith("skipped:")
                elif old.status is S.pending or old.status in rules.SENDABLE:
                    assert new.status is S.cancelled, sid
                elif old.status is S.running and sid != send.step_id:
                    assert new.status is S.running, sid
                elif old.status.terminal:
                    assert new == old, sid
        for s in nxt.sends:
            assert (s.step_id, s.attempt) not in sent, "an attempt was sent twice"
            sent.add((s.step_id, s.attempt))
        queue.extend(nxt.sends)
        run = nxt.run
        for sid in skipped:
            assert run.steps[sid].status is S.skipped, "a skipped step changed"
        skipped |= {sid for sid, s in run.steps.items() if s.status is S.skipped}
    assert not queue and not running, "the run did not terminate"
    assert run.status.terminal
    assert all(s.status.terminal for s in run.steps.values())
    assert all(n == 1 for n in succeeded.values()), "a step (a join) succeeded twice"
    if run.status is WorkflowStatus.succeeded:
        assert all(s.status in (S.succeeded, S.skipped) for s in run.steps.values())
