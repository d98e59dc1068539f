"""Finish notices and cancel flags on a real Redis: a publish wakes exactly its waiters,
a workflow's end is announced after its commit, and Redis being down costs a warning."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from app.core.config import Settings, use_settings
from app.core.embedded import EmbeddedRedis
from app.store.tables import StepStatus, WorkflowStatus
from app.workflows import engine, events, service
from app.workflows.events import CANCEL_KEY, CANCEL_TTL_S, CHANNEL, FinishedListener
from app.workflows.spec import validate_workflow
from models.catalog import load_catalog
from tests.utils.workflows import gen, submit


def step_ids(workflow_id: str) -> dict[str, str]:
    _, rows = engine.read(workflow_id, None)
    return {r.step_id: r.id for r in rows}


class Notices:
    """A plain subscriber to the finish channel: the notices published while it listens.

    Pub/sub ignores Redis database numbers, so notices of other test sessions on the same
    server may arrive too: :meth:`of` keeps those of the given workflows."""

    def __init__(self, url: str) -> None:
        self.client = redis.Redis.from_url(url)
        self.pubsub = self.client.pubsub()  # type: ignore[no-untyped-call]
        self.pubsub.subscribe(CHANNEL)
        first = self.pubsub.get_message(timeout=5)
        assert first is not None and first["type"] == "subscribe"

    def of(self, *workflow_ids: str, wait_s: float = 0.5) -> list[str]:
        """Notices of ``workflow_ids`` received within ``wait_s`` of quiet."""
        out: list[str] = []
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            message = self.pubsub.get_message(ignore_subscribe_messages=True, timeout=0.1)
            if message is not None and message["data"].decode() in workflow_ids:
                out.append(message["data"].decode())
        return out

    def close(self) -> None:
        self.pubsub.close()
        self.client.close()


@pytest.fixture
def notices(isolated: Settings) -> Iterator[Notices]:
    n = Notices(isolated.broker_url)
    yield n
    n.close()


async def subscribed(listener: FinishedListener) -> None:
    """Let the listener's subscription go live (its first subscribe wakes every waiter)."""
    async with listener.watch("warm-up"):
        pass


def test_a_publish_wakes_the_waiters_of_that_workflow_only(isolated: Settings) -> None:
    async def scenario() -> tuple[bool, bool, bool, bool]:
        listener = FinishedListener()
        try:
            await subscribed(listener)
            async with (
                listener.watch("wf-1") as mine,
                listener.watch("wf-1") as mine_too,
                listener.watch("wf-2") as other,
            ):
                before = mine.is_set()
                await asyncio.to_thread(events.publish_finished, "wf-1")
                woken = await listener.wait(mine, 10)
                await asyncio.sleep(0.2)  # time for a stray wake-up to show
                return before, woken, mine_too.is_set(), other.is_set()
        finally:
            await listener.close()

    before, woken, also_woken, other = asyncio.run(scenario())
    assert not before
    assert woken and also_woken
    assert not other


def test_waiting_without_a_notice_times_out_unset(isolated: Settings) -> None:
    async def scenario() -> tuple[bool, float]:
        listener = FinishedListener()
        try:
            await subscribed(listener)
            async with listener.watch("wf-quiet") as event:
                started = time.monotonic()
                woken = await listener.wait(event, 0.3)
                return woken, time.monotonic() - started
        finally:
            await listener.close()

    woken, waited = asyncio.run(scenario())
    assert not woken
    assert 0.25 < waited < 5


def test_the_service_announces_a_workflow_that_ends(isolated: Settings, notices: Notices) -> None:
    """Submit, claim and the first of two results change no workflow's end: no notice; the
    last result ends it, and its notice wakes a waiter."""
    wid = submit(isolated, gen("a"), gen("b", depends_on=["a"]))
    ids = step_ids(wid)
    assert service.claim_step(ids["a"], 1) is not None
    assert service.complete_step(ids["a"], 1, {"text": "ok"})
    assert service.claim_step(ids["b"], 1) is not None
    assert notices.of(wid) == []

    async def scenario() -> bool:
        listener = FinishedListener()
        try:
            await subscribed(listener)
            async with listener.watch(wid) as event:
                assert not event.is_set()
                stored = await asyncio.to_thread(
                    service.complete_step, ids["b"], 1, {"text": "done"}
                )
                assert stored
                return await listener.wait(event, 10)
        finally:
            await listener.close()

    assert asyncio.run(scenario())
    assert notices.of(wid) == [wid]  # once
    assert service.read(wid, None).status is WorkflowStatus.succeeded
    # A duplicate result stores nothing and announces nothing.
    assert not service.complete_step(ids["b"], 1, {"text": "again"})
    assert notices.of(wid) == []


def test_a_failure_that_ends_a_workflow_is_announced(isolated: Settings, notices: Notices) -> None:
    wid = submit(isolated, gen("a", retry={"max_attempts": 2}))
    sid = step_ids(wid)["a"]
    assert service.claim_step(sid, 1) is not None
    assert service.fail_step(sid, 1, "boom", retryable=True) is StepStatus.retrying
    assert notices.of(wid) == []  # a retry ends nothing
    assert service.claim_step(sid, 2) is not None
    assert service.fail_step(sid, 2, "boom again", retryable=True) is StepStatus.failed
    assert notices.of(wid) == [wid]
    assert service.read(wid, None).status is WorkflowStatus.failed


def test_a_cancel_is_announced_and_flagged_for_the_workers(
    isolated: Settings, notices: Notices
) -> None:
    wid = submit(isolated)
    assert not events.is_cancelled(wid)
    summary = service.cancel(wid, None)
    assert summary.status is WorkflowStatus.cancelled
    assert events.is_cancelled(wid)
    assert notices.of(wid) == [wid]


def test_wait_for_end_returns_when_the_workflow_ends(isolated: Settings) -> None:
    wid = submit(isolated)
    sid = step_ids(wid)["a"]
    assert service.claim_step(sid, 1) is not None

    async def scenario() -> tuple[WorkflowStatus, float, WorkflowStatus]:
        listener = FinishedListener()
        try:
            # Nothing ends it: the state as it is when the timeout passes.
            running = await service.wait_for_end(listener, wid, None, 0.3)

            async def finish() -> None:
                await asyncio.sleep(0.3)
                await asyncio.to_thread(service.complete_step, sid, 1, {"text": "ok"})

            task = asyncio.create_task(finish())
            started = time.monotonic()
            ended = await service.wait_for_end(listener, wid, None, 30)
            await task
            return running.status, time.monotonic() - started, ended.status
        finally:
            await listener.close()

    running, waited, ended = asyncio.run(scenario())
    assert running is WorkflowStatus.running
    assert ended is WorkflowStatus.succeeded
    assert waited < events.RECHECK_S  # woken by the notice, not by the re-read


def test_a_resubscription_wakes_every_waiter(settings: Settings, tmp_path: Path) -> None:
    """Notices published while the subscription was down are lost: when it is back, every
    waiter is woken to read again."""
    server = EmbeddedRedis(tmp_path / "redis", persist=False).start()
    try:
        with use_settings(settings.model_copy(update={"redis_url": server.url})):

            async def scenario() -> tuple[bool, bool]:
                listener = FinishedListener()
                try:
                    await subscribed(listener)
                    async with listener.watch("wf-a") as a, listener.watch("wf-b") as b:
                        await asyncio.to_thread(server.stop)
                        await asyncio.sleep(0.3)
                        await asyncio.to_thread(server.start)
                        return await listener.wait(a, 15), await listener.wait(b, 15)
                finally:
                    await listener.close()

            assert asyncio.run(scenario()) == (True, True)
    finally:
        server.stop()


def test_a_notice_with_redis_down_is_only_a_warning(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    closed = "redis://127.0.0.1:1/0"  # nothing listens on port 1
    with (
        use_settings(settings.model_copy(update={"redis_url": closed})),
        caplog.at_level(logging.WARNING, logger="app.workflows.events"),
    ):
        events.publish_finished("wf-down")  # returns: a lost notice costs a re-read
    assert "could not announce that workflow wf-down finished" in caplog.text


def test_a_workflow_ends_with_redis_down_all_the_same(
    isolated: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    """The end is committed; the notice that fails after it is only a warning."""
    settings = isolated  # no worker consumes its queue: the test plays the worker
    wid = submit(settings)
    sid = step_ids(wid)["a"]
    assert service.claim_step(sid, 1) is not None
    closed = "redis://127.0.0.1:1/0"  # nothing listens on port 1
    with (
        use_settings(settings.model_copy(update={"redis_url": closed})),
        caplog.at_level(logging.WARNING, logger="app.workflows.events"),
    ):
        assert service.complete_step(sid, 1, {"text": "ok"})
    assert f"could not announce that workflow {wid} finished" in caplog.text
    assert service.read(wid, None).status is WorkflowStatus.succeeded


def test_cancel_flags(isolated: Settings) -> None:
    assert not events.is_cancelled("wf-x")
    events.request_cancel("wf-x")
    assert events.is_cancelled("wf-x")
    assert not events.is_cancelled("wf-y")
    client = redis.Redis.from_url(isolated.broker_url)
    try:
        ttl = client.ttl(CANCEL_KEY.format(workflow_id="wf-x"))
        assert 0 < ttl <= CANCEL_TTL_S  # a flag outlives its workflow's steps, not forever
    finally:
        client.close()


def test_a_cancel_with_redis_down_is_committed_and_answered(isolated: Settings) -> None:
    settings = isolated
    raw = {
        "name": "r",
        "steps": [{"id": "a", "kind": "generate", "model": "tiny-chat", "input": {"prompt": "hi"}}],
    }
    validated = validate_workflow(raw, load_catalog(settings.catalog_path), settings)
    wid = service.submit_validated(validated, api_key_id=None).id
    down = settings.model_copy(update={"redis_url": "redis://127.0.0.1:1/0"})
    with use_settings(down):
        summary = service.cancel(wid, None)
    assert summary.status is WorkflowStatus.cancelled
    assert service.read(wid, None).status is WorkflowStatus.cancelled
