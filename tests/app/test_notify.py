"""Workflow-finished notifications on a real Redis: a publish wakes exactly its waiters."""

from __future__ import annotations

import asyncio

from app import notify
from app.core.config import Settings


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
    from app.spec import validate_workflow
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
