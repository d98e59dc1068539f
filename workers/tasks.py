"""Celery tasks: thin, explicitly named, taking ids; bodies are plain functions."""

from __future__ import annotations

from typing import Any

from app.core.config import get_settings
from app.errors import ServiceUnavailable
from workers import process
from workers.celery_app import STEP_TASK, celery_app
from workers.steps import run_step


@celery_app.task(name=STEP_TASK, bind=True)  # type: ignore[untyped-decorator]
def run_step_task(self: Any, step_run_id: str, attempt: int) -> str:
    """Run one attempt of one step on this worker's loaded model.

    While the database is unreachable the same message is retried with backoff, without
    limit: the step's state is in the database, so nothing is decided until it is back.
    """
    process.set_busy(True)
    try:
        return run_step(step_run_id, attempt)
    except ServiceUnavailable as exc:
        delay = min(30.0, 0.5 * 2 ** min(self.request.retries, 6))
        raise self.retry(exc=exc, countdown=delay, max_retries=None) from exc
    finally:
        process.set_busy(False)


@celery_app.task(name="corral.reconcile")  # type: ignore[untyped-decorator]
def reconcile_task() -> int:
    """Send steps that were readied but never reached the broker; returns how many."""
    from app import engine
    from app.dispatch import CeleryDispatcher

    pending = engine.undispatched(older_than_s=get_settings().reconcile_after_s)
    if pending:
        CeleryDispatcher(celery_app).send(pending)
    return len(pending)
