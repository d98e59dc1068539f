"""Live events of workflows, on Redis streams: each step's token deltas, and change ticks.

A worker appends the text of a step as the model decodes it to the step's own stream,
and after every commit that changes a workflow a tick goes on the workflow's change
stream::

    worker: decode ── DeltaWriter ──> XADD corral:tokens:<workflow>:<step>  {a: attempt, t: text}
    any commit ──── note_change ───> XADD corral:changes:<workflow>        {e: ended}
    API: XREAD BLOCK on both ──> read the workflow when it changed ──> relay to the client

Streams keep their entries (for :data:`Settings.stream_ttl_s` after the last one), so a
reader that connects late or reconnects reads from the start and misses nothing. The
database stays the source of truth: a lost tick costs latency (readers read it again
every :data:`events.RECHECK_S`), and a lost delta is made good from the step's stored
output when it ends.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import redis
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from app.core.config import get_settings
from app.core.errors import ConfigError
from app.core.redis import get_redis

log = logging.getLogger(__name__)

TOKENS_KEY = "corral:tokens:{workflow_id}:{step_id}"
CHANGES_KEY = "corral:changes:{workflow_id}"
_CHANGES_KEPT = 64  # ticks kept per workflow: a reader only needs the latest


def tokens_key(workflow_id: str, step_id: str) -> str:
    return TOKENS_KEY.format(workflow_id=workflow_id, step_id=step_id)


def changes_key(workflow_id: str) -> str:
    return CHANGES_KEY.format(workflow_id=workflow_id)


def note_change(workflow_id: str, *, ended: bool = False) -> None:
    """Tick ``workflow_id``'s change stream (call after the commit); ``ended`` when the
    commit ended it. Never raises: a lost tick only makes readers notice at their next
    read."""
    try:
        pipe = get_redis().pipeline(transaction=False)
        key = changes_key(workflow_id)
        pipe.xadd(key, {"e": int(ended)}, maxlen=_CHANGES_KEPT, approximate=True)
        pipe.expire(key, get_settings().stream_ttl_s)
        pipe.execute()
    except (RedisError, OSError, ConfigError) as exc:
        log.warning("could not note a change of workflow %s: %s", workflow_id, exc)


class DeltaWriter:
    """Appends one step attempt's text to its token stream as it is generated.

    The first piece goes out at once (the client's first token); later pieces are
    gathered and sent at most every ``flush_s``, and the rest by :meth:`close`. Never
    raises: when Redis fails the deltas are dropped (the stored output has the text).
    """

    def __init__(
        self,
        workflow_id: str,
        step_id: str,
        attempt: int,
        client: redis.Redis | None = None,
        flush_s: float | None = None,
    ) -> None:
        settings = get_settings()
        self.key = tokens_key(workflow_id, step_id)
        self.attempt = attempt
        self._client = client
        self._flush_s = settings.stream_flush_s if flush_s is None else flush_s
        self._ttl_s = settings.stream_ttl_s
        self._pending: list[str] = []
        self._last = 0.0
        self._broken = False
        self.sent = 0  # entries written

    def __call__(self, text: str) -> None:
        if not text or self._broken:
            return
        self._pending.append(text)
        now = time.monotonic()
        if self.sent == 0 or now - self._last >= self._flush_s:
            self._flush(now)

    def _flush(self, now: float) -> None:
        if not self._pending:
            return
        text, self._pending = "".join(self._pending), []
        try:
            client = self._client or get_redis()
            pipe = client.pipeline(transaction=False)
            pipe.xadd(self.key, {"a": self.attempt, "t": text})
            if self.sent == 0:
                pipe.expire(self.key, self._ttl_s)
            pipe.execute()
            self.sent += 1
        except (RedisError, OSError) as exc:
            self._broken = True
            log.warning("token stream %s: giving up on deltas: %s", self.key, exc)
        self._last = now

    def close(self) -> None:
        """Send what is gathered, and keep the stream for its time to live from now."""
        if self._broken:
            return
        self._flush(time.monotonic())
        if self.sent:
            try:
                (self._client or get_redis()).expire(self.key, self._ttl_s)
            except (RedisError, OSError) as exc:
                log.warning("token stream %s: %s", self.key, exc)


@dataclass(frozen=True, slots=True)
class Delta:
    """A piece of a step's generated text."""

    step_id: str
    attempt: int
    text: str


@dataclass(frozen=True, slots=True)
class Read:
    """What one read of the streams found: new deltas, whether the workflow changed, and
    whether a change ended it."""

    deltas: list[Delta]
    changed: bool = False
    ended: bool = False


@dataclass
class Follower:
    """Reads a workflow's change ticks and its steps' token streams, from their start.

    :meth:`next` blocks until something arrives (or ``block_s`` passes) and returns what
    came. Readers call it in a loop, reading the workflow from the database when it
    changed (or only when it ended, if that is all they need).
    """

    client: aioredis.Redis
    workflow_id: str
    step_ids: list[str]

    def __post_init__(self) -> None:
        self._changes = changes_key(self.workflow_id)
        self._ids: dict[Any, Any] = {self._changes: "0-0"}
        self._steps: dict[str, str] = {}
        for step_id in self.step_ids:
            key = tokens_key(self.workflow_id, step_id)
            self._ids[key] = "0-0"
            self._steps[key] = step_id

    async def next(self, block_s: float) -> Read:
        """New deltas and change ticks, waiting up to ``block_s`` for the first."""
        reply = await self.client.xread(self._ids, block=max(1, int(block_s * 1000)))
        return self._take(reply)

    async def drain(self) -> list[Delta]:
        """Every delta already written and not yet returned, without waiting."""
        reply = await self.client.xread({k: v for k, v in self._ids.items() if k in self._steps})
        return self._take(reply).deltas

    def _take(self, reply: Any) -> Read:
        deltas: list[Delta] = []
        changed = ended = False
        for raw_key, entries in _streams(reply):
            key = raw_key.decode() if isinstance(raw_key, bytes) else str(raw_key)
            if not entries:
                continue
            self._ids[key] = _text(entries[-1][0])
            if key == self._changes:
                changed = True
                ended = ended or any(_field(fields, "e") == "1" for _id, fields in entries)
                continue
            step_id = self._steps[key]
            for _entry_id, fields in entries:
                deltas.append(Delta(step_id, int(_field(fields, "a") or 0), _field(fields, "t")))
        return Read(deltas, changed, ended)


def _streams(reply: Any) -> list[tuple[Any, list[Any]]]:
    """XREAD's reply as (key, entries) pairs, from RESP2 (a list) or RESP3 (a map)."""
    if not reply:
        return []
    if isinstance(reply, Mapping):
        return [(k, v[0] if v and isinstance(v[0], list) else v) for k, v in reply.items()]
    return [(k, v) for k, v in reply]


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _field(fields: Any, name: str) -> str:
    value = fields.get(name.encode(), fields.get(name)) if isinstance(fields, Mapping) else None
    return "" if value is None else _text(value)
