"""Sending steps to their model's queue on a real Redis, and the reconciler.

``send`` publishes real Celery messages; the tests read them back from the broker's list
for the queue, in a Redis database of their own that no worker consumes (``isolated``).
Markers say what reached the broker; the reconciler confirms them and sends again only
what never got there, and never confirms a send that is not the step's latest.
"""

from __future__ import annotations

import base64
import json
import logging
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import redis

from app.core.config import Settings, use_settings
from app.core.embedded import EmbeddedRedis
from app.scheduler import live
from app.store import db
from app.store.tables import StepRun, StepStatus
from app.workflows import dispatch, engine, service
from app.workflows.dispatch import SENT_PREFIX, SENT_TTL_S
from app.workflows.engine import Dispatch
from app.workflows.names import STEP_TASK, queue_for
from tests.utils.workflows import gen, validated

QUEUE = queue_for("tiny-chat")


def committed(settings: Settings, *steps: dict[str, Any]) -> tuple[Dispatch, ...]:
    """A new workflow committed and not sent (a crash between the commit and the publish):
    the dispatches its commit decided."""
    outcome = engine.create(validated(settings, *steps))
    assert outcome.dispatches
    return outcome.dispatches


def step(step_run_id: str) -> StepRun:
    with db.session_scope() as session:
        row = session.get(StepRun, step_run_id)
        assert row is not None
        return row


def steps_of(workflow_id: str) -> dict[str, StepRun]:
    _, rows = engine.read(workflow_id, None)
    return {r.step_id: r for r in rows}


@pytest.fixture
def client(isolated: Settings) -> Iterator[redis.Redis]:
    """A client of the tests' own Redis database (the broker ``send`` publishes to)."""
    c = redis.Redis.from_url(isolated.broker_url)
    yield c
    c.close()


def messages(client: redis.Redis, queue: str = QUEUE) -> dict[str, dict[str, Any]]:
    """The Celery messages waiting in a queue's list, by task id."""
    out = {}
    for raw in client.lrange(queue, 0, -1):
        message = json.loads(raw)
        args, kwargs, _embed = json.loads(base64.b64decode(message["body"]))
        headers = message["headers"]
        out[headers["id"]] = {
            "task": headers["task"],
            "args": args,
            "kwargs": kwargs,
            "eta": headers.get("eta"),
            "routing_key": message["properties"]["delivery_info"]["routing_key"],
        }
    return out


def of_step(got: dict[str, dict[str, Any]], step_run_id: str) -> list[str]:
    """The ids of the messages for one step (the reconciler sends every step it finds)."""
    return [task_id for task_id, m in got.items() if m["args"][0] == step_run_id]


def eta_in_s(message: dict[str, Any]) -> float:
    eta = datetime.fromisoformat(message["eta"])
    return (eta - datetime.now(UTC)).total_seconds()


# ---- send ----------------------------------------------------------------------------


def test_send_publishes_a_celery_message_on_the_models_queue_then_marks_it(
    isolated: Settings, client: redis.Redis
) -> None:
    (d,) = committed(isolated)
    assert messages(client) == {}
    assert dispatch.sent_attempts([d.step_run_id]) == {}

    dispatch.send([d])

    sid = d.step_run_id
    assert messages(client) == {
        f"{sid}-1": {
            "task": STEP_TASK,
            "args": [sid, 1],
            "kwargs": {},
            "eta": None,
            "routing_key": QUEUE,
        }
    }
    assert dispatch.sent_attempts([sid]) == {sid: 1}
    assert 0 < client.ttl(SENT_PREFIX + sid) <= SENT_TTL_S  # unconfirmed markers expire
    assert step(sid).dispatched_at is None  # recorded later, by the reconciler


def test_submit_sends_the_ready_steps_after_the_commit(
    isolated: Settings, client: redis.Redis
) -> None:
    spec = validated(isolated, gen("a"), gen("b"), gen("c", depends_on=["a", "b"]))
    wid = service.submit_validated(spec, api_key_id=None).id
    s = steps_of(wid)
    roots = [s["a"].id, s["b"].id]
    assert set(messages(client)) == {f"{sid}-1" for sid in roots}
    assert dispatch.sent_attempts([*roots, s["c"].id]) == dict.fromkeys(roots, 1)
    assert s["c"].status is StepStatus.pending


def test_a_batch_of_dispatches_is_sent_whole(isolated: Settings, client: redis.Redis) -> None:
    ds = [d for _ in range(3) for d in committed(isolated)]
    dispatch.send(ds)
    sids = [d.step_run_id for d in ds]
    got = messages(client)
    assert set(got) == {f"{sid}-1" for sid in sids}
    assert [got[f"{sid}-1"]["args"] for sid in sids] == [[sid, 1] for sid in sids]
    assert dispatch.sent_attempts(sids) == dict.fromkeys(sids, 1)


def test_a_countdown_is_sent_as_an_eta(isolated: Settings, client: redis.Redis) -> None:
    (d,) = committed(isolated)
    dispatch.send([Dispatch(d.step_run_id, d.model, 2, countdown=30.0)])
    message = messages(client)[f"{d.step_run_id}-2"]
    assert message["args"] == [d.step_run_id, 2]
    assert 20 < eta_in_s(message) <= 30


def test_a_retry_is_sent_with_its_backoff_as_an_eta(
    isolated: Settings, client: redis.Redis
) -> None:
    retry = {"max_attempts": 2, "backoff_s": 30, "max_backoff_s": 60}
    wid = service.submit_validated(validated(isolated, gen("a", retry=retry)), api_key_id=None).id
    sid = steps_of(wid)["a"].id
    assert service.claim_step(sid, 1) is not None
    assert service.fail_step(sid, 1, "boom", retryable=True) is StepStatus.retrying

    got = messages(client)
    assert got[f"{sid}-1"]["eta"] is None
    assert got[f"{sid}-2"]["args"] == [sid, 2]
    # Equal jitter: the first backoff of 30 s lands in [15, 30] s from now.
    assert 10 < eta_in_s(got[f"{sid}-2"]) <= 30
    assert dispatch.sent_attempts([sid]) == {sid: 2}


def test_a_publish_that_fails_leaves_no_marker(
    isolated: Settings, client: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    """Redis is up but refuses the push: what was published before is marked, the failed
    send and what follows it are not (the reconciler sends those), and nothing raises."""
    first, second, third = (d for _ in range(3) for d in committed(isolated))
    broken = "model.broken-queue"
    client.set(broken, "not a list")  # LPUSH fails with WRONGTYPE
    with caplog.at_level(logging.WARNING, logger="app.workflows.dispatch"):
        dispatch.send([first, Dispatch(second.step_run_id, "broken-queue", 1), third])
    assert "could not enqueue 3 step(s)" in caplog.text
    sids = [first.step_run_id, second.step_run_id, third.step_run_id]
    assert dispatch.sent_attempts(sids) == {first.step_run_id: 1}
    assert set(messages(client)) == {f"{first.step_run_id}-1"}
    assert client.get(broken) == b"not a list"
    # Unsent steps are not marked as waiting for a pool: only sent ones are.
    assert step(second.step_run_id).status is StepStatus.queued
    assert step(third.step_run_id).status is StepStatus.queued


def test_a_broker_that_is_down_leaves_the_steps_to_the_reconciler(
    settings: Settings, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    server = EmbeddedRedis(tmp_path / "redis", persist=False).start()
    try:
        with use_settings(settings.model_copy(update={"redis_url": server.url})) as s:
            client = redis.Redis.from_url(server.url)
            (before,) = committed(s)
            (during,) = committed(s)
            dispatch.send([before])  # leaves a pooled broker connection behind
            server.stop()

            started = time.monotonic()
            with caplog.at_level(logging.WARNING, logger="app.workflows.dispatch"):
                dispatch.send([during])  # logs, does not raise
            assert time.monotonic() - started < 30
            assert "could not enqueue 1 step(s), the reconciler will" in caplog.text

            server.start()  # same port, empty: the outage lost nothing but this send
            sid = during.step_run_id
            assert dispatch.sent_attempts([sid]) == {}
            assert messages(client) == {}
            assert step(sid).status is StepStatus.queued
            assert step(sid).dispatched_at is None

            # The reconciler sends what has no marker ...
            assert dispatch.reconcile(older_than_s=0) >= 1
            assert messages(client)[f"{sid}-1"]["args"] == [sid, 1]
            assert dispatch.sent_attempts([sid]) == {sid: 1}
            assert step(sid).dispatched_at is None
            # ... and on its next pass records the send it finds a marker for.
            dispatch.reconcile(older_than_s=0)
            assert step(sid).dispatched_at is not None
            assert dispatch.sent_attempts([sid]) == {}
            assert of_step(messages(client), sid) == [f"{sid}-1"]  # not sent a second time
            assert sid not in {d.step_run_id for d in dispatch.undispatched(older_than_s=0)}
            client.close()
    finally:
        server.stop()


def test_a_broker_that_never_answers_costs_a_send_a_warning(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    closed = "redis://127.0.0.1:1/0"  # nothing listens on port 1
    with use_settings(settings.model_copy(update={"redis_url": closed})) as s:
        (d,) = committed(s)
        with caplog.at_level(logging.WARNING, logger="app.workflows.dispatch"):
            dispatch.send([d])
    assert "could not enqueue 1 step(s)" in caplog.text
    assert step(d.step_run_id).status is StepStatus.queued


# ---- the reconciler ---------------------------------------------------------------------


def test_the_reconciler_records_a_send_that_has_its_marker(
    isolated: Settings, client: redis.Redis
) -> None:
    (d,) = committed(isolated)
    sid = d.step_run_id
    dispatch.record_sent({sid: 1})  # published, then the process died before beat ran
    dispatch.reconcile(older_than_s=0)
    assert f"{sid}-1" not in messages(client)  # not sent again
    assert step(sid).dispatched_at is not None
    assert client.exists(SENT_PREFIX + sid) == 0  # confirmed: the marker is dropped
    assert sid not in {u.step_run_id for u in dispatch.undispatched(older_than_s=0)}


def test_the_reconciler_sends_what_never_reached_the_broker(
    isolated: Settings, client: redis.Redis
) -> None:
    (d,) = committed(isolated)
    sid = d.step_run_id
    # Readied too recently: its send may still be on its way.
    dispatch.reconcile(older_than_s=3600)
    assert messages(client) == {}

    assert dispatch.reconcile(older_than_s=0) >= 1
    assert messages(client)[f"{sid}-1"]["args"] == [sid, 1]
    assert dispatch.sent_attempts([sid]) == {sid: 1}
    assert step(sid).dispatched_at is None

    dispatch.reconcile(older_than_s=0)
    assert step(sid).dispatched_at is not None
    assert of_step(messages(client), sid) == [f"{sid}-1"]


def test_a_marker_of_an_earlier_attempt_does_not_confirm_a_retry(
    isolated: Settings, client: redis.Redis
) -> None:
    (d,) = committed(isolated, gen("a", retry={"max_attempts": 2}))
    sid = d.step_run_id
    dispatch.record_sent({sid: 1})
    # Attempt 1 was claimed and failed; the retry's commit happened, its send did not.
    assert service.claim_step(sid, 1) is not None
    outcome = engine.fail(sid, 1, "boom", retryable=True)
    assert outcome is not None and [x.attempt for x in outcome.dispatches] == [2]
    assert step(sid).status is StepStatus.retrying

    dispatch.reconcile(older_than_s=0)
    assert step(sid).dispatched_at is None  # attempt 1's marker confirmed nothing
    assert messages(client)[f"{sid}-2"]["args"] == [sid, 2]  # attempt 2 sent
    assert dispatch.sent_attempts([sid]) == {sid: 2}

    dispatch.reconcile(older_than_s=0)
    assert step(sid).dispatched_at is not None
    assert dispatch.sent_attempts([sid]) == {}


def test_a_late_mark_of_an_earlier_attempt_does_not_cover_a_retry(isolated: Settings) -> None:
    (d,) = committed(isolated, gen("a", retry={"max_attempts": 2}))
    sid = d.step_run_id
    assert service.claim_step(sid, 1) is not None
    assert engine.fail(sid, 1, "boom", retryable=True) is not None
    dispatch.mark_dispatched({sid: 1})
    assert step(sid).dispatched_at is None  # so the reconciler still sends attempt 2
    dispatch.mark_dispatched({sid: 2})
    assert step(sid).dispatched_at is not None


def test_forgetting_a_confirmed_send_keeps_a_newer_marker(
    isolated: Settings, client: redis.Redis
) -> None:
    dispatch.record_sent({"s-old": 1, "s-new": 2})
    dispatch.forget_sent({"s-old": 1, "s-new": 1})  # s-new was sent again meanwhile
    assert dispatch.sent_attempts(["s-old", "s-new", "s-none"]) == {"s-new": 2}
    dispatch.forget_sent({})  # nothing to do


# ---- pools --------------------------------------------------------------------------------


def test_a_step_for_a_model_with_no_live_worker_waits_for_pool(
    isolated: Settings, client: redis.Redis
) -> None:
    wid = service.submit_validated(validated(isolated), api_key_id=None).id
    a = steps_of(wid)["a"]
    assert a.status is StepStatus.waiting_for_pool
    assert f"{a.id}-1" in messages(client)  # on its queue all the same
    # A worker of a pool started later takes it like any ready step.
    work = service.claim_step(a.id, 1)
    assert work is not None and work.attempt == 1
    assert steps_of(wid)["a"].status is StepStatus.running


def test_a_step_for_a_model_with_a_live_worker_stays_queued(
    isolated: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(live, "VIEW_MAX_AGE_S", 0.0)  # read the registry, not a cached view
    live.register_worker("test-dispatch-worker", {"model": "tiny-chat", "n_ctx": 8192}, 60)
    try:
        wid = service.submit_validated(validated(isolated), api_key_id=None).id
        assert steps_of(wid)["a"].status is StepStatus.queued
    finally:
        live.unregister_worker("test-dispatch-worker")
        assert live.live_workers() == []  # and the cached view forgets it


def test_only_a_queued_step_is_marked_waiting_for_pool(isolated: Settings) -> None:
    (d,) = committed(isolated)
    assert service.claim_step(d.step_run_id, 1) is not None  # a worker was faster
    dispatch.mark_waiting_for_pool([d.step_run_id])
    assert step(d.step_run_id).status is StepStatus.running
