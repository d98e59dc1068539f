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

On a database server a notice may also carry the workflow's view as its transaction
wrote it (:class:`Carried`: read in the same script as the writes, before the commit), so
a waiting request answers without a read of its own, a round trip saved. A view larger
than :data:`CARRY_MAX`, or a notice without one (SQLite, an older worker), means: read.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import redis
import redis.asyncio as aioredis
from redis.connection import AbstractConnection
from redis.exceptions import RedisError

from app.scheduler import live
from app.core.config import get_settings
from app.core.errors import ConfigError

log = logging.getLogger(__name__)

CHANNEL = "corral:workflow-finished"
MAX_WAIT_S = 60.0  # the longest a client may ask one request to wait
RECHECK_S = 2.0  # waiters re-read the database this often even if no message comes
_RESUBSCRIBE_S = 1.0  # pause before subscribing again after a Redis error
_SUBSCRIBE_WAIT_S = 1.0  # how long a first waiter waits for the subscription to be live


CARRY_MAX = 32 * 1024  # the largest view a notice carries (characters of JSON)


@dataclass(frozen=True, slots=True)
class Carried:
    """A finished workflow's view as a notice carries it: whose it is, and its JSON (a
    :class:`app.workflows.schemas.WorkflowPublic`)."""

    api_key_id: int | None
    view: str

    def message(self, workflow_id: str) -> str:
        """The notice: ``<workflow id> <key id or -> <view JSON>``."""
        key = "-" if self.api_key_id is None else str(self.api_key_id)
        return f"{workflow_id} {key} {self.view}"

    @staticmethod
    def parse(message: str) -> tuple[str, Carried | None]:
        """A notice's workflow id and its view, if it carries one."""
        workflow_id, _, rest = message.partition(" ")
        key, _, view = rest.partition(" ")
        if not view or not (key == "-" or key.isdigit()):
            return workflow_id, None
        return workflow_id, Carried(None if key == "-" else int(key), view)


def publish_finished(workflow_id: str, carried: Carried | None = None) -> None:
    """Announce that ``workflow_id`` reached a terminal state (call after the commit),
    with its view as committed when given (and no larger than :data:`CARRY_MAX`).

    Never raises and never waits for Redis' answer (see :class:`Announcer`): a failed
    publish only makes waiters notice at their next re-read.
    """
    message = workflow_id
    if carried is not None and len(carried.view) <= CARRY_MAX:
        message = carried.message(workflow_id)
    try:
        _announcer().publish(CHANNEL, message)
    except (RedisError, OSError, ConfigError) as exc:
        log.warning("could not announce that workflow %s finished: %s", workflow_id, exc)


class Announcer:
    """A connection to Redis that sends ``PUBLISH``es and reads no answers.

    A finish notice is fire-and-forget (the database is the truth; a lost one costs a
    waiter's next re-read), yet through redis-py's client the pool process that ends a
    workflow waited for each ``PUBLISH``'s answer: on a busy host that is where it lost its
    CPU to Redis and to the API it wakes, before it could take its next step. This
    connection tells Redis ``CLIENT REPLY OFF`` once, after which Redis answers nothing on
    it and a publish is one ``send``. Before each send it checks, without blocking, that
    the server has not closed the connection (a restarted Redis): it then connects again.
    Made from the client's own pool settings (address, auth, TLS, database); one per
    process, shared by its threads under a lock.
    """

    def __init__(self, client: redis.Redis) -> None:
        pool = client.connection_pool
        kwargs = dict(pool.connection_kwargs)
        kwargs["health_check_interval"] = 0  # a health check waits for a PONG never sent
        self._make: Callable[[], AbstractConnection] = lambda: pool.connection_class(**kwargs)
        self._conn: AbstractConnection | None = None
        self._lock = threading.Lock()

    def publish(self, channel: str, message: str) -> None:
        with self._lock:
            try:
                _send(self._connection(), "PUBLISH", channel, message)
            except (RedisError, OSError):
                self.close_locked()  # one fresh connection, then give up on this notice
                _send(self._connection(), "PUBLISH", channel, message)

    def _connection(self) -> AbstractConnection:
        conn = self._conn
        if conn is not None:
            try:
                if not conn.can_read(timeout=0):  # nothing to read: still open, as it should be
                    return conn
            except (RedisError, OSError):
                pass  # closed by the server
            self.close_locked()
        conn = self._make()
        conn.connect()  # type: ignore[no-untyped-call]
        _send(conn, "CLIENT", "REPLY", "OFF")  # from here on Redis answers nothing
        self._conn = conn
        return conn

    def close_locked(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(RedisError, OSError):
                self._conn.disconnect()  # type: ignore[no-untyped-call]
            self._conn = None

    def close(self) -> None:
        with self._lock:
            self.close_locked()


def _send(conn: AbstractConnection, *args: str) -> None:
    conn.send_command(*args, check_health=False)  # type: ignore[no-untyped-call]


_announcers: dict[tuple[str, int], Announcer] = {}
_announcers_lock = threading.Lock()


def _announcer() -> Announcer:
    """This process's announcer for the settings' Redis (a new one after a fork)."""
    key = (get_settings().broker_url, os.getpid())
    with _announcers_lock:
        found = _announcers.get(key)
        if found is None:
            found = _announcers[key] = Announcer(live.get_redis())
        return found


class FinishedListener:
    """One Redis subscription per API process that wakes requests waiting on a workflow."""

    def __init__(self) -> None:
        self._waiters: dict[str, set[asyncio.Event]] = {}
        self._carried: dict[str, Carried] = {}  # views notices brought, while waited for
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
                    self._carried.pop(workflow_id, None)

    def carried(self, workflow_id: str) -> Carried | None:
        """The view the finish notice of ``workflow_id`` carried, if one came while it was
        watched (ask inside :meth:`watch`, once its event is set)."""
        return self._carried.get(workflow_id)

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
                        text = data.decode() if isinstance(data, bytes) else str(data)
                        workflow_id, carried = Carried.parse(text)
                        if carried is not None and workflow_id in self._waiters:
                            self._carried[workflow_id] = carried
                        self._wake(workflow_id)
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
