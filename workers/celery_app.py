"""The Celery application: configuration only. Tasks live in ``workers.tasks``.

Each model has its own queue, ``model.<catalog name>``; a worker started with
``corral worker --model NAME`` consumes only that queue. Beat's jobs go to ``corral.system``.
"""

from __future__ import annotations

from celery import Celery

from app.core.config import get_settings

SYSTEM_QUEUE = "corral.system"
STEP_TASK = "corral.step.run"


def queue_for(model: str) -> str:
    """The queue a model's steps are sent to."""
    return f"model.{model}"


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
            "corral.reconcile": {"task": "corral.reconcile", "schedule": settings.reconcile_s},
            "corral.memory.sweep": {
                "task": "corral.memory.sweep",
                "schedule": settings.reconcile_s,
            },
            "corral.memory.prune": {
                "task": "corral.memory.prune",
                "schedule": settings.memory_prune_s,
            },
        },
    )
    return app


celery_app = make_celery()
