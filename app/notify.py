"""Workflow-finished notifications over Redis pub/sub, for long-polling reads.

The engine calls :func:`publish_finished` after the commit that moves a workflow to a
terminal state. Each API process holds one subscription, a :class:`FinishedListener`, that
wakes the requests waiting on that workflow (``GET /v1/workflows/{id}?wait_s=N``)::

    worker ── commit (succeeded | failed) ──> PUBLISH corral:workflow-finished <id>
                                                      │
    API process: FinishedListener (one SUBSCRIBE) ────┘──> wakes waiters of <id> ──> re-read DB

The database stays the source of truth: a message only says "read again". A lost message
(Redis blip, a publish that failed) costs latency, never a wrong answer: waiters re-read
the database at least every :data:`RECHECK_S`, and every waiter re-reads when the
subscription is (re)established.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from app import live
from app.core.config import get_settings
from app.errors import ConfigError

log = logging.getLogger(__name__)

CHANNEL = "corral:workflow-finished"
MAX_WAIT_S = 60.0  # the longest a client may ask one request to wait
RECHECK_S = 2.0  # waiters re-read the database this often even if no message comes
_RESUBSCRIBE_S = 1.0  # pause before subscribing again after a Redis error
_SUBSCRIBE_WAIT_S = 1.0  # how long a first waiter waits for the subscription to be live


def publish_finished(workflow_id: str) -> None:
    """Announce that ``workflow_id`` reached a terminal state (call after the commit).

    Never raises: a failed publish only makes waiters notice at their next re-read.
    """
    try:
        live.get_redis().publish(CHANNEL, workflow_id)
    except (RedisError, OSError, ConfigError) as exc:
        log.warning("could not announce that workflow %s finished: %s", workflow_id, exc)


class FinishedListener:
    """One Redis subscription per API process that wakes requests waiting on a workflow."""

    def __init__(self) -> None:
        self._waiters: dict[str, set[asyncio.Event]] = {}
        self._subscribed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @contextlib.asynccontextmanager
    async def watch(self, workflow_id: str) -> AsyncIterator[asyncio.Event]:
        """An event set when ``workflow_id`` may have finished; register before reading.

        Read the workflow inside the block, then wait on the event: a finish committed
        after the read is then always noticed (by its message, or by the re-read that a
        resubscription triggers).
        """
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

    def _wake(self, workflow_id: str) -> None:
        for event in self._waiters.get(workflow_id, ()):
            event.set()

    def _wake_all(self) -> None:
        for waiters in self._waiters.values():
            for event in waiters:
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
                        self._wake_all()  # anything missed while unsubscribed: re-read
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
        """Stop the subscription (API shutdown)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
