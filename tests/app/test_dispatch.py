"""Recording that sent steps reached the broker, and never for a send that is not the latest."""

from __future__ import annotations

from typing import Any

import redis
from sqlmodel import select

from app import db, engine
from app.core.config import Settings
from app.dispatch import CeleryDispatcher
from app.engine import Dispatch
from app.spec import validate_workflow
from app.tables import StepRun, StepStatus
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
    assert engine.claim_step(sid, 1) is not None
    engine.fail_step(sid, 1, "boom", retryable=True, dispatcher=RecordingDispatcher())
    assert step(sid).status is StepStatus.retrying
    engine.mark_dispatched([sid], attempts={sid: 1})  # the late mark of attempt 1
    assert step(sid).dispatched_at is None  # so the reconciler still resends attempt 2
    engine.mark_dispatched([sid], attempts={sid: 2})
    assert step(sid).dispatched_at is not None


def test_the_celery_dispatcher_records_what_it_sent(settings: Settings) -> None:
    from workers.celery_app import make_celery

    sid = one_step(settings)
    celery = make_celery()
    queue = "model.nobody-serves-this"
    try:
        CeleryDispatcher(celery).send([Dispatch(sid, "nobody-serves-this", 1)])
        row = step(sid)
        assert row.dispatched_at is not None
        # No live pool consumes that queue: the step says so.
        assert row.status is StepStatus.waiting_for_pool
    finally:
        client = redis.Redis.from_url(settings.broker_url)
        client.delete(queue)
        client.close()
        celery.close()
