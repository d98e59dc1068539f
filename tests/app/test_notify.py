"""Workflow-finished notifications on a real Redis: a publish wakes exactly its waiters."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
import redis

from app import notify
from app.core.config import Settings, use_settings
from app.core.embedded import EmbeddedRedis


def test_a_publish_wakes_the_waiters_of_that_workflow_only(settings: Settings) -> None:
    async def scenario() -> tuple[bool, bool, bool]:
        listener = notify.FinishedListener()
        try:
            async with listener.watch("warm-up"):
                pass  # the subscription is live once this returns
            async with listener.watch("wf-1") as mine, listener.watch("wf-2") as other:
                before = mine.is_set()
                await asyncio.to_thread(notify.publish_finished, "wf-1")
                woken = await listener.wait(mine, 10)
                return before, woken, other.is_set()
        finally:
            await listener.close()

    before, woken, other = asyncio.run(scenario())
    assert not before
    assert woken
    assert not other


def test_the_engine_publishes_when_a_workflow_ends(settings: Settings) -> None:
    """cancel_workflow commits a terminal state, then announces it."""
    from app import engine
    from app.workflows.spec import validate_workflow
    from models.catalog import load_catalog
    from tests.utils.recording import RecordingDispatcher

    spec = {
        "name": "notify",
        "steps": [
            {
                "id": "a",
                "kind": "generate",
                "model": "tiny-chat",
                "input": {"prompt": "Hi", "max_tokens": 2},
            }
        ],
    }
    validated = validate_workflow(spec, load_catalog(settings.catalog_path), settings, None)
    run = engine.create_workflow(validated, RecordingDispatcher())

    async def scenario() -> bool:
        listener = notify.FinishedListener()
        try:
            async with listener.watch("warm-up"):
                pass  # live subscription first: a (re)subscription also wakes waiters
            async with listener.watch(run.id) as event:
                assert not event.is_set()
                await asyncio.to_thread(engine.cancel_workflow, run.id)
                return await listener.wait(event, 10)
        finally:
            await listener.close()

    assert asyncio.run(scenario())


def _next_message(pubsub: redis.client.PubSub, timeout_s: float = 5.0) -> bytes | None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        message = pubsub.get_message(ignore_subscribe_messages=True, timeout=0.2)
        if message is not None:
            data: bytes = message["data"]
            return data
    return None


def test_the_announcer_sends_without_answers_and_survives_a_redis_restart(
    tmp_path: Path,
) -> None:
    """Notices reach a subscriber; Redis answers nothing on the announcer's connection (had
    it answered, the answers would wait unread on the socket); after Redis restarts, the
    first notice goes out on a new connection."""
    server = EmbeddedRedis(tmp_path / "redis").start()
    client = redis.Redis.from_url(server.url)
    announcer = notify.Announcer(redis.Redis.from_url(server.url, socket_timeout=5))
    try:
        pubsub = client.pubsub()
        pubsub.subscribe(notify.CHANNEL)
        assert pubsub.get_message(timeout=5)["type"] == "subscribe"
        for i in range(50):
            announcer.publish(notify.CHANNEL, f"wf-{i}")
        assert [_next_message(pubsub) for _ in range(50)] == [f"wf-{i}".encode() for i in range(50)]
        conn = announcer._conn
        assert conn is not None
        assert not conn.can_read(timeout=0.2)  # no answer, to any of the 51 commands
        publishers = [c for c in client.client_list() if c["cmd"] == "publish"]
        assert len(publishers) == 1

        server.stop()
        server.start()  # same port, a new process: the old connection is closed
        pubsub = client.pubsub()
        pubsub.subscribe(notify.CHANNEL)
        assert pubsub.get_message(timeout=5)["type"] == "subscribe"
        announcer.publish(notify.CHANNEL, "after-restart")
        assert _next_message(pubsub) == b"after-restart"
        assert announcer._conn is not conn
    finally:
        announcer.close()
        client.close()
        server.stop()


def test_a_notice_with_redis_down_is_only_a_warning(
    settings: Settings, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    server = EmbeddedRedis(tmp_path / "redis").start()
    server.stop()  # nothing listens on its port now
    with (
        use_settings(settings.model_copy(update={"redis_url": server.url})),
        caplog.at_level("WARNING", logger="app.notify"),
    ):
        notify.publish_finished("wf-down")  # returns: a lost notice costs a re-read
    assert "could not announce that workflow wf-down finished" in caplog.text
