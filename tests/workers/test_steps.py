"""A step attempt end to end in process: ``run_step`` with a real llama.cpp runtime on the
tiny model, a real database (SQLite, and PostgreSQL when configured) and a real Redis
(the tests' own database, which no worker consumes: what a result readies is sent there).
"""

from __future__ import annotations

import base64
import json
import re
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from app.core.config import Settings, use_settings
from app.core.errors import ServiceUnavailable
from app.store.tables import StepRun, StepStatus, WorkflowStatus
from app.workflows import engine, service
from app.workflows.names import queue_for
from tests.utils.workflows import gen, submit
from workers import steps
from workers.runtime import LlamaCppRuntime
from workers.steps import run_step


def steps_of(workflow_id: str) -> dict[str, StepRun]:
    _, rows = engine.read(workflow_id, None)
    return {r.step_id: r for r in rows}


def status_of(workflow_id: str) -> WorkflowStatus:
    return service.read(workflow_id, None).status


@pytest.fixture
def broker(isolated: Settings) -> Iterator[redis.Redis]:
    c = redis.Redis.from_url(isolated.broker_url)
    yield c
    c.close()


def sent(client: redis.Redis, step_run_id: str) -> dict[int, str | None]:
    """The attempts of a step on its queue, each with its ETA."""
    out: dict[int, str | None] = {}
    for raw in client.lrange(queue_for("tiny-chat"), 0, -1):
        message = json.loads(raw)
        (sid, attempt), _kwargs, _embed = json.loads(base64.b64decode(message["body"]))
        if sid == step_run_id:
            out[attempt] = message["headers"].get("eta")
    return out


def test_a_step_runs_and_its_result_is_stored(
    isolated: Settings, runtime: LlamaCppRuntime, broker: redis.Redis
) -> None:
    wid = submit(
        isolated,
        gen("a", max_tokens=8),
        gen("b", prompt="{{ steps.a.output.text }}!", depends_on=["a"]),
    )
    a = steps_of(wid)["a"]
    assert run_step(a.id, 1, runtime) == "succeeded"

    s = steps_of(wid)
    out = s["a"].output
    assert s["a"].status is StepStatus.succeeded and s["a"].attempts == 1
    assert out is not None and out["text"] and out["completion_tokens"] == 8
    assert out["model"] == "tiny-chat" and out["attempt"] == 1
    assert out["timings"]["queue_ms"] >= 0
    assert s["a"].started_at is not None and s["a"].finished_at is not None
    assert s["a"].error is None
    # What it readied was sent, after the commit; the next step renders a's output.
    assert s["b"].status in (StepStatus.queued, StepStatus.waiting_for_pool)
    assert sent(broker, s["b"].id) == {1: None}
    work = service.claim_step(s["b"].id, 1)
    assert work is not None and work.input["prompt"] == out["text"] + "!"
    assert status_of(wid) is WorkflowStatus.running


def test_a_duplicate_delivery_is_stale_and_records_nothing(
    isolated: Settings, runtime: LlamaCppRuntime
) -> None:
    wid = submit(isolated, gen("a"))
    sid = steps_of(wid)["a"].id
    assert run_step(sid, 1, runtime) == "succeeded"
    before = steps_of(wid)["a"]
    assert status_of(wid) is WorkflowStatus.succeeded

    assert run_step(sid, 1, runtime) == "stale"  # the same message delivered again
    assert run_step(sid, 2, runtime) == "stale"  # an attempt nobody sent
    after = steps_of(wid)["a"]
    assert (after.status, after.attempts, after.output, after.error) == (
        before.status,
        before.attempts,
        before.output,
        before.error,
    )
    assert after.updated_at == before.updated_at and after.finished_at == before.finished_at


def test_a_redelivery_after_its_worker_died_runs_the_attempt_and_stores_it_once(
    isolated: Settings, runtime: LlamaCppRuntime
) -> None:
    wid = submit(isolated, gen("a"))
    sid = steps_of(wid)["a"].id
    assert service.claim_step(sid, 1) is not None  # a worker claimed it, then was killed
    assert steps_of(wid)["a"].status is StepStatus.running
    assert run_step(sid, 1, runtime) == "succeeded"  # the broker delivered it again
    a = steps_of(wid)["a"]
    assert a.status is StepStatus.succeeded and a.attempts == 1
    assert run_step(sid, 1, runtime) == "stale"
    assert status_of(wid) is WorkflowStatus.succeeded


def test_a_cancel_while_it_runs_stops_the_model(
    isolated: Settings, runtime: LlamaCppRuntime
) -> None:
    tokens = 8000  # seconds of generation for the tiny model; the cancel comes far sooner
    long = gen("a", prompt="Go", max_tokens=tokens)
    long["input"]["ignore_eos"] = True
    wid = submit(isolated, long)
    sid = steps_of(wid)["a"].id

    def cancel_once_running() -> None:
        deadline = time.monotonic() + 60
        while steps_of(wid)["a"].status is not StepStatus.running:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        service.cancel(wid, None)

    canceller = threading.Thread(target=cancel_once_running)
    canceller.start()
    try:
        assert run_step(sid, 1, runtime) == "cancelled"
    finally:
        canceller.join()

    a = steps_of(wid)["a"]
    assert a.status is StepStatus.cancelled and a.output is None
    assert a.error is not None
    stopped = re.search(r"the worker stopped the model after (\d+) tokens", a.error)
    assert stopped is not None, a.error
    assert int(stopped[1]) < tokens  # stopped by the cancel, not by max_tokens
    assert status_of(wid) is WorkflowStatus.cancelled


def test_an_input_template_that_fails_to_render_fails_the_step_without_retry(
    isolated: Settings, runtime: LlamaCppRuntime, broker: redis.Redis
) -> None:
    bad = gen("a", prompt="{{ [].append(1) }}", retry={"max_attempts": 3})
    wid = submit(isolated, bad)
    sid = steps_of(wid)["a"].id
    assert run_step(sid, 1, runtime) == "failed"
    a = steps_of(wid)["a"]
    assert a.status is StepStatus.failed and a.attempts == 1
    assert a.error is not None and a.error.startswith("input template failed to render")
    assert 2 not in sent(broker, sid)  # no retry, though attempts were left
    assert status_of(wid) is WorkflowStatus.failed


def test_an_arithmetic_error_in_an_input_template_fails_the_step(
    isolated: Settings, runtime: LlamaCppRuntime
) -> None:
    """Not only Jinja's own errors: a division by zero fails the step the same way."""
    wid = submit(isolated, gen("a", prompt="{{ 1 / 0 }}", retry={"max_attempts": 2}))
    sid = steps_of(wid)["a"].id
    assert run_step(sid, 1, runtime) == "failed"
    a = steps_of(wid)["a"]
    assert a.status is StepStatus.failed and a.attempts == 1
    assert a.error is not None and "division by zero" in a.error


def test_a_crash_is_retried(
    isolated: Settings, runtime: LlamaCppRuntime, broker: redis.Redis
) -> None:
    retry = {"max_attempts": 2, "backoff_s": 1, "max_backoff_s": 1}
    wid = submit(isolated, gen("a", retry=retry))
    sid = steps_of(wid)["a"].id
    with use_settings(isolated.model_copy(update={"fault_injection": "a:1"})):
        assert run_step(sid, 1, runtime) == "retrying"
        a = steps_of(wid)["a"]
        assert a.status is StepStatus.retrying and a.attempts == 1
        assert a.error is not None and "injected fault: attempt 1 of 1" in a.error
        retried = sent(broker, sid)
        assert set(retried) == {1, 2} and retried[2] is not None  # sent again, with an ETA

        assert run_step(sid, 2, runtime) == "succeeded"
    a = steps_of(wid)["a"]
    assert a.status is StepStatus.succeeded and a.attempts == 2 and a.error is None
    assert a.output is not None and a.output["attempt"] == 2
    assert status_of(wid) is WorkflowStatus.succeeded


def test_a_crash_on_the_last_attempt_fails_the_workflow(
    isolated: Settings, runtime: LlamaCppRuntime, broker: redis.Redis
) -> None:
    wid = submit(isolated, gen("a"))  # one attempt
    sid = steps_of(wid)["a"].id
    with use_settings(isolated.model_copy(update={"fault_injection": "a:5"})):
        assert run_step(sid, 1, runtime) == "failed"
    a = steps_of(wid)["a"]
    assert a.status is StepStatus.failed and a.attempts == 1
    assert set(sent(broker, sid)) == {1}
    assert status_of(wid) is WorkflowStatus.failed


def test_a_result_is_stored_once_the_database_comes_back(
    isolated: Settings, runtime: LlamaCppRuntime, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(steps, "STORE_PATIENCE_S", 30.0)
    real = service.complete_step
    calls: list[float] = []

    def down_once(step_run_id: str, attempt: int, output: dict[str, Any]) -> bool:
        calls.append(time.monotonic())
        if len(calls) == 1:
            raise ServiceUnavailable("the database is unavailable: injected")
        return real(step_run_id, attempt, output)

    monkeypatch.setattr(service, "complete_step", down_once)
    wid = submit(isolated, gen("a"))
    sid = steps_of(wid)["a"].id
    assert run_step(sid, 1, runtime) == "succeeded"
    assert len(calls) == 2 and calls[1] - calls[0] >= 0.4  # tried again after a pause
    a = steps_of(wid)["a"]
    assert a.status is StepStatus.succeeded and a.output is not None
    assert status_of(wid) is WorkflowStatus.succeeded


def test_a_database_that_stays_down_past_the_patience_raises_and_the_retry_stores(
    isolated: Settings, runtime: LlamaCppRuntime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """run_step raises ServiceUnavailable (the task retries its message) rather than
    dropping the result quietly; the retried delivery of the same attempt runs it again
    and stores it."""
    monkeypatch.setattr(steps, "STORE_PATIENCE_S", 0.0)
    real = service.complete_step

    def down(step_run_id: str, attempt: int, output: dict[str, Any]) -> bool:
        raise ServiceUnavailable("the database is unavailable: injected")

    monkeypatch.setattr(service, "complete_step", down)
    wid = submit(isolated, gen("a"))
    sid = steps_of(wid)["a"].id
    with pytest.raises(ServiceUnavailable):
        run_step(sid, 1, runtime)
    assert steps_of(wid)["a"].status is StepStatus.running

    monkeypatch.setattr(service, "complete_step", real)  # the database is back
    assert run_step(sid, 1, runtime) == "succeeded"
    a = steps_of(wid)["a"]
    assert a.status is StepStatus.succeeded and a.attempts == 1
    assert status_of(wid) is WorkflowStatus.succeeded
