"""The Celery application: configuration only. Tasks live in ``workers.tasks``.

Queue and task names live in :mod:`app.workflows.names` (the API sends by them too); the
ones re-exported here are for callers that still import them from this module. The broker
is Redis through kombu's own transport.
"""

from __future__ import annotations

from celery import Celery

from app.core.config import get_settings
from app.workflows.names import (
    GOVERNANCE_EVALUATE_TASK,
    MEMORY_CONSOLIDATE_TASK,
    MEMORY_PRUNE_TASK,
    MEMORY_SWEEP_TASK,
    RECONCILE_TASK,
    SCHEDULER_CLEANUP_TASK,
    STEP_TASK,
    SYSTEM_QUEUE,
    queue_for,
)

__all__ = ["STEP_TASK", "SYSTEM_QUEUE", "celery_app", "make_celery", "queue_for"]


def make_celery() -> Celery:
    """Build the Celery app from the settings in force."""
    settings = get_settings()
    app = Celery("corral", set_as_current=False)
    broker = settings.redis_url or "redis://127.0.0.1:6379/0"
    app.conf.update(
        broker_url=broker,
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,
        # No result backend: the database is the source of truth for step state.
        result_backend=None,
        task_ignore_result=True,
        task_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        event_serializer="json",
        # At-least-once: ack after the step ran; a worker that dies hands its task back.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_default_queue=SYSTEM_QUEUE,
        task_create_missing_queues=True,
        task_track_started=False,
        # Task events cost three Redis publishes per task; Flower turns them on while it
        # watches (its periodic enable_events), so they are off otherwise.
        worker_send_task_events=False,
        task_send_sent_event=False,
        worker_hijack_root_logger=False,
        # A broker blip must not kill a step mid-generation; its result goes to the DB.
        worker_cancel_long_running_tasks_on_connection_loss=False,
        broker_transport_options={
            # Redelivery after a worker dies without acking: longer than any step may run.
            "visibility_timeout": int(settings.max_step_timeout_s + 600),
        },
        timezone="UTC",
        enable_utc=True,
        include=["workers.tasks"],
        # The beat schedule is data: stable entry names, intervals from the settings.
        beat_schedule={
            RECONCILE_TASK: {"task": RECONCILE_TASK, "schedule": settings.reconcile_s},
            MEMORY_SWEEP_TASK: {"task": MEMORY_SWEEP_TASK, "schedule": settings.reconcile_s},
            MEMORY_PRUNE_TASK: {"task": MEMORY_PRUNE_TASK, "schedule": settings.memory_prune_s},
            MEMORY_CONSOLIDATE_TASK: {
                "task": MEMORY_CONSOLIDATE_TASK,
                "schedule": settings.consolidate_s,
                "options": {"expires": settings.consolidate_s},
            },
            SCHEDULER_CLEANUP_TASK: {
                "task": SCHEDULER_CLEANUP_TASK,
                "schedule": settings.cleanup_s,
                "options": {"expires": settings.cleanup_s},
            },
            GOVERNANCE_EVALUATE_TASK: {
                "task": GOVERNANCE_EVALUATE_TASK,
                "schedule": settings.governance_interval_s,
                # A late tick is worth nothing: the next one evaluates afresh.
                "options": {"expires": settings.governance_interval_s},
            },
        },
    )
    return app


celery_app = make_celery()
