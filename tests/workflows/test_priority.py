"""Workflow priority: a ``low`` workflow's steps wait behind every normal step of their model.

The spec's ``priority`` is validated like any field. The rest runs on a real Redis broker
that no worker consumes (``isolated``): a low step is published with Celery priority 9,
which kombu's Redis transport keeps in the queue's low list, and a kombu consumer (the
BRPOP a worker issues) fetches every normal message before any low one, whatever the
order they were sent in. Queue depth counts both lists.
"""

from __future__ import annotations

import asyncio
import gc
import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import redis
from fastapi import FastAPI
from kombu import Consumer, Exchange, Message, Queue
from sqlalchemy import update

from app.api.main import create_app
from app.core.config import Settings
from app.core.errors import SpecError
from app.governance import metrics
from app.store import db, keys
from app.store.tables import WorkflowRun
from app.workflows import dispatch, engine, routing, service
from app.workflows.names import LOW_PRIORITY, queue_for, queue_keys
from app.workflows.spec import validate_workflow
from models.catalog import load_catalog
from tests.utils.platform import Platform
from tests.utils.workflows import gen

QUEUE, LOW = queue_keys("tiny-chat")


def raw(*steps: dict[str, Any], **top: Any) -> dict[str, Any]:
    return {"name": "p", "steps": list(steps) or [gen("a")], **top}


def submit(settings: Settings, *steps: dict[str, Any], **top: Any) -> str:
    validated = validate_workflow(raw(*steps, **top), load_catalog(settings.catalog_path), settings)
    return service.submit_validated(validated, api_key_id=None).id


def step_ids(workflow_id: str) -> dict[str, str]:
    _, rows = engine.read(workflow_id, None)
    return {r.step_id: r.id for r in rows}


def waiting(client: redis.Redis, key: str) -> list[tuple[str, int | None]]:
    """(task id, priority) of each message on one Redis list, oldest first."""
    out = []
    for item in reversed(client.lrange(key, 0, -1)):  # kombu LPUSHes and RPOPs
        message = json.loads(item)
        out.append((message["headers"]["id"], message["properties"].get("priority")))
    return out


def fetch(n: int, queue: str = QUEUE) -> list[str]:
    """The task ids of the next ``n`` messages in the order a kombu consumer (the BRPOP a
    worker issues, one message in flight) receives them, each acked."""
    got: list[str] = []

    def on_message(_body: Any, message: Message) -> None:
        got.append(message.headers["id"])
        message.ack()

    with dispatch.producer().connection_for_read() as conn:
        q = Queue(queue, Exchange(queue), routing_key=queue)
        with Consumer(conn, [q], callbacks=[on_message], accept=["json"], prefetch_count=1):
            while len(got) < n:
                conn.drain_events(timeout=5)
    return got


@pytest.fixture
def client(isolated: Settings) -> Iterator[redis.Redis]:
    c = redis.Redis.from_url(isolated.broker_url)
    yield c
    c.close()


# ---- the spec -----------------------------------------------------------------------------


def test_priority_defaults_to_normal_and_accepts_low() -> None:
    catalog, settings = load_catalog(), Settings()
    normal = validate_workflow(raw(), catalog, settings)
    assert normal.spec.priority == "normal" and normal.dump()["priority"] == "normal"
    low = validate_workflow(raw(priority="low"), catalog, settings)
    assert low.spec.priority == "low" and low.dump()["priority"] == "low"


def test_an_unknown_priority_is_refused_naming_the_field() -> None:
    with pytest.raises(SpecError) as info:
        validate_workflow(raw(priority="urgent"), load_catalog(), Settings())
    [error] = [e.as_dict() for e in info.value.errors]
    assert error["loc"] == ["priority"] and error["type"] == "literal_error", error
    assert "'normal' or 'low'" in str(error["msg"])


@pytest.fixture(scope="module")
def app() -> Iterator[FastAPI]:
    yield create_app()
    gc.unfreeze()  # the lifespan froze what was alive; hand it back to the collector


def call(app: FastAPI, method: str, url: str, body: Any = None) -> httpx.Response:
    with db.session_scope(write=True) as session:
        _row, key = keys.create_key(session, "priority")

    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        headers = {"Authorization": f"Bearer {key}"}
        async with httpx.AsyncClient(
            transport=transport, base_url="http://corral", headers=headers
        ) as http:
            return await http.request(method, url, json=body)

    return asyncio.run(go())


def test_the_api_answers_422_for_an_unknown_priority_and_shows_a_low_one(
    isolated: Settings, app: FastAPI
) -> None:
    resp = call(app, "POST", "/v1/workflows", raw(priority="urgent"))
    assert resp.status_code == 422, resp.text
    [error] = resp.json()["detail"]
    assert error["loc"] == ["priority"], error

    resp = call(app, "POST", "/v1/workflows", raw(priority="low"))
    assert resp.status_code == 202, resp.text
    wid = resp.json()["id"]
    with db.session_scope() as session:
        row = session.get(WorkflowRun, wid)
        assert row is not None and row.spec["priority"] == "low"
        key_id = row.api_key_id
    assert service.read(wid, key_id).priority == "low"


# ---- the broker ---------------------------------------------------------------------------


def test_the_queue_keys_are_kombus_lists_for_priority_0_and_9(isolated: Settings) -> None:
    with dispatch.producer().connection_for_write() as conn:
        channel: Any = conn.default_channel
        assert queue_keys("tiny-chat") == [
            channel._q_for_pri(QUEUE, 0),
            channel._q_for_pri(QUEUE, LOW_PRIORITY),
        ]
    assert queue_for("tiny-chat") == QUEUE and LOW == "model.tiny-chat\x06\x169"


def test_a_low_step_waits_behind_a_normal_step_sent_after_it(
    isolated: Settings, client: redis.Redis
) -> None:
    low = step_ids(submit(isolated, priority="low"))["a"]
    normal = step_ids(submit(isolated))["a"]

    assert waiting(client, QUEUE) == [(f"{normal}-1", 0)]  # as before priorities
    assert waiting(client, LOW) == [(f"{low}-1", LOW_PRIORITY)]
    [depth] = [
        s.value
        for s in metrics.gather().samples("queue_depth")
        if s.labels == {"model": "tiny-chat"}
    ]
    assert depth == 2

    assert fetch(2) == [f"{normal}-1", f"{low}-1"]
    assert client.llen(QUEUE) == client.llen(LOW) == 0


def test_normal_steps_go_first_and_each_list_keeps_its_order(
    isolated: Settings, client: redis.Redis
) -> None:
    sent = [
        (step_ids(submit(isolated, priority=p))["a"], p) for p in ("low", "normal", "low", "normal")
    ]
    normal = [f"{sid}-1" for sid, p in sent if p == "normal"]
    low = [f"{sid}-1" for sid, p in sent if p == "low"]
    assert fetch(4) == [*normal, *low]


def test_a_low_workflows_later_steps_and_retries_stay_low(
    isolated: Settings, client: redis.Redis
) -> None:
    retry = {"max_attempts": 2, "backoff_s": 0, "max_backoff_s": 0}
    wid = submit(isolated, gen("a", retry=retry), gen("b", depends_on=["a"]), priority="low")
    ids = step_ids(wid)
    engine.forget_specs()  # from here the priority comes from the stored spec
    assert service.claim_step(ids["a"], 1) is not None
    service.fail_step(ids["a"], 1, "boom", retryable=True)
    assert service.claim_step(ids["a"], 2) is not None
    assert service.complete_step(ids["a"], 2, {"text": "x"})

    assert waiting(client, QUEUE) == []
    a, b = ids["a"], ids["b"]
    assert [m for m, _ in waiting(client, LOW)] == [f"{a}-1", f"{a}-2", f"{b}-1"]
    engine.forget_specs()
    assert service.read(wid, None).priority == "low"


def test_the_reconciler_sends_a_low_step_again_as_low(
    isolated: Settings, client: redis.Redis
) -> None:
    validated = validate_workflow(raw(priority="low"), load_catalog(), isolated)
    (d,) = engine.create(validated).dispatches  # committed; the send never happened
    assert d.priority == LOW_PRIORITY
    engine.forget_specs()
    [found] = [u for u in dispatch.undispatched(older_than_s=0) if u.step_run_id == d.step_run_id]
    assert found == d

    assert dispatch.reconcile(older_than_s=0) >= 1
    assert f"{d.step_run_id}-1" in dict(waiting(client, LOW))
    assert f"{d.step_run_id}-1" not in dict(waiting(client, QUEUE))


def test_a_spec_stored_before_priorities_is_normal(isolated: Settings, client: redis.Redis) -> None:
    validated = validate_workflow(raw(), load_catalog(), isolated)
    outcome = engine.create(validated)
    stored = {k: v for k, v in validated.dump().items() if k != "priority"}
    with db.session_scope(write=True) as session:
        session.exec(
            update(WorkflowRun)
            .where(WorkflowRun.id == outcome.workflow_id)  # type: ignore[arg-type]
            .values(spec=stored)
        )
    engine.forget_specs()
    assert service.read(outcome.workflow_id, None).priority == "normal"
    sid = outcome.dispatches[0].step_run_id
    [found] = [u for u in dispatch.undispatched(older_than_s=0) if u.step_run_id == sid]
    assert found.priority == 0
    dispatch.reconcile(older_than_s=0)
    assert f"{sid}-1" in dict(waiting(client, QUEUE))


def test_a_routed_low_step_stays_low_on_the_fallbacks_queue(
    isolated: Settings, client: redis.Redis
) -> None:
    routing.set_route("tiny-chat", "tiny-chat-b")
    try:
        sid = step_ids(submit(isolated, priority="low"))["a"]
    finally:
        routing.clear_route("tiny-chat")
    fallback, fallback_low = queue_keys("tiny-chat-b")
    assert waiting(client, fallback) == []
    assert waiting(client, fallback_low) == [(f"{sid}-1", LOW_PRIORITY)]
    assert fetch(1, fallback) == [f"{sid}-1"]


@pytest.mark.e2e
def test_real_workers_take_low_steps_from_the_low_list(platform: Platform) -> None:
    """`corral worker` processes (Celery's own consumer) run a low workflow's steps."""
    spec = raw(gen("a"), gen("b", depends_on=["a"]), priority="low")
    run = platform.run(spec)
    assert run["status"] == "succeeded", run
    assert run["priority"] == "low"
    assert [s["status"] for s in run["steps"]] == ["succeeded", "succeeded"]
