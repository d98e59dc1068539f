"""Queue and task names: the contract between the API, beat and the worker pools.

Each model has its own queue, ``model.<catalog name>``; a worker started with
``corral worker --model NAME`` consumes only that queue. Beat's jobs go to
``corral.system``. Task names are explicit and stable: a renamed task is a message no
worker of an older release can run.
"""

from __future__ import annotations

SYSTEM_QUEUE = "corral.system"
MODEL_QUEUE_PREFIX = "model."

STEP_TASK = "corral.step.run"
RECONCILE_TASK = "corral.reconcile"
MEMORY_SWEEP_TASK = "corral.memory.sweep"
MEMORY_PRUNE_TASK = "corral.memory.prune"
EMBED_TASK = "corral.memory.embed"
EMBED_QUERY_TASK = "corral.memory.embed_query"


def queue_for(model: str) -> str:
    """The queue a model's steps are sent to."""
    return f"{MODEL_QUEUE_PREFIX}{model}"
