"""Celery tasks: thin, explicitly named, taking ids; bodies are plain functions."""

from __future__ import annotations

from workers import process
from workers.celery_app import STEP_TASK, celery_app
from workers.steps import run_step


@celery_app.task(name=STEP_TASK)  # type: ignore[untyped-decorator]
def run_step_task(step_run_id: str, attempt: int) -> str:
    """Run one attempt of one step on this worker's loaded model."""
    process.set_busy(True)
    try:
        return run_step(step_run_id, attempt)
    finally:
        process.set_busy(False)


@celery_app.task(name="corral.reconcile")  # type: ignore[untyped-decorator]
def reconcile_task() -> int:
    """Send steps that were readied but never reached the broker; returns how many."""
    from app import engine
    from app.dispatch import CeleryDispatcher

    pending = engine.undispatched(older_than_s=30)
    if pending:
        CeleryDispatcher(celery_app).send(pending)
    return len(pending)
