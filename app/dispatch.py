"""Sending ready steps to their model's Celery queue (always after the commit).

Every send also leaves a marker in the broker's Redis, ``corral:sent:<step run id>`` = the
attempt sent, in one pipelined round trip after the publishes. The marker lives where the
message lives: beat's reconciler (:func:`reconcile`) reads the markers of steps that have
waited unconfirmed for ``CORRAL_RECONCILE_AFTER_S``, records the confirmed sends in the
database (and drops their markers), and sends again only the steps that have none: those
whose commit was never followed by a publish (a crash, a broker outage). The hot path
writes nothing to the database after its commit.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from datetime import timedelta

import redis
from celery import Celery
from kombu.exceptions import BatchPublishError
from kombu.exceptions import OperationalError as KombuOperationalError
from redis.exceptions import RedisError
from sqlalchemy import update
from sqlmodel import select

from app import db, live
from app.engine import SENDABLE, Dispatch, Dispatcher
from app.tables import StepRun, StepStatus, utcnow

log = logging.getLogger(__name__)

SENT_PREFIX = "corral:sent:"
# Markers the reconciler has not confirmed (beat not running) expire after this long.
SENT_TTL_S = 24 * 3600


def record_sent(client: redis.Redis, attempts: Mapping[str, int]) -> None:
    """Leave a marker per sent step: the attempt its message carries."""
    pipe = client.pipeline(transaction=False)
    for step_run_id, attempt in attempts.items():
        pipe.set(SENT_PREFIX + step_run_id, attempt, ex=SENT_TTL_S)
    pipe.execute()


# Drop each marker only if it still names the attempt that was confirmed (a retry sent
# meanwhile has left a newer one, which must stay until it is confirmed in turn).
_FORGET = """
local n = 0
for i, key in ipairs(KEYS) do
  if redis.call('GET', key) == ARGV[i] then n = n + redis.call('DEL', key) end
end
return n
"""


def forget_sent(client: redis.Redis, attempts: Mapping[str, int]) -> None:
    """Drop the markers of sends the database now records."""
    if attempts:
        keys = [SENT_PREFIX + sid for sid in attempts]
        client.eval(_FORGET, len(keys), *keys, *(str(a) for a in attempts.values()))


def sent_attempts(client: redis.Redis, step_run_ids: Sequence[str]) -> dict[str, int]:
    """The attempt each step's latest marker names (steps with no marker are left out)."""
    if not step_run_ids:
        return {}
    values = client.mget([SENT_PREFIX + sid for sid in step_run_ids])
    return {sid: int(v) for sid, v in zip(step_run_ids, values, strict=True) if v is not None}


# --- what the database records about sends --------------------------------------------


def mark_dispatched(step_run_ids: Sequence[str], attempts: Mapping[str, int]) -> None:
    """Record that these steps' tasks are on the broker (the reconciler confirms sends).

    ``attempts`` names the attempt each send carried: a row is marked only while that send
    is still its latest (``attempts`` one less), so a late mark never covers a retry that
    has not reached the broker.
    """
    by_attempt: dict[int, list[str]] = {}
    for sid in step_run_ids:
        by_attempt.setdefault(attempts[sid], []).append(sid)
    with db.session_scope(write=True) as session:
        # Set-based UPDATEs: no rows are loaded.
        now = utcnow()
        for attempt, ids in by_attempt.items():
            session.exec(
                update(StepRun)
                .where(
                    StepRun.id.in_(ids),  # type: ignore[attr-defined]
                    StepRun.attempts == attempt - 1,  # type: ignore[arg-type]
                )
                .values(dispatched_at=now)
                .execution_options(synchronize_session=False)
            )


def mark_waiting_for_pool(step_run_ids: Sequence[str]) -> None:
    """These queued steps wait on a queue no worker consumes yet: ``waiting_for_pool``
    until a pool for their model claims them."""
    with db.session_scope(write=True) as session:
        session.exec(
            update(StepRun)
            .where(
                StepRun.id.in_(step_run_ids),  # type: ignore[attr-defined]
                StepRun.status == StepStatus.queued,  # type: ignore[arg-type]
            )
            .values(status=StepStatus.waiting_for_pool)
            .execution_options(synchronize_session=False)
        )


def undispatched(older_than_s: float, limit: int = 500) -> list[Dispatch]:
    """Steps readied more than ``older_than_s`` ago whose send nobody has confirmed yet.

    Most were sent (the reconciler confirms them from the broker's markers); the rest never
    reached the broker (a crash or an outage after the commit) and are sent again.
    """
    cutoff = utcnow() - timedelta(seconds=older_than_s)
    with db.session_scope() as session:
        rows = session.exec(
            select(StepRun)
            .where(
                StepRun.status.in_(SENDABLE),  # type: ignore[attr-defined]
                StepRun.dispatched_at.is_(None),  # type: ignore[union-attr]
                StepRun.queued_at < cutoff,  # type: ignore[operator]
            )
            .limit(limit)
        ).all()
        return [Dispatch(r.id, r.model, r.attempts + 1) for r in rows]


# --- sending ----------------------------------------------------------------------------


class CeleryDispatcher:
    """Publishes ``corral.step.run(step_run_id, attempt)`` on ``model.<name>``."""

    def __init__(self, celery: Celery) -> None:
        self.celery = celery

    def send(self, dispatches: Sequence[Dispatch]) -> None:
        from workers.celery_app import STEP_TASK, queue_for

        sent: list[Dispatch] = []
        try:
            with self.celery.producer_or_acquire() as producer:  # one connection per batch
                # One pipelined round trip for the whole batch (a fan-out readies many).
                with producer.batch():
                    for d in dispatches:
                        self.celery.send_task(
                            STEP_TASK,
                            args=[d.step_run_id, d.attempt],
                            queue=queue_for(d.model),
                            countdown=d.countdown or None,
                            producer=producer,
                            task_id=f"{d.step_run_id}-{d.attempt}",
                        )
                sent.extend(dispatches)  # flushed: every message is on the broker
        except (KombuOperationalError, BatchPublishError, RedisError, OSError) as exc:
            # The steps stay `queued` and unconfirmed; the reconciler sends them later.
            # They are committed; a broker outage delays them, it does not lose them. (A
            # batch that failed mid-flush may have delivered some: they are sent again,
            # and the conditional claim drops the duplicates.)
            log.warning(
                "could not enqueue %d step(s), the reconciler will: %s",
                len(dispatches) - len(sent),
                exc,
            )
        finally:
            if sent:
                self._after_send(sent)

    def _after_send(self, sent: list[Dispatch]) -> None:
        try:
            record_sent(live.get_redis(), {d.step_run_id: d.attempt for d in sent})
        except (RedisError, OSError) as exc:
            # No marker: the reconciler sends these again; a duplicate delivery is dropped
            # by the conditional claim, or runs an attempt twice and records one result.
            log.warning("could not record %d sent step(s): %s", len(sent), exc)
        no_pool = self._without_pool(sent)
        if no_pool:
            mark_waiting_for_pool(no_pool)

    @staticmethod
    def _without_pool(sent: Sequence[Dispatch]) -> list[str]:
        """Sent steps whose model has no live worker right now."""
        try:
            live_models = {w.get("model") for w in live.live_workers(max_age_s=1.0)}
        except (RedisError, OSError):
            return []
        return [d.step_run_id for d in sent if d.model not in live_models]


def reconcile(dispatcher: Dispatcher, older_than_s: float) -> int:
    """Confirm sends that reached the broker; send again those that did not. Returns how
    many were sent again."""
    pending = undispatched(older_than_s=older_than_s)
    if not pending:
        return 0
    client = live.get_redis()
    seen = sent_attempts(client, [d.step_run_id for d in pending])
    confirmed = {d.step_run_id: d.attempt for d in pending if seen.get(d.step_run_id) == d.attempt}
    if confirmed:
        mark_dispatched(list(confirmed), confirmed)
        forget_sent(client, confirmed)
    missing = [d for d in pending if d.step_run_id not in confirmed]
    if missing:
        log.info("sending %d step(s) that never reached the broker", len(missing))
        dispatcher.send(missing)
    return len(missing)
