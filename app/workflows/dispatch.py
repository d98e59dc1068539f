"""Sending ready steps to their model's queue, after the commit that readied them.

A step attempt is published as the Celery task ``corral.step.run(step_run_id, attempt)``
on the queue ``model.<name>`` with Celery's own ``send_task``. After the publish, a
marker ``corral:sent:<step run id>`` = the attempt is left in the broker's Redis: a
marker exists only for a message that was published. Beat's reconciler
(:func:`reconcile`) looks at steps readied more than ``CORRAL_RECONCILE_AFTER_S`` ago
whose send the database does not record yet: those with a marker for their attempt were
sent (the database records it, the marker goes); the others never reached the broker (a
crash or an outage between the commit and the publish) and are sent again. A step sent
twice is harmless: only the delivery its step is ready for runs (at-least-once delivery,
idempotent effects).

A low-priority workflow's steps carry Celery priority ``names.LOW_PRIORITY``: kombu keeps
them in the queue's low list, which workers read only when no normal step waits.

While governance routes a model to a fallback (:mod:`app.workflows.routing`), its steps'
new attempts go to the fallback's queue, and the step records it (``routed_to``).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping, Sequence
from dataclasses import replace
from datetime import timedelta

from celery import Celery
from kombu.exceptions import OperationalError as BrokerError
from redis.exceptions import RedisError
from sqlalchemy import update
from sqlmodel import select

from app.core.config import get_settings
from app.core.errors import ServiceUnavailable
from app.core.redis import get_redis
from app.scheduler import live
from app.store import db
from app.store.tables import StepRun, StepStatus, WorkflowRun, utcnow
from app.workflows import routing
from app.workflows.engine import Dispatch
from app.workflows.names import STEP_TASK, celery_priority, queue_for
from app.workflows.rules import SENDABLE

log = logging.getLogger(__name__)

SENT_PREFIX = "corral:sent:"
SENT_TTL_S = 24 * 3600  # markers nobody confirmed (beat not running) expire
# Drop each marker only if it still names the confirmed attempt (a newer one stays).
_FORGET = """
local n = 0
for i, key in ipairs(KEYS) do
  if redis.call('GET', key) == ARGV[i] then n = n + redis.call('DEL', key) end
end
return n
"""

_producers: dict[str, Celery] = {}
_lock = threading.Lock()


def producer() -> Celery:
    """A Celery app that publishes to the settings' broker (the workers' app consumes)."""
    url = get_settings().broker_url
    with _lock:
        app = _producers.get(url)
        if app is None:
            app = _producers[url] = Celery("corral", broker=url, set_as_current=False)
            app.conf.update(
                task_serializer="json",
                accept_content=["json"],
                broker_connection_retry_on_startup=True,
                broker_transport_options={"max_retries": 2},
            )
        return app


def send(dispatches: Sequence[Dispatch]) -> None:
    """Publish each dispatch, then leave its marker. Never raises for a broker outage: the
    steps are committed, and the reconciler sends what has no marker."""
    if not dispatches:
        return
    dispatches = _routed(dispatches)
    app = producer()
    sent: dict[str, int] = {}
    try:
        with app.producer_or_acquire() as pub:
            for d in dispatches:
                app.send_task(
                    STEP_TASK,
                    args=[d.step_run_id, d.attempt],
                    queue=queue_for(d.model),
                    task_id=f"{d.step_run_id}-{d.attempt}",
                    countdown=d.countdown or None,
                    priority=d.priority or None,  # none: the queue's normal list
                    producer=pub,
                )
                sent[d.step_run_id] = d.attempt
    except (RedisError, OSError, BrokerError) as exc:
        log.warning("could not enqueue %d step(s), the reconciler will: %s", len(dispatches), exc)
    try:
        if sent:
            record_sent(sent)
    except (RedisError, OSError) as exc:  # sent again by the reconciler: a duplicate at most
        log.warning("could not mark %d step(s) sent: %s", len(sent), exc)
    waiting = _without_pool([d for d in dispatches if d.step_run_id in sent])
    if waiting:
        mark_waiting_for_pool(waiting)


def _routed(dispatches: Sequence[Dispatch]) -> Sequence[Dispatch]:
    """The dispatches with each routed model's fallback in place of its model (the steps
    record where they were sent)."""
    try:
        table = routing.routes(max_age_s=routing.VIEW_MAX_AGE_S)
    except (RedisError, OSError):
        return dispatches  # the send fails too, and the reconciler sends them later
    if not table or not any(d.model in table for d in dispatches):
        return dispatches
    moved: dict[str, list[str]] = {}
    out = []
    for d in dispatches:
        fallback = table.get(d.model)
        if fallback is None:
            out.append(d)
            continue
        moved.setdefault(fallback, []).append(d.step_run_id)
        out.append(replace(d, model=fallback))
    try:
        with db.session_scope(write=True) as session:
            for fallback, ids in moved.items():
                session.exec(
                    update(StepRun)
                    .where(StepRun.id.in_(ids))  # type: ignore[attr-defined]
                    .values(routed_to=fallback)
                )
    except ServiceUnavailable as exc:  # routed all the same; only the record is missing
        log.warning("could not record the routing of %d step(s): %s", len(out), exc)
    return out


def record_sent(attempts: Mapping[str, int]) -> None:
    """Leave a marker per sent step: the attempt its message carries."""
    pipe = get_redis().pipeline(transaction=False)
    for step_run_id, attempt in attempts.items():
        pipe.set(SENT_PREFIX + step_run_id, attempt, ex=SENT_TTL_S)
    pipe.execute()


def forget_sent(attempts: Mapping[str, int]) -> None:
    """Drop the markers of sends the database now records."""
    if attempts:
        keys = [SENT_PREFIX + sid for sid in attempts]
        get_redis().eval(_FORGET, len(keys), *keys, *(str(a) for a in attempts.values()))


def sent_attempts(step_run_ids: Sequence[str]) -> dict[str, int]:
    """The attempt each step's marker names (steps without a marker are left out)."""
    if not step_run_ids:
        return {}
    values = get_redis().mget([SENT_PREFIX + sid for sid in step_run_ids])
    return {sid: int(v) for sid, v in zip(step_run_ids, values, strict=True) if v is not None}


def _without_pool(sent: Sequence[Dispatch]) -> list[str]:
    """Sent steps whose model has no live worker right now."""
    try:
        models = {w.get("model") for w in live.live_workers(max_age_s=live.VIEW_MAX_AGE_S)}
    except (RedisError, OSError):
        return []
    return [d.step_run_id for d in sent if d.model not in models]


def mark_waiting_for_pool(step_run_ids: Sequence[str]) -> None:
    """Queued steps whose queue no worker consumes yet wait as ``waiting_for_pool``."""
    with db.session_scope(write=True) as session:
        session.exec(
            update(StepRun)
            .where(
                StepRun.id.in_(step_run_ids),  # type: ignore[attr-defined]
                StepRun.status == StepStatus.queued,  # type: ignore[arg-type]
            )
            .values(status=StepStatus.waiting_for_pool)
        )


def undispatched(older_than_s: float, limit: int = 500) -> list[Dispatch]:
    """Steps readied more than ``older_than_s`` ago whose send is not recorded yet, each
    with its workflow's priority."""
    cutoff = utcnow() - timedelta(seconds=older_than_s)
    priority = WorkflowRun.spec["priority"].as_string()
    with db.session_scope() as session:
        rows = session.exec(
            select(StepRun, priority)
            .join(WorkflowRun, WorkflowRun.id == StepRun.workflow_id)  # type: ignore[arg-type]
            .where(
                StepRun.status.in_(SENDABLE),  # type: ignore[attr-defined]
                StepRun.dispatched_at.is_(None),  # type: ignore[union-attr]
                StepRun.queued_at < cutoff,  # type: ignore[operator]
            )
            .limit(limit)
        ).all()
        return [
            Dispatch(r.id, r.model, r.attempts + 1, priority=celery_priority(p)) for r, p in rows
        ]


def mark_dispatched(attempts: Mapping[str, int]) -> None:
    """Record these sends in the database, each only while its attempt is the step's next
    (a late mark never covers a retry that has not reached the broker)."""
    now = utcnow()
    with db.session_scope(write=True) as session:
        for step_run_id, attempt in attempts.items():
            session.exec(
                update(StepRun)
                .where(
                    StepRun.id == step_run_id,  # type: ignore[arg-type]
                    StepRun.attempts == attempt - 1,  # type: ignore[arg-type]
                )
                .values(dispatched_at=now)
            )


def reconcile(older_than_s: float) -> int:
    """Record the sends that reached the broker; send again those that did not. Returns
    how many were sent again."""
    pending = undispatched(older_than_s)
    if not pending:
        return 0
    seen = sent_attempts([d.step_run_id for d in pending])
    confirmed = {d.step_run_id: d.attempt for d in pending if seen.get(d.step_run_id) == d.attempt}
    if confirmed:
        mark_dispatched(confirmed)
        forget_sent(confirmed)
    missing = [d for d in pending if d.step_run_id not in confirmed]
    if missing:
        log.info("sending %d step(s) that never reached the broker", len(missing))
        send(missing)
    return len(missing)
