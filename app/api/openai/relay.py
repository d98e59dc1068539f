"""Following a workflow while a client waits: to its end, or token by token.

:func:`follow` yields a workflow's events in order: its steps' token deltas as the
worker writes them, and a fresh read of the workflow whenever it changed, ending with
the read that finds it ended. It reads the streams of :mod:`app.workflows.streams` from
their start, so it misses nothing however late it begins; when Redis fails it reads the
database every :data:`events.RECHECK_S` instead, and the text of a step is made good
from its stored output at the end (:func:`missing_text`).

When the client goes away first, :func:`cancel_on_disconnect` cancels the workflow:
nobody is left to read its answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import anyio
import redis.asyncio as aioredis
from fastapi import Request
from redis.exceptions import RedisError

from app.core.errors import CorralError
from app.workflows import events, service
from app.workflows.schemas import WorkflowPublic
from app.workflows.streams import Delta, Follower, Read

log = logging.getLogger(__name__)
T = TypeVar("T")


async def follow(
    client: aioredis.Redis,
    workflow_id: str,
    step_ids: list[str],
    api_key_id: int | None,
    *,
    every_change: bool = False,
) -> AsyncIterator[Delta | WorkflowPublic]:
    """The workflow's deltas, and its state when it ended (with ``every_change``, after
    each change too), until it has ended.

    Without ``every_change`` the database is read when a tick says the workflow ended,
    or when nothing came for :data:`events.RECHECK_S` (a lost tick): not while a step
    is starting or generating.
    """
    follower = Follower(client, workflow_id, step_ids)
    while True:
        try:
            got = await follower.next(events.RECHECK_S)
        except (RedisError, OSError) as exc:
            log.warning("cannot read the events of %s, reading the database: %s", workflow_id, exc)
            await asyncio.sleep(events.RECHECK_S)
            got = Read([], changed=True, ended=True)
        for delta in got.deltas:
            yield delta
        quiet = not got.deltas and not got.changed
        if got.ended or quiet or (every_change and got.changed):
            view = await anyio.to_thread.run_sync(service.read, workflow_id, api_key_id)
            if view.status.terminal:
                with contextlib.suppress(RedisError, OSError):
                    for delta in await follower.drain():
                        yield delta
                yield view
                return
            if every_change:
                yield view


def missing_text(sent: str, final: str) -> str:
    """What of a step's stored ``final`` text the client has not had, when ``sent`` is a
    prefix of it (deltas lost to a Redis failure); else nothing."""
    return final[len(sent) :] if final.startswith(sent) else ""


async def cancel_quietly(workflow_id: str, api_key_id: int | None) -> None:
    """Cancel a workflow whose client went away; shielded, since the request that asks it
    is itself being cancelled."""
    with anyio.CancelScope(shield=True):
        try:
            await anyio.to_thread.run_sync(service.cancel, workflow_id, api_key_id)
        except CorralError as exc:
            log.warning("could not cancel %s after its client left: %s", workflow_id, exc)


async def _disconnected(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


class ClientGone(Exception):
    """The client disconnected before the answer was ready."""


async def cancel_on_disconnect(
    request: Request, work: Callable[[], Awaitable[T]], workflow_id: str, api_key_id: int | None
) -> T:
    """``await work()``; if the client disconnects first, cancel the workflow and raise
    :class:`ClientGone`."""
    task = asyncio.ensure_future(work())
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not task.done():
            task.cancel()
        gone.cancel()
    if task.done() and not task.cancelled():
        return task.result()
    await cancel_quietly(workflow_id, api_key_id)
    raise ClientGone(workflow_id)


async def wait_for_end(
    client: aioredis.Redis, workflow_id: str, step_ids: list[str], api_key_id: int | None
) -> WorkflowPublic:
    """The workflow's state once it has ended, however long that takes."""
    last: WorkflowPublic | None = None
    async for event in follow(client, workflow_id, step_ids, api_key_id):
        if isinstance(event, WorkflowPublic):
            last = event
    assert last is not None and last.status.terminal
    return last


def sse(data: Any, event: str | None = None) -> bytes:
    """One Server-Sent Event: ``data`` as JSON (or as is, a str)."""
    import json

    body = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {body}\n\n".encode()
