"""Queue and task names: the contract between the API, beat and the worker pools.

Each model has its own queue, ``model.<catalog name>``; a worker started with
``corral worker --model NAME`` consumes only that queue. Beat's jobs go to
``corral.system``. Task names are explicit and stable: a renamed task is a message no
worker of an older release can run.

A workflow's ``priority`` maps onto kombu's Redis priorities: a ``low`` workflow's steps
are sent with Celery priority :data:`LOW_PRIORITY`, which kombu pushes to the list
``<queue>\\x06\\x169`` instead of ``<queue>``; a worker's BRPOP names every queue's
priority-0 list first, so a low step is fetched only when no normal one waits there.
"""

from __future__ import annotations

SYSTEM_QUEUE = "corral.system"
MODEL_QUEUE_PREFIX = "model."

# The worker side, loaded by name as ``celery -A`` loads an app: the CLI starts worker
# processes, but the app package does not import the workers package.
WORKER_APP = "workers.celery_app:celery_app"
WORKER_LAUNCH = "workers.launch:run_worker"

STEP_TASK = "corral.step.run"
RECONCILE_TASK = "corral.reconcile"
MEMORY_SWEEP_TASK = "corral.memory.sweep"
MEMORY_PRUNE_TASK = "corral.memory.prune"
MEMORY_CONSOLIDATE_TASK = "corral.memory.consolidate"
SCHEDULER_CLEANUP_TASK = "corral.scheduler.cleanup"
EMBED_TASK = "corral.memory.embed"
EMBED_QUERY_TASK = "corral.memory.embed_query"
GOVERNANCE_EVALUATE_TASK = "corral.governance.evaluate"
WEBHOOK_TASK = "corral.governance.webhook"


# Celery priority per workflow priority: on Redis, 0 is fetched first and 9 last.
LOW_PRIORITY = 9
PRIORITIES = {"normal": 0, "low": LOW_PRIORITY}
# kombu's Redis transport keeps priority p > 0 of a queue in the list <queue><sep><p>.
PRIORITY_SEP = "\x06\x16"


def queue_for(model: str) -> str:
    """The queue a model's steps are sent to."""
    return f"{MODEL_QUEUE_PREFIX}{model}"


def queue_keys(model: str) -> list[str]:
    """The Redis lists that hold a model's waiting messages: normal, then low priority
    (a queue's depth is the sum of their lengths)."""
    queue = queue_for(model)
    return [queue, f"{queue}{PRIORITY_SEP}{LOW_PRIORITY}"]


def celery_priority(priority: str | None) -> int:
    """The Celery priority a workflow's steps are sent with (0 for none or unknown)."""
    return PRIORITIES.get(priority or "normal", 0)
