"""Sends leave markers in Redis; the reconciler confirms them and resends only what never
reached the broker, and never confirms a send that is not the latest."""

from __future__ import annotations

import base64
import json
import uuid
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import redis
from sqlmodel import select

from app import claims, dispatch, engine
from app.store import db
from app.claims import WORK_HEADER
from app.core.config import Settings, use_settings
from app.dispatch import (
    SENT_PREFIX,
    CeleryDispatcher,
    forget_sent,
    reconcile,
    record_sent,
    sent_attempts,
    step_message,
)
from app.core.embedded import EmbeddedRedis
from app.engine import Dispatch
from app.workflows.spec import validate_workflow
from app.store.tables import StepRun, StepStatus
from models.catalog import load_catalog
from tests.utils.recording import RecordingDispatcher


def one_step(settings: Settings) -> str:
    spec: dict[str, Any] = {
        "name": "marks",
        "steps": [
            {
                "id": "a",
                "kind": "generate",
                "model": "tiny-chat",
                "input": {"prompt": "hi", "max_tokens": 4},
                "retry": {"max_attempts": 2},
            }
        ],
    }
    validated = validate_workflow(spec, load_catalog(settings.catalog_path), settings)
    run = engine.create_workflow(validated, RecordingDispatcher())
    with db.session_scope() as session:
        return session.exec(select(StepRun.id).where(StepRun.workflow_id == run.id)).one()


def step(step_run_id: str) -> StepRun:
    with db.session_scope() as session:
        row = session.get(StepRun, step_run_id)
        assert row is not None
        return row


def test_a_mark_for_an_attempt_that_is_no_longer_current_changes_nothing(
    settings: Settings,
) -> None:
    sid = one_step(settings)
    # Attempt 1 was claimed and failed; its retry (attempt 2) was never sent.
    assert claims.claim_step(sid, 1) is not None
    engine.fail_step(sid, 1, "boom", retryable=True, dispatcher=RecordingDispatcher())
    assert step(sid).status is StepStatus.retrying
    dispatch.mark_dispatched([sid], {sid: 1})  # the late mark of attempt 1
    assert step(sid).dispatched_at is None  # so the reconciler still resends attempt 2
    dispatch.mark_dispatched([sid], {sid: 2})
    assert step(sid).dispatched_at is not None


def redis_client(settings: Settings) -> redis.Redis:
    return redis.Redis.from_url(settings.broker_url)


def test_the_celery_dispatcher_leaves_a_marker_and_writes_nothing_more(
    settings: Settings,
) -> None:
    from workers.celery_app import make_celery

    sid = one_step(settings)
    celery = make_celery()
    queue = "model.nobody-serves-this"
    client = redis_client(settings)
    try:
        CeleryDispatcher(celery).send([Dispatch(sid, "nobody-serves-this", 1)])
        assert client.llen(queue) == 1
        assert sent_attempts(client, [sid]) == {sid: 1}
        row = step(sid)
        assert row.dispatched_at is None  # confirmed later, by the reconciler
        # No live pool consumes that queue: the step says so.
        assert row.status is StepStatus.waiting_for_pool
    finally:
        client.delete(queue, SENT_PREFIX + sid)
        client.close()
        celery.close()


def test_the_reconciler_confirms_sends_that_reached_the_broker(settings: Settings) -> None:
    sid = one_step(settings)
    client = redis_client(settings)
    try:
        record_sent(client, {sid: 1})
        resent = RecordingDispatcher()
        reconcile(resent, older_than_s=0)
        assert sid not in {d.step_run_id for d in resent.sent}
        assert step(sid).dispatched_at is not None
        assert client.exists(SENT_PREFIX + sid) == 0  # confirmed: the marker is dropped
        assert sid not in {d.step_run_id for d in dispatch.undispatched(older_than_s=0)}
    finally:
        client.delete(SENT_PREFIX + sid)
        client.close()


def test_the_reconciler_sends_again_what_never_reached_the_broker(settings: Settings) -> None:
    sid = one_step(settings)  # committed; the recording dispatcher published nothing
    client = redis_client(settings)
    try:
        resent = RecordingDispatcher()
        assert reconcile(resent, older_than_s=0) >= 1
        assert [d.attempt for d in resent.sent if d.step_run_id == sid] == [1]
        assert step(sid).dispatched_at is None
        # A step readied too recently is left alone (its send may still be on the way).
        recent = RecordingDispatcher()
        reconcile(recent, older_than_s=3600)
        assert sid not in {d.step_run_id for d in recent.sent}
    finally:
        client.close()


def test_a_marker_of_an_earlier_attempt_does_not_confirm_a_retry(settings: Settings) -> None:
    sid = one_step(settings)
    client = redis_client(settings)
    try:
        record_sent(client, {sid: 1})
        assert claims.claim_step(sid, 1) is not None
        engine.fail_step(sid, 1, "boom", retryable=True, dispatcher=RecordingDispatcher())
        resent = RecordingDispatcher()
        reconcile(resent, older_than_s=0)
        # Attempt 2 was never sent.
        assert [d.attempt for d in resent.sent if d.step_run_id == sid] == [2]
        assert step(sid).dispatched_at is None
    finally:
        client.delete(SENT_PREFIX + sid)
        client.close()


def test_forgetting_a_confirmed_send_keeps_a_newer_marker(settings: Settings) -> None:
    client = redis_client(settings)
    try:
        record_sent(client, {"s-old": 1, "s-new": 2})
        forget_sent(client, {"s-old": 1, "s-new": 1})  # s-new was sent again meanwhile
        assert sent_attempts(client, ["s-old", "s-new"]) == {"s-new": 2}
    finally:
        client.delete(SENT_PREFIX + "s-old", SENT_PREFIX + "s-new")
        client.close()


def test_a_batch_goes_out_in_one_flush_with_the_step_as_task_id(settings: Settings) -> None:
    from workers.celery_app import make_celery

    sids = [one_step(settings) for _ in range(3)]
    celery = make_celery()
    queue = "model.nobody-serves-this"
    client = redis_client(settings)
    try:
        CeleryDispatcher(celery).send([Dispatch(s, "nobody-serves-this", 1) for s in sids])
        assert client.llen(queue) == 3
        assert sent_attempts(client, sids) == dict.fromkeys(sids, 1)
        ids = {json.loads(m)["headers"]["id"] for m in client.lrange(queue, 0, -1)}
        assert ids == {f"{s}-1" for s in sids}  # Flower shows the step run and attempt
    finally:
        client.delete(queue, *(SENT_PREFIX + s for s in sids))
        client.close()
        celery.close()


def test_a_broker_that_dies_between_sends_leaves_the_steps_to_the_reconciler(
    settings: Settings, tmp_path: Path
) -> None:
    from workers.celery_app import make_celery

    server = EmbeddedRedis(tmp_path / "redis", persist=True).start()  # markers survive
    try:
        with use_settings(settings.model_copy(update={"redis_url": server.url})) as isolated:
            celery = make_celery()
            sender = CeleryDispatcher(celery)
            first, second = one_step(isolated), one_step(isolated)
            sender.send([Dispatch(first, "nobody-serves-this", 1)])  # a pooled connection
            server.stop()
            sender.send([Dispatch(second, "nobody-serves-this", 1)])  # no exception
            server.start()
            client = redis_client(isolated)
            assert sent_attempts(client, [first, second]) == {first: 1}
            client.close()
            celery.close()
            resent = RecordingDispatcher()
            reconcile(resent, older_than_s=0)
            assert second in {d.step_run_id for d in resent.sent}
    finally:
        server.stop()


def _pushed_by_send_task(celery: Any, client: redis.Redis, d: Dispatch) -> dict[str, Any]:
    from workers.celery_app import STEP_TASK, queue_for

    queue = queue_for(d.model)
    client.delete(queue)
    celery.send_task(
        STEP_TASK,
        args=[d.step_run_id, d.attempt],
        queue=queue,
        countdown=d.countdown or None,
        task_id=f"{d.step_run_id}-{d.attempt}",
        headers={WORK_HEADER: d.work} if d.work is not None else None,
    )
    raw = client.rpop(queue)
    assert raw is not None
    message: dict[str, Any] = json.loads(raw)
    return message


def _without_tag(message: dict[str, Any]) -> dict[str, Any]:
    """The message less its delivery tag (a fresh UUID per message, by design)."""
    uuid.UUID(message["properties"]["delivery_tag"])
    return {**message, "properties": {**message["properties"], "delivery_tag": "-"}}


def test_a_step_message_is_what_celery_send_task_pushes(settings: Settings) -> None:
    """The dispatcher writes the broker's list entry itself (one MULTI/EXEC with its marker);
    it must stay byte-for-byte what Celery and kombu would push, so a worker of any kind
    (and Flower) reads it as a task of theirs."""
    from workers.celery_app import make_celery

    celery = make_celery()
    client = redis_client(settings)
    try:
        d = Dispatch("s-envelope", "envelope-check", 3)
        theirs = _pushed_by_send_task(celery, client, d)
        ours = json.loads(step_message(celery, d))
        assert _without_tag(ours) == _without_tag(theirs)
        body = json.loads(base64.b64decode(ours["body"]))
        assert body[0] == ["s-envelope", 3]
        assert ours["headers"]["id"] == "s-envelope-3"
        assert ours["headers"]["task"] == "corral.step.run"
    finally:
        client.close()
        celery.close()


def test_a_step_message_with_its_work_is_what_send_task_pushes_with_the_header(
    settings: Settings,
) -> None:
    """A new workflow's only ready step carries its work in a message header: the message
    is still what ``send_task(headers=...)`` pushes, the arguments unchanged."""
    from workers.celery_app import make_celery

    celery = make_celery()
    client = redis_client(settings)
    try:
        d = Dispatch("s-carried", "envelope-check", 1, work='{"step_run_id":"s-carried"}')
        theirs = _pushed_by_send_task(celery, client, d)
        ours = json.loads(step_message(celery, d))
        assert _without_tag(ours) == _without_tag(theirs)
        assert ours["headers"][WORK_HEADER] == d.work
        assert json.loads(base64.b64decode(ours["body"]))[0] == ["s-carried", 1]
    finally:
        client.close()
        celery.close()


def test_a_delayed_step_message_carries_the_same_eta_as_send_task(settings: Settings) -> None:
    from workers.celery_app import make_celery

    celery = make_celery()
    client = redis_client(settings)
    try:
        d = Dispatch("s-delayed", "envelope-check", 2, countdown=30.0)
        theirs = _pushed_by_send_task(celery, client, d)
        ours = json.loads(step_message(celery, d))
        etas = [datetime.fromisoformat(m["headers"].pop("eta")) for m in (ours, theirs)]
        assert abs(etas[0] - etas[1]) < timedelta(seconds=5)
        assert etas[0] - datetime.now(etas[0].tzinfo) > timedelta(seconds=20)
        assert _without_tag(ours) == _without_tag(theirs)
    finally:
        client.close()
        celery.close()


def test_a_message_and_its_marker_are_written_together(settings: Settings) -> None:
    """One MULTI/EXEC: a send that fails leaves neither the message nor the marker."""
    from workers.celery_app import make_celery

    sid = one_step(settings)
    celery = make_celery()
    client = redis_client(settings)
    queue = "model.nobody-serves-this"
    try:
        client.set(queue, "not a list")  # LPUSH fails inside the transaction
        CeleryDispatcher(celery).send([Dispatch(sid, "nobody-serves-this", 1)])  # no raise
        assert sent_attempts(client, [sid]) == {}
        assert client.get(queue) == b"not a list"
        assert step(sid).status is StepStatus.queued  # left to the reconciler
    finally:
        client.delete(queue, SENT_PREFIX + sid)
        client.close()
        celery.close()


def test_an_async_send_pushes_and_marks_what_a_send_does(settings: Settings) -> None:
    """The API's event loop sends through ``send_async`` (an asyncio client): the same
    list entry, the same marker, and a step with no live pool marked so, as ``send``."""
    import asyncio

    from workers.celery_app import make_celery

    celery = make_celery()
    client = redis_client(settings)
    queue = "model.nobody-serves-this"
    sync_sid, async_sid = one_step(settings), one_step(settings)
    try:
        sender = CeleryDispatcher(celery)
        client.delete(queue)
        sender.send([Dispatch(sync_sid, "nobody-serves-this", 1)])

        async def send_async() -> None:
            await sender.send_async([Dispatch(async_sid, "nobody-serves-this", 1)])
            await sender.aclose()

        asyncio.run(send_async())
        pushed = [json.loads(m) for m in client.lrange(queue, 0, -1)]
        by_id = {m["headers"]["id"]: _without_tag(m) for m in pushed}
        assert set(by_id) == {f"{sync_sid}-1", f"{async_sid}-1"}
        expected = json.loads(step_message(celery, Dispatch(async_sid, "nobody-serves-this", 1)))
        assert by_id[f"{async_sid}-1"] == _without_tag(expected)
        assert sent_attempts(client, [sync_sid, async_sid]) == {sync_sid: 1, async_sid: 1}
        assert step(sync_sid).status is step(async_sid).status is StepStatus.waiting_for_pool
    finally:
        client.delete(queue, SENT_PREFIX + sync_sid, SENT_PREFIX + async_sid)
        client.close()
        celery.close()
