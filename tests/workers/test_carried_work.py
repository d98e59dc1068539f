"""A new workflow's only ready step carries its work in its message (``app.claims.carry``).

On a database server its worker takes the step from the message instead of reading it:
no round trip before the model runs. What it takes equals what the read gives; a cancel
is seen by its flag (read before the model only for a step that waited in its queue
longer than a cancel poll, or whose chat uses memory; otherwise at the model's first
poll); a delivery that is no longer the step's (a duplicate, a cancel whose flag was
lost) runs and has its result refused, changing nothing; text that is not this
delivery's is ignored and the step read. The product's task on a real Celery worker takes
the header. On SQLite, whose read is a call in the worker's process, nothing is carried.
PostgreSQL for the carried path, with the tiny model on llama.cpp."""

from __future__ import annotations

import contextlib
import json
import threading
from datetime import datetime, timedelta
from typing import Any

import pytest
from celery.contrib.testing.worker import start_worker

from app import claims, engine
from app.scheduler import live
from app.core.config import Settings, use_settings
from app.dispatch import CeleryDispatcher
from app.engine import Dispatch
from app.store.tables import StepStatus, WorkflowStatus, utcnow
from models.catalog import load_catalog
from tests.app.test_engine import create, gen, steps_of, workflow
from tests.utils.databases import with_database
from tests.utils.recording import RecordingDispatcher
from workers.runtime import LlamaCppRuntime, ModelRuntime
from workers.steps import run_step, take

# What a taken step holds that does not depend on when or how it was taken.
_FIELDS = ("step_run_id", "workflow_id", "step_id", "kind", "model", "attempt", "input")
_FIELDS += ("timeout_s", "claimed", "input_error")
BROKER_DB = "10"  # of the test Redis: the broker of this module's worker; no other test uses it


class CountingRuntime:
    """The real runtime, counting the model calls (a spy: every call goes through)."""

    def __init__(self, real: LlamaCppRuntime) -> None:
        self.real = real
        self.calls = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)

    def generate(self, params: dict[str, Any], control: Any) -> dict[str, Any]:
        self.calls += 1
        return self.real.generate(params, control)


@pytest.fixture
def counting(runtime: LlamaCppRuntime) -> CountingRuntime:
    return CountingRuntime(runtime)


@pytest.fixture
def pg(settings: Settings) -> Settings:
    if not settings.sqlalchemy_url.startswith("postgresql"):
        pytest.skip("a step carries its work where its read is a round trip: PostgreSQL")
    return settings


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int]]:
    """Every read of a step by a worker (``open_step``), still made."""
    made: list[tuple[str, int]] = []
    real = claims.open_step

    def spy(step_run_id: str, attempt: int) -> claims.StepWork | None:
        made.append((step_run_id, attempt))
        return real(step_run_id, attempt)

    monkeypatch.setattr(claims, "open_step", spy)
    return made


def _one(settings: Settings, steps: list[dict[str, Any]] | None = None) -> tuple[str, Dispatch]:
    sent = RecordingDispatcher()
    wid = create(settings, sent, steps or [gen("a")])
    (d,) = sent.sent
    return wid, d


def _run(d: Dispatch, runtime: ModelRuntime, carried: str | None) -> str:
    return run_step(d.step_run_id, d.attempt, runtime, RecordingDispatcher(), carried=carried)


def test_on_sqlite_a_step_carries_nothing_and_is_read(
    settings: Settings, counting: CountingRuntime, reads: list[tuple[str, int]]
) -> None:
    if not settings.sqlalchemy_url.startswith("sqlite"):
        pytest.skip("SQLite's read is a call in the worker's process")
    wid, d = _one(settings)
    assert d.work is None
    assert _run(d, counting, d.work) == "succeeded"
    assert reads == [(d.step_run_id, 1)]
    assert steps_of(wid)["a"].status is StepStatus.succeeded


@pytest.mark.usefixtures("pg")
def test_the_carried_work_is_what_the_read_gives(settings: Settings) -> None:
    _wid, d = _one(settings, [gen("a", timeout_s=30, input={"prompt": "{{ workflow.name }}!"})])
    assert d.work is not None and len(d.work) <= claims.CARRY_MAX
    carried = claims.take_carried(d.work, d.step_run_id, d.attempt)
    read = claims.open_step(d.step_run_id, d.attempt)
    assert carried is not None and read is not None
    assert {f: getattr(carried, f) for f in _FIELDS} == {f: getattr(read, f) for f in _FIELDS}
    assert carried.input["prompt"] == "t!" and carried.timeout_s == 30
    assert abs(carried.queued_ms - read.queued_ms) < 1000
    # The states a result settles against: the same as read.
    assert carried.seen is not None and read.seen is not None
    assert carried.seen.text() == read.seen.text()
    assert carried.seen.states() == read.seen.states()


@pytest.mark.usefixtures("pg")
def test_only_a_step_with_nothing_beside_it_carries_its_work(settings: Settings) -> None:
    two = RecordingDispatcher()
    create(settings, two, [gen("a"), gen("b")])
    assert len(two.sent) == 2 and all(d.work is None for d in two.sent)
    # A chain's head carries; the step its result readies is read (its inputs are above).
    wid, head = _one(settings, [gen("a"), gen("b", depends_on=["a"])])
    assert head.work is not None
    after = RecordingDispatcher()
    assert engine.complete_step(head.step_run_id, 1, {"text": "x"}, after)
    (nxt,) = after.sent
    assert nxt.work is None and steps_of(wid)["b"].status is StepStatus.queued
    # A spec too long to carry: the step is read.
    _wid, big = _one(settings, [gen("a", input={"prompt": "x" * claims.CARRY_MAX})])
    assert big.work is None


@pytest.mark.usefixtures("pg")
def test_a_carried_step_runs_without_a_read(
    settings: Settings,
    counting: CountingRuntime,
    reads: list[tuple[str, int]],
    scripts: list[list[Any]],
) -> None:
    wid, d = _one(settings)
    stored = engine.SEEN_RESULTS["stored"]
    scripts.clear()
    assert _run(d, counting, d.work) == "succeeded"
    assert reads == [] and counting.calls == 1
    a = steps_of(wid)["a"]
    assert (a.status, a.attempts) == (StepStatus.succeeded, 1)
    assert a.output is not None and a.output["completion_tokens"] > 0
    assert workflow(wid).status is WorkflowStatus.succeeded
    # The whole step: one round trip, the result's, against the states carried.
    assert len(scripts) == 1 and scripts[0][0] is claims.rows.LOCK_BY_ID
    assert engine.SEEN_RESULTS["stored"] - stored == 1


def _sent_at(text: str, at: datetime) -> str:
    """Carried work as if its step had been queued at ``at`` (the API host's clock)."""
    return json.dumps({**json.loads(text), "queued_at": at.isoformat()})


@pytest.fixture
def flag_reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every look at a workflow's cancel flag in Redis, still made."""
    made: list[str] = []
    real = live.is_cancelled

    def spy(workflow_id: str) -> bool:
        made.append(workflow_id)
        return real(workflow_id)

    monkeypatch.setattr(live, "is_cancelled", spy)
    return made


@pytest.mark.usefixtures("pg")
def test_a_cancelled_workflow_s_carried_step_that_waited_does_not_run(
    settings: Settings, counting: CountingRuntime, flag_reads: list[str]
) -> None:
    # Queued longer ago than a cancel poll (a backlog): the flag is read before the model.
    wid, d = _one(settings)
    assert d.work is not None
    engine.cancel_workflow(wid)
    live.request_cancel(wid)  # what the API's cancel does besides
    before = steps_of(wid)["a"]
    waited = _sent_at(d.work, utcnow() - timedelta(seconds=10))
    assert _run(d, counting, waited) == "stale"
    assert counting.calls == 0 and flag_reads == [wid]
    after = steps_of(wid)["a"]
    assert (after.status, after.attempts, after.output, after.updated_at) == (
        StepStatus.cancelled,
        0,
        None,
        before.updated_at,
    )


@pytest.mark.usefixtures("pg")
def test_a_fresh_carried_step_starts_without_reading_the_flag(
    settings: Settings, counting: CountingRuntime, flag_reads: list[str]
) -> None:
    # Sent within a cancel poll: no round trip to Redis before the model. A cancel made
    # meanwhile stops it at its first poll, and its result is refused either way.
    wid, d = _one(settings)
    assert d.work is not None
    assert _run(d, counting, d.work) == "succeeded"
    assert flag_reads == [] and counting.calls == 1
    assert steps_of(wid)["a"].status is StepStatus.succeeded

    # Cancelled (flag set) and fresh: a short step runs and its result is refused.
    wid, d = _one(settings)
    assert d.work is not None
    engine.cancel_workflow(wid)
    live.request_cancel(wid)
    before = steps_of(wid)["a"]
    with use_settings(settings.model_copy(update={"cancel_poll_s": 60.0})):
        assert _run(d, counting, d.work) == "discarded"
    assert flag_reads == [] and counting.calls == 2
    after = steps_of(wid)["a"]
    assert (after.status, after.output, after.updated_at) == (
        StepStatus.cancelled,
        None,
        before.updated_at,
    )

    # A long one stops at its first poll of the flag. (Its send time ahead of this
    # host's clock, as with a skewed API host: fresh however slow this test runs.)
    long = {"prompt": "hi", "max_tokens": 400, "ignore_eos": True}
    wid, d = _one(settings, [gen("a", input=long)])
    assert d.work is not None
    engine.cancel_workflow(wid)
    live.request_cancel(wid)
    ahead = _sent_at(d.work, utcnow() + timedelta(seconds=30))
    with use_settings(settings.model_copy(update={"cancel_poll_s": 0.005})):
        assert _run(d, counting, ahead) == "cancelled"
    assert flag_reads == [wid] and counting.calls == 3
    after = steps_of(wid)["a"]
    assert after.status is StepStatus.cancelled and after.output is None
    assert after.error is not None and "stopped the model after" in after.error
    stopped_at = int(after.error.split("after ")[1].split(" ")[0])
    assert 0 < stopped_at < 400


@pytest.mark.usefixtures("pg")
def test_a_fresh_carried_memory_chat_reads_the_flag_first(
    settings: Settings, flag_reads: list[str]
) -> None:
    # A step with effects beyond its result (memory tools) never starts once cancelled.
    tools = {
        "messages": [{"role": "user", "content": "hi"}],
        "tools": ["memory_append"],
        "user_id": "u1",
        "max_tokens": 4,
    }
    wid, d = _one(settings, [{"id": "c", "kind": "chat", "model": "tiny-chat", "input": tools}])
    assert d.work is not None
    engine.cancel_workflow(wid)
    live.request_cancel(wid)
    assert take(d.step_run_id, d.attempt, d.work) is None
    assert flag_reads == [wid]


@pytest.mark.usefixtures("pg")
def test_a_delivery_no_longer_the_step_s_has_its_result_refused(
    settings: Settings, counting: CountingRuntime
) -> None:
    # Cancelled with no flag in Redis (the API's flag lost): it runs, and changes nothing.
    wid, d = _one(settings)
    engine.cancel_workflow(wid)
    before = steps_of(wid)["a"]
    assert _run(d, counting, d.work) == "discarded"
    assert counting.calls == 1
    after = steps_of(wid)["a"]
    assert (after.status, after.output, after.updated_at) == (
        StepStatus.cancelled,
        None,
        before.updated_at,
    )
    # A duplicate of a delivery whose result is stored: refused, the result not doubled.
    wid, d = _one(settings)
    assert _run(d, counting, d.work) == "succeeded"
    first = steps_of(wid)["a"]
    assert _run(d, counting, d.work) == "discarded"
    again = steps_of(wid)["a"]
    assert (again.output, again.attempts, again.updated_at) == (
        first.output,
        1,
        first.updated_at,
    )
    assert workflow(wid).status is WorkflowStatus.succeeded


@pytest.mark.usefixtures("pg")
def test_work_that_is_not_this_delivery_s_is_ignored_and_the_step_read(
    settings: Settings, counting: CountingRuntime, reads: list[tuple[str, int]]
) -> None:
    _wid, d = _one(settings)
    assert d.work is not None
    work = json.loads(d.work)
    other = json.dumps({**work, "step_run_id": "another-step"})
    # A step with steps above it (its inputs read theirs): never carried, and not taken so.
    above = {"workflow_id": "wf-above", "spec": {"name": "t", "steps": [gen("a"), gen("b")]}}
    above["spec"]["steps"][0]["depends_on"] = ["b"]
    below = json.dumps({**work, **above})
    for text in ("not json", "[]", other, json.dumps({**work, "steps": 3}), below):
        assert claims.take_carried(text, d.step_run_id, d.attempt) is None
    assert claims.take_carried(d.work, d.step_run_id, 2) is None  # a retry is read
    wid, d = _one(settings)
    assert _run(d, counting, "not json") == "succeeded"
    assert reads == [(d.step_run_id, 1)]
    assert steps_of(wid)["a"].status is StepStatus.succeeded


@pytest.mark.usefixtures("pg")
def test_claim_after_zero_claims_before_the_model_even_with_carried_work(
    settings: Settings, counting: CountingRuntime, reads: list[tuple[str, int]]
) -> None:
    with use_settings(settings.model_copy(update={"claim_after_s": 0.0})):
        wid, d = _one(settings)
        assert _run(d, counting, d.work) == "succeeded"
    assert reads == []  # claim_step, which writes the claim, not the carried work
    assert steps_of(wid)["a"].status is StepStatus.succeeded


@pytest.mark.usefixtures("pg")
def test_a_worker_runs_a_carried_step_from_its_message(
    settings: Settings,
    redis_base_url: str,
    counting: CountingRuntime,
    reads: list[tuple[str, int]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The product's task on a real worker (Celery's test worker, in a thread, on the real
    Redis broker), the steps sent by the product's dispatcher: a one-step workflow runs
    without a read of its step; a workflow of two ready steps has each read."""
    import redis

    from app.workflows.spec import validate_workflow
    from workers import process, tasks
    from workers.celery_app import STEP_TASK, make_celery, queue_for

    # A Redis database of this test's own: no other test's worker takes its messages.
    broker = with_database(redis_base_url, BROKER_DB)

    def flush() -> None:
        with redis.Redis.from_url(broker) as client:
            client.flushdb()

    flush()
    stack = contextlib.ExitStack()
    stack.enter_context(use_settings(settings.model_copy(update={"redis_url": broker})))
    stack.callback(flush)
    monkeypatch.setattr(process._State, "runtime", counting)  # this process's loaded model
    celery = make_celery()  # on that Redis, with the product's tasks
    celery.finalize()  # the product's step task, registered on every app once imported
    assert celery.tasks[STEP_TASK].run.__func__ is tasks.run_step_task.run.__func__
    queue = queue_for("tiny-chat")
    catalog = load_catalog(settings.catalog_path)

    def submit(steps: list[dict[str, Any]]) -> str:
        validated = validate_workflow({"name": "t", "steps": steps}, catalog, settings)
        return engine.create_workflow(validated, CeleryDispatcher(celery)).id

    def wait(wid: str) -> None:
        for _ in range(600):
            if workflow(wid).status is not WorkflowStatus.running:
                return
            threading.Event().wait(0.05)
        raise AssertionError(f"workflow {wid} still running")

    with stack, start_worker(celery, queues=[queue], perform_ping_check=False, pool="solo"):
        one = submit([gen("a")])
        wait(one)
        assert reads == [] and counting.calls == 1
        two = submit([gen("a"), gen("b")])
        wait(two)
    celery.close()
    assert workflow(one).status is WorkflowStatus.succeeded
    assert workflow(two).status is WorkflowStatus.succeeded
    assert sorted(reads) == sorted((s.id, 1) for s in steps_of(two).values())
    assert counting.calls == 3
