"""A finish notice that carries the workflow's view, for a waiting request to answer with
no read of its own (PostgreSQL; SQLite's notices say "read").

The engine reads the view in the script that commits the end (a result, as seen or
locked, or a cancel) and the notice brings it to the API's listener; a waiting ``GET
…?wait_s=`` or ``POST …?wait_s=`` answers with it. A view too large, a notice without
one, or another key's workflow: the request reads the database as before. Real Redis,
real databases, the API over ASGI.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from app import claims, engine, notify
from app.api.routes import workflows as routes
from app.api.routes.workflows import _fresh_view
from app.core.config import Settings
from app.workflows.schemas import WorkflowPublic
from tests.app.test_engine import create, gen, steps_of
from tests.utils.asgi import api
from tests.utils.recording import RecordingDispatcher


def _on_server(settings: Settings) -> bool:
    return settings.sqlalchemy_url.startswith("postgresql")


def _finish(step_run_id: str, *, as_seen: bool) -> None:
    """A worker's result for the step's first attempt (with what its claim saw, or not)."""
    work = claims.open_step(step_run_id, 1)
    assert work is not None
    seen = work.seen if as_seen else None
    assert engine.complete_step(step_run_id, 1, {"text": "done"}, RecordingDispatcher(), seen=seen)


def test_a_notice_brings_its_view_to_the_waiters_of_that_workflow(settings: Settings) -> None:
    async def scenario() -> list[Any]:
        listener = notify.FinishedListener()
        found: list[Any] = []
        try:
            async with listener.watch("warm-up"):
                pass  # the subscription is live once this returns
            async with listener.watch("wf-view") as event:
                carried = notify.Carried(7, '{"id": "wf-view"}')
                await asyncio.to_thread(notify.publish_finished, "wf-view", carried)
                found += [await listener.wait(event, 10), listener.carried("wf-view")]
            found.append(listener.carried("wf-view"))  # gone with its last waiter
            async with listener.watch("wf-big") as event:
                big = notify.Carried(None, "x" * (notify.CARRY_MAX + 1))
                await asyncio.to_thread(notify.publish_finished, "wf-big", big)
                found += [await listener.wait(event, 10), listener.carried("wf-big")]
            async with listener.watch("wf-plain") as event:
                await asyncio.to_thread(notify.publish_finished, "wf-plain")
                found += [await listener.wait(event, 10), listener.carried("wf-plain")]
        finally:
            await listener.close()
        return found

    found = asyncio.run(scenario())
    assert found == [True, notify.Carried(7, '{"id": "wf-view"}'), None, True, None, True, None]


def test_a_malformed_notice_only_wakes() -> None:
    assert notify.Carried.parse("wf") == ("wf", None)
    assert notify.Carried.parse("wf x {}") == ("wf", None)
    assert notify.Carried.parse("wf - {}") == ("wf", notify.Carried(None, "{}"))
    assert notify.Carried.parse("wf 12 {} {}") == ("wf", notify.Carried(12, "{} {}"))


@pytest.mark.parametrize("how", ["result as seen", "result locked", "cancel"])
def test_the_notice_carries_the_view_as_committed(settings: Settings, how: str) -> None:
    dispatcher = RecordingDispatcher()
    wid = create(settings, dispatcher, [gen("a")])
    step = steps_of(wid)["a"].id

    async def scenario() -> notify.Carried | None:
        listener = notify.FinishedListener()
        try:
            async with listener.watch("warm-up"):
                pass
            async with listener.watch(wid) as event:
                if how == "cancel":
                    await asyncio.to_thread(engine.cancel_workflow, wid)
                else:
                    await asyncio.to_thread(_finish, step, as_seen=how == "result as seen")
                assert await listener.wait(event, 10)
                return listener.carried(wid)
        finally:
            await listener.close()

    carried = asyncio.run(scenario())
    if not _on_server(settings):
        assert carried is None  # SQLite: the API's read is a call in its own process
        return
    assert carried is not None and carried.api_key_id is None
    view = WorkflowPublic.model_validate_json(carried.view)
    assert view == _fresh_view(None, wid)
    assert view.status.value == ("cancelled" if how == "cancel" else "succeeded")


def test_a_waiting_request_answers_from_the_notice(
    isolated: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A long poll and a submit that waits, each woken by the end of its workflow: on
    PostgreSQL neither reads the database after the notice; the answer is the same."""
    reads: list[str] = []
    real_view = routes._view

    async def counted(key_id: int | None, workflow_id: str) -> WorkflowPublic:
        reads.append(workflow_id)
        return await real_view(key_id, workflow_id)

    monkeypatch.setattr(routes, "_view", counted)
    dispatcher = RecordingDispatcher()
    spec = {"name": "carried", "steps": [gen("a")]}

    async def scenario() -> list[tuple[int, dict[str, Any], dict[str, Any], int]]:
        out = []
        async with api(dispatcher, "carried") as client:
            resp = await client.post("/v1/workflows", json=spec)
            wid = resp.json()["id"]
            # A first wait starts the app's subscription (which wakes its waiters to read
            # once more: anything missed before it was live).
            warm = await client.get(f"/v1/workflows/{wid}", params={"wait_s": 0.2})
            assert warm.json()["status"] == "running"
            # A long poll: one read before it waits, none after the notice.
            reads.clear()
            poll = asyncio.create_task(client.get(f"/v1/workflows/{wid}", params={"wait_s": 10}))
            await asyncio.sleep(0.3)
            await asyncio.to_thread(_finish, dispatcher.sent[-1].step_run_id, as_seen=True)
            polled = await asyncio.wait_for(poll, 20)
            count = len(reads) - 1
            fresh = (await client.get(f"/v1/workflows/{wid}")).json()
            out.append((polled.status_code, polled.json(), fresh, count))
            # A submit that waits: no read at all when the notice carries the view.
            reads.clear()
            sent = len(dispatcher.sent)
            submit = asyncio.create_task(
                client.post("/v1/workflows", json=spec, params={"wait_s": 10})
            )
            while len(dispatcher.sent) == sent:
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.1)
            await asyncio.to_thread(_finish, dispatcher.sent[-1].step_run_id, as_seen=True)
            waited = await asyncio.wait_for(submit, 20)
            count = len(reads)
            wid = waited.json()["id"]
            fresh = (await client.get(f"/v1/workflows/{wid}")).json()
            out.append((waited.status_code, waited.json(), fresh, count))
        return out

    for status, answer, fresh, reads_after_wait in asyncio.run(scenario()):
        assert status == 200 and answer["status"] == "succeeded"
        assert answer == fresh
        # SQLite's notices carry nothing: the request reads once more.
        assert reads_after_wait == (0 if _on_server(isolated) else 1)
