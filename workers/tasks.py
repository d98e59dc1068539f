"""Celery tasks: thin, explicitly named, taking ids; bodies are plain functions.

Beat's periodic tasks are acknowledged when they start (``acks_late=False``): each is
idempotent and the next tick does its work again, so one lost with its worker costs
nothing, and no acknowledgement is left pending on a broker connection that drops while
it runs (Celery's consumer discards that connection, and a late ack on it would fail).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from app.core.config import get_settings
from app.core.errors import CorralError, ServiceUnavailable
from app.memory import embedding
from app.memory.service import get_memory
from app.workflows import dispatch
from app.workflows.names import (
    EMBED_QUERY_TASK,
    EMBED_TASK,
    GOVERNANCE_EVALUATE_TASK,
    MEMORY_CONSOLIDATE_TASK,
    MEMORY_PRUNE_TASK,
    MEMORY_SWEEP_TASK,
    RECONCILE_TASK,
    SCHEDULER_CLEANUP_TASK,
    STEP_TASK,
    WEBHOOK_TASK,
)
from workers import process
from workers.celery_app import celery_app
from workers.runtime import RunControl
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


def _embedder() -> Callable[[list[str]], Any]:
    """This worker's loaded embedding model as a function of texts (cut to fit)."""
    runtime = process.get_runtime()

    def embed(texts: list[str]) -> Any:
        limit = runtime.n_ctx - 4
        fitted = [embedding.fit_text(t, runtime.count_tokens, limit) for t in texts]
        out = runtime.embed({"texts": fitted, "normalize": True}, RunControl())
        return np.asarray(out["vectors"], dtype=np.float32)

    return embed


@celery_app.task(name=EMBED_TASK)  # type: ignore[untyped-decorator]
def memory_embed_task() -> int:
    """Embed messages waiting in conversation memory, in batches; returns how many."""
    process.set_busy(True)
    try:
        return embedding.drain(get_memory(), _embedder())
    finally:
        process.set_busy(False)


@celery_app.task(name=EMBED_QUERY_TASK)  # type: ignore[untyped-decorator]
def memory_embed_query_task(reply_key: str, texts: list[str]) -> None:
    """Embed query texts for a caller waiting on ``reply_key``."""
    embedding.answer_query(get_memory(), reply_key, texts, _embedder())


@celery_app.task(name=RECONCILE_TASK, acks_late=False)  # type: ignore[untyped-decorator]
def reconcile_task() -> int:
    """Send steps that were readied but never reached the broker; returns how many."""
    return dispatch.reconcile(get_settings().reconcile_after_s)


@celery_app.task(name=MEMORY_SWEEP_TASK, acks_late=False)  # type: ignore[untyped-decorator]
def memory_sweep_task() -> int:
    """Re-kick embedding when messages wait and no embed task is on its way (a lost task)."""
    from app.memory.embedding import kick, pending_count
    from app.memory.service import get_memory

    mem = get_memory()
    waiting = pending_count(mem)
    if waiting:
        kick(mem)
    return waiting


@celery_app.task(name=MEMORY_PRUNE_TASK, acks_late=False)  # type: ignore[untyped-decorator]
def memory_prune_task() -> int:
    """Drop expired conversations from the tenants' and users' lists; returns how many."""
    from app.memory.service import get_memory

    return get_memory().conversations.prune_expired()


@celery_app.task(name=MEMORY_CONSOLIDATE_TASK, acks_late=False)  # type: ignore[untyped-decorator]
def memory_consolidate_task() -> dict[str, Any]:
    """Start a consolidation run when the window is open (finish the runs that ended)."""
    from app.memory import consolidate

    run = consolidate.tick()
    if run is None:
        return {"skipped": "outside CORRAL_CONSOLIDATE_WINDOW, or nothing to consolidate"}
    return {"run": run["id"], "status": run["status"], "planned": run["planned"]}


@celery_app.task(name=SCHEDULER_CLEANUP_TASK, acks_late=False)  # type: ignore[untyped-decorator]
def scheduler_cleanup_task() -> dict[str, Any]:
    """Reclaim dead leases; report stranded GPU memory and the plans for waiting pools."""
    from app.scheduler import fragmentation

    report = fragmentation.tick()
    return {k: report[k] for k in ("reclaimed_leases", "free_bytes", "stranded_bytes")}


@celery_app.task(name=GOVERNANCE_EVALUATE_TASK, acks_late=False)  # type: ignore[untyped-decorator]
def governance_evaluate_task() -> dict[str, Any]:
    """Evaluate the governance rules for this tick (a second beat's run is a no-op)."""
    from app.governance.evaluate import evaluate

    result = evaluate()
    if result is None:
        return {"skipped": "another evaluation took this tick"}
    return {"tick": result.tick, "rules": result.rules, "transitions": len(result.transitions)}


@celery_app.task(name=WEBHOOK_TASK, bind=True)  # type: ignore[untyped-decorator]
def governance_webhook_task(
    self: Any, rule_id: str, action_index: int, body: dict[str, Any], alert_id: str | None
) -> str:
    """POST one alert notification, retried with exponential backoff; the outcome goes to
    the governance history."""
    from app.governance import notify

    tries = self.request.retries + 1
    detail = {"delivery": body.get("delivery"), "event": body.get("event"), "tries": tries}
    try:
        status = notify.deliver(rule_id, action_index, body)
    except notify.DeliveryFailed as exc:
        if self.request.retries < get_settings().webhook_max_retries:
            raise self.retry(exc=exc, countdown=notify.backoff_s(self.request.retries)) from exc
        notify.record_delivery(rule_id, alert_id, "error", {**detail, "error": str(exc)})
        return "failed"
    except CorralError as exc:  # the rule was deleted or changed under the notification
        notify.record_delivery(rule_id, alert_id, "error", {**detail, "error": str(exc)})
        return "failed"
    notify.record_delivery(rule_id, alert_id, "ok", {**detail, "status": status})
    return "delivered"
