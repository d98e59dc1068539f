"""Sending ready steps to their model's Celery queue (always after the commit).

Every send also leaves a marker in the broker's Redis, ``corral:sent:<step run id>`` = the
attempt sent, in the same script call that pushes the message. The marker lives where the
message lives: beat's reconciler (:func:`reconcile`) reads the markers of steps that have
waited unconfirmed for ``CORRAL_RECONCILE_AFTER_S``, records the confirmed sends in the
database (and drops their markers), and sends again only the steps that have none: those
whose commit was never followed by a publish (a crash, a broker outage). The hot path
writes nothing to the database after its commit.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import uuid
from collections.abc import Awaitable, Mapping, Sequence
from datetime import timedelta

import redis
import redis.asyncio as aioredis
from celery import Celery
from redis.commands.core import AsyncScript, Script
from redis.exceptions import RedisError
from sqlalchemy import update
from sqlmodel import select

from app import inline
from app.store import db
from app.scheduler import live
from app.claims import WORK_HEADER
from app.core.config import get_settings
from app.engine import SENDABLE, Dispatch, Dispatcher
from app.store.tables import StepRun, StepStatus, utcnow

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


def step_message(celery: Celery, d: Dispatch) -> bytes:
    """The Redis list entry for ``corral.step.run(step_run_id, attempt)``.

    Celery builds the protocol-2 task message (headers, properties, body); around it is
    the envelope kombu's Redis transport pushes for a task sent to a queue through the
    default (anonymous) exchange: JSON, the body base64-encoded. Pushing it with LPUSH is
    what ``send_task(..., queue=...)`` ends in; tests check the two stay identical.
    """
    from workers.celery_app import STEP_TASK, queue_for

    task_id = f"{d.step_run_id}-{d.attempt}"
    args = [d.step_run_id, d.attempt]
    parent = celery.current_worker_task  # a step readied by a step: Flower shows the chain
    headers, properties, body, _ = celery.amqp.as_task_v2(
        task_id,
        STEP_TASK,
        args=args,
        countdown=d.countdown or None,
        reply_to=celery.thread_oid,
        root_id=(parent.request.root_id or parent.request.id) if parent else task_id,
        parent_id=parent.request.id if parent else None,
        ignore_result=None,
        argsrepr=repr(args),  # what saferepr gives for a string and an int, without its cost
        kwargsrepr="{}",
    )
    if d.work is not None:  # what send_task(headers=...) adds, last
        headers[WORK_HEADER] = d.work
    return json.dumps(
        {
            "body": base64.b64encode(json.dumps(body).encode()).decode(),
            "content-encoding": "utf-8",
            "content-type": "application/json",
            "headers": headers,
            "properties": {
                **properties,
                "delivery_mode": 2,  # persistent
                "delivery_info": {"exchange": "", "routing_key": queue_for(d.model)},
                "priority": 0,
                "body_encoding": "base64",
                "delivery_tag": str(uuid.uuid4()),
            },
        }
    ).encode()


# Push each message, then leave its marker. A command that fails stops the script there:
# every step before it is pushed and marked, it and the rest are neither (nothing is ever
# marked sent that was not pushed; the reconciler sends the unmarked ones).
_SEND = f"""
for i = 1, #KEYS, 2 do
  redis.call('LPUSH', KEYS[i], ARGV[i])
  redis.call('SET', KEYS[i + 1], ARGV[i + 1], 'EX', {SENT_TTL_S})
end
return #KEYS / 2
"""


_scripts: dict[int, Script] = {}  # id(client): the send script registered with it


def _send_script(client: redis.Redis) -> Script:
    """The send script for ``client`` (its SHA is computed once; Redis caches the body)."""
    script = _scripts.get(id(client))
    if script is None or script.registered_client is not client:
        script = _scripts[id(client)] = client.register_script(_SEND)
    return script


class CeleryDispatcher:
    """Publishes ``corral.step.run(step_run_id, attempt)`` on ``model.<name>``.

    Every message and its step's sent-marker go to the broker's Redis in one script call:
    one round trip for a batch (a fan-out readies many steps), and a marker exists only
    for a message that was pushed. :meth:`send_async` is the same send for an event loop
    (the API's inline submit), on an asyncio client of its own.
    """

    def __init__(self, celery: Celery) -> None:
        self.celery = celery
        # (loop, broker URL, client, its send script) for send_async; one per loop.
        self._async: tuple[asyncio.AbstractEventLoop, str, aioredis.Redis, AsyncScript] | None
        self._async = None

    def _batch(self, dispatches: Sequence[Dispatch]) -> tuple[list[str], list[bytes | int]]:
        from workers.celery_app import queue_for

        keys: list[str] = []
        argv: list[bytes | int] = []
        for d in dispatches:
            keys += [queue_for(d.model), SENT_PREFIX + d.step_run_id]
            argv += [step_message(self.celery, d), d.attempt]
        return keys, argv

    def send(self, dispatches: Sequence[Dispatch]) -> None:
        if not dispatches:
            return
        keys, argv = self._batch(dispatches)
        try:
            _send_script(live.get_redis())(keys=keys, args=argv)
        except (RedisError, OSError) as exc:
            _not_sent(dispatches, exc)
            return
        no_pool = self._without_pool(dispatches)
        if no_pool:
            mark_waiting_for_pool(no_pool)

    async def send_async(
        self, dispatches: Sequence[Dispatch], committed: Awaitable[object] | None = None
    ) -> None:
        """:meth:`send` without blocking the running event loop: the script call on an
        asyncio client, and what else would wait (a stale live-pool view to refresh,
        steps to mark ``waiting_for_pool``) in a thread. ``committed``: the rows' commit
        still under way, awaited once the messages are pushed (and raised from), before
        the steps are marked: the mark must find them."""
        sent = False
        try:
            if dispatches:
                keys, argv = self._batch(dispatches)
                await self._async_script()(keys=keys, args=argv)
                sent = True
        except (RedisError, OSError) as exc:
            _not_sent(dispatches, exc)
        finally:
            if committed is not None:
                await committed
        if not sent:
            return
        try:
            with inline.active():
                no_pool = self._without_pool(dispatches)
        except inline.WouldBlock:
            no_pool = await asyncio.to_thread(self._without_pool, dispatches)
        if no_pool:
            await asyncio.to_thread(mark_waiting_for_pool, no_pool)

    def _async_script(self) -> AsyncScript:
        loop, url = asyncio.get_running_loop(), get_settings().broker_url
        if self._async is None or self._async[0] is not loop or self._async[1] != url:
            client = aioredis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)
            self._async = (loop, url, client, client.register_script(_SEND))
        return self._async[3]

    async def aclose(self) -> None:
        """Close the asyncio client of the running loop (the API's shutdown)."""
        found, self._async = self._async, None
        if found is not None and found[0] is asyncio.get_running_loop():
            await found[2].aclose()

    @staticmethod
    def _without_pool(sent: Sequence[Dispatch]) -> list[str]:
        """Sent steps whose model has no live worker right now."""
        try:
            live_models = {w.get("model") for w in live.live_workers(max_age_s=live.VIEW_MAX_AGE_S)}
        except (RedisError, OSError):
            return []
        return [d.step_run_id for d in sent if d.model not in live_models]


def _not_sent(dispatches: Sequence[Dispatch], exc: BaseException) -> None:
    # The steps stay `queued`; the reconciler sends those that have no marker. They are
    # committed: a broker outage delays them, it does not lose them.
    log.warning("could not enqueue %d step(s), the reconciler will: %s", len(dispatches), exc)


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
