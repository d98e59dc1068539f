"""What crosses processes about a running workflow, over Redis: finish notices and
cancel flags.

After the commit that ends a workflow, :func:`publish_finished` publishes its id on
:data:`CHANNEL`. Each API process holds one subscription, a :class:`FinishedListener`,
that wakes the requests waiting on that workflow::

    worker ── commit (succeeded | failed) ──> PUBLISH corral:workflow-finished <id>
                                                      │
    API process: FinishedListener (one SUBSCRIBE) ────┘──> wakes waiters of <id> ──> read

The database stays the source of truth: a notice only says "read again". A lost notice
(a Redis blip, a failed publish) costs latency, never a wrong answer: waiters read again
at least every :data:`RECHECK_S`, and all of them when the subscription is re-established.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from app.core.config import get_settings
from app.core.errors import ConfigError
from app.core.redis import get_redis

log = logging.getLogger(__name__)

CHANNEL = "corral:workflow-finished"
CANCEL_KEY = "corral:cancel:{workflow_id}"
CANCEL_TTL_S = 7 * 24 * 3600
MAX_WAIT_S = 60.0  # the longest one request may wait for a workflow's end
RECHECK_S = 2.0  # waiters read the database at least this often, notice or not
_RESUBSCRIBE_S = 1.0  # pause before subscribing again after a Redis error
_SUBSCRIBE_WAIT_S = 1.0  # how long a first waiter waits for the subscription to be live


def publish_finished(workflow_id: str) -> None:
    """Announce that ``workflow_id`` ended (call after the commit). Never raises: a lost
    notice only makes waiters notice at their next read."""
    try:
        get_redis().publish(CHANNEL, workflow_id)
    except (RedisError, OSError, ConfigError) as exc:
        log.warning("could not announce that workflow %s finished: %s", workflow_id, exc)


def request_cancel(workflow_id: str) -> None:
    """Tell the running steps of a workflow to stop (their workers poll this flag). Never
    raises: the cancel is committed already, and a running step's result is refused
    whether or not its worker heard of it."""
    try:
        get_redis().set(CANCEL_KEY.format(workflow_id=workflow_id), 1, ex=CANCEL_TTL_S)
    except (RedisError, OSError) as exc:
        log.warning("could not flag workflow %s cancelled: %s", workflow_id, exc)


def is_cancelled(workflow_id: str) -> bool:
    """Whether a cancel of ``workflow_id`` was requested."""
    return bool(get_redis().exists(CANCEL_KEY.format(workflow_id=workflow_id)))


class FinishedListener:
    """One Redis subscription per API process that wakes requests waiting on a workflow."""

    def __init__(self) -> None:
        self._waiters: dict[str, set[asyncio.Event]] = {}
        self._subscribed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @contextlib.asynccontextmanager
    async def watch(self, workflow_id: str) -> AsyncIterator[asyncio.Event]:
        """An event set when ``workflow_id`` may have ended; read its state inside the
        block, then wait on the event: an end committed after the read is noticed (by its
        notice, or by the read again that a resubscription triggers)."""
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._listen(), name="corral-finished-listener")
        event = asyncio.Event()
        self._waiters.setdefault(workflow_id, set()).add(event)
        try:
            if not self._subscribed.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._subscribed.wait(), _SUBSCRIBE_WAIT_S)
            yield event
        finally:
            waiters = self._waiters.get(workflow_id)
            if waiters is not None:
                waiters.discard(event)
                if not waiters:
                    del self._waiters[workflow_id]

    @staticmethod
    async def wait(event: asyncio.Event, timeout_s: float) -> bool:
        """Wait for ``event`` at most ``timeout_s``; whether it was set."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), max(0.0, timeout_s))
        return event.is_set()

    def _wake(self, workflow_id: str | None = None) -> None:
        if workflow_id is None:
            events = [e for waiters in self._waiters.values() for e in waiters]
        else:
            events = list(self._waiters.get(workflow_id, ()))
        for event in events:
            event.set()

    async def _listen(self) -> None:
        url = get_settings().broker_url
        while True:
            client = aioredis.Redis.from_url(url, socket_connect_timeout=5)
            pubsub = client.pubsub()
            try:
                await pubsub.subscribe(CHANNEL)
                async for message in pubsub.listen():
                    if message["type"] == "subscribe":
                        self._subscribed.set()
                        self._wake()  # anything missed while unsubscribed: read again
                    elif message["type"] == "message":
                        data = message["data"]
                        self._wake(data.decode() if isinstance(data, bytes) else str(data))
            except (RedisError, OSError) as exc:
                log.warning("workflow-finished subscription lost, resubscribing: %s", exc)
            finally:
                self._subscribed.clear()
                with contextlib.suppress(RedisError, OSError):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]
                    await client.aclose()
            await asyncio.sleep(_RESUBSCRIBE_S)

    async def close(self) -> None:
        """Stop the subscription (the API's shutdown)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
