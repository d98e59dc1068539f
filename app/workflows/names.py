"""Queue and task names: the contract between the API, beat and the worker pools.

Each model has its own queue, ``model.<catalog name>``; a worker started with
``corral worker --model NAME`` consumes only that queue. Beat's jobs go to
``corral.system``. Task names are explicit and stable: a renamed task is a message no
worker of an older release can run.
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
EMBED_TASK = "corral.memory.embed"
EMBED_QUERY_TASK = "corral.memory.embed_query"
GOVERNANCE_EVALUATE_TASK = "corral.governance.evaluate"
WEBHOOK_TASK = "corral.governance.webhook"


def queue_for(model: str) -> str:
    """The queue a model's steps are sent to."""
    return f"{MODEL_QUEUE_PREFIX}{model}"
