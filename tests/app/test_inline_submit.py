"""A submit runs on the API's event loop only when nothing in it has to wait (app.inline).

On SQLite with nothing in the way it is stored and sent from the loop; when SQLite's lock
is held (by a writer that queues on Corral's gate, or by one that bypasses it) the same
submit waits in the thread pool while the loop keeps answering, and is stored once; when
Redis is gone after the commit the step stays for the reconciler. On PostgreSQL the same
submit is validated on the loop and its write awaited there, on the loop's own connections
(app.loopdb; tests/app/test_loop_database.py).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sqlite3
import threading
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from sqlalchemy import func, select

from app import rows
from app.store import db
from app.scheduler import live
from app.workflows import tokens
from app.api.routes.workflows import SUBMIT_PATHS
from app.core.config import Settings, use_settings
from app.dispatch import SENT_PREFIX, CeleryDispatcher, reconcile, sent_attempts
from app.core.embedded import EmbeddedRedis
from app.store.tables import StepStatus
from tests.utils.asgi import api, submit_while_held
from tests.utils.recording import RecordingDispatcher

SPEC: dict[str, Any] = {
    "name": "inline",
    "steps": [{"id": "a", "kind": "generate", "model": "tiny-chat", "input": {"prompt": "hi"}}],
}


def steps_of(workflow_id: str) -> list[tuple[str, StepStatus]]:
    with db.connection_scope() as conn:
        found = conn.execute(
            select(rows.STEP.c.id, rows.STEP.c.status).where(rows.STEP.c.workflow_id == workflow_id)
        ).all()
    return [(sid, StepStatus(status)) for sid, status in found]


def runs_named(name: str) -> int:
    with db.connection_scope() as conn:
        return int(
            conn.execute(
                select(func.count()).select_from(rows.WORKFLOW).where(rows.WORKFLOW.c.name == name)
            ).scalar_one()
        )


def paths_after(before: dict[str, int]) -> dict[str, int]:
    return {k: SUBMIT_PATHS[k] - before.get(k, 0) for k in ("event_loop", "thread_pool")}


async def paths_of_two_submits(client: httpx.AsyncClient) -> list[dict[str, int]]:
    """Where each of two submits in a row ran."""
    seen = []
    for _ in range(2):
        before = dict(SUBMIT_PATHS)
        assert (await client.post("/v1/workflows", json=SPEC)).status_code == 202
        seen.append(paths_after(before))
    return seen


def test_a_submit_is_stored_and_sent_from_the_event_loop(isolated: Settings, backend: str) -> None:
    """The message and its sent-marker reach Redis through the loop's asyncio client; the
    step has no live pool in this Redis database, and says so."""
    from workers.celery_app import make_celery

    celery = make_celery()
    broker = redis.Redis.from_url(isolated.broker_url)

    async def scenario() -> tuple[str, dict[str, int], str]:
        dispatcher = CeleryDispatcher(celery)
        async with api(dispatcher) as client:
            await client.post("/v1/workflows", json=SPEC)  # loads the vocabulary, the pool view
            before = dict(SUBMIT_PATHS)
            resp = await client.post("/v1/workflows", json=SPEC)
            assert resp.status_code == 202, resp.text
            metrics = (await client.get("/metrics")).text
        await dispatcher.aclose()
        return resp.json()["id"], paths_after(before), metrics

    try:
        wid, paths, metrics = asyncio.run(scenario())
        [(sid, status)] = steps_of(wid)
        assert sent_attempts(broker, [sid]) == {sid: 1}
        pushed = [json.loads(m) for m in broker.lrange("model.tiny-chat", 0, -1)]
        assert f"{sid}-1" in {m["headers"]["id"] for m in pushed}
        assert status is StepStatus.waiting_for_pool
        assert paths == {"event_loop": 1, "thread_pool": 0}
        assert f'corral_api_submits_total{{path="event_loop"}} {SUBMIT_PATHS["event_loop"]}' in (
            metrics
        )
    finally:
        broker.close()
        celery.close()


@contextmanager
def sqlite_lock_held(how: str) -> Iterator[Callable[[], None]]:
    """SQLite's write lock, held until the yielded function is called: by a Corral writer
    in another thread (through the gate), or by a connection that bypasses the gate."""
    if how == "gate":
        release, holding = threading.Event(), threading.Event()

        def corral_writer() -> None:
            with db.connection_scope(write=True):
                holding.set()
                release.wait(30)

        thread = threading.Thread(target=corral_writer)
        thread.start()
        assert holding.wait(10)
        try:
            yield release.set
        finally:
            release.set()
            thread.join(10)
        return
    path = db.get_engine().url.database
    assert path is not None
    other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")
    try:
        yield lambda: other.execute("ROLLBACK") if other.in_transaction else None
    finally:
        if other.in_transaction:
            other.execute("ROLLBACK")
        other.close()


@pytest.mark.parametrize("how", ["gate", "bypassing the gate"])
def test_a_submit_that_finds_sqlite_locked_waits_in_the_thread_pool(
    isolated: Settings, backend: str, how: str
) -> None:
    if backend != "sqlite":
        pytest.skip("SQLite's write lock")
    dispatcher = RecordingDispatcher()
    name = f"locked-{how}"

    async def scenario() -> tuple[int, dict[str, int], bool]:
        async with api(dispatcher) as client:
            await client.post("/v1/workflows", json=SPEC)  # loads the vocabulary, the pool view
            before = dict(SUBMIT_PATHS)
            with sqlite_lock_held(how) as release:
                # The loop is free: it answers while the submit waits for the lock.
                waited, resp = await submit_while_held(client, {**SPEC, "name": name}, release)
            assert resp.status_code == 202, resp.text
            return resp.status_code, paths_after(before), waited

    _code, paths, waited = asyncio.run(scenario())
    assert waited  # it did not get through while the lock was held
    assert paths == {"event_loop": 0, "thread_pool": 1}
    assert runs_named(name) == 1  # stored once, though tried on the loop first
    assert len(dispatcher.sent) == 2


def test_a_vocabulary_not_yet_loaded_is_loaded_in_the_thread_pool(
    isolated: Settings, backend: str
) -> None:
    tokens.close_vocabularies()

    async def scenario() -> list[dict[str, int]]:
        async with api(RecordingDispatcher()) as client:
            return await paths_of_two_submits(client)

    first, second = asyncio.run(scenario())
    assert first == {"event_loop": 0, "thread_pool": 1}  # loading a GGUF blocks: not on the loop
    assert second == {"event_loop": 1, "thread_pool": 0}


def test_a_live_pool_view_due_for_a_refresh_is_read_in_the_thread_pool(
    isolated: Settings, backend: str
) -> None:
    """Reading the live-pool view from Redis waits on the network: a view older than
    VIEW_MAX_AGE_S sends the whole submit to the thread pool, which reads it; the next
    submit finds it fresh and stays on the loop."""

    async def scenario() -> list[dict[str, int]]:
        async with api(RecordingDispatcher()) as client:
            await client.post("/v1/workflows", json=SPEC)  # loads the vocabulary, the pool view
            view = (isolated.broker_url, os.getpid())
            read_at, workers = live._live_cache[view]  # age the view past its limit
            live._live_cache[view] = (read_at - 2 * live.VIEW_MAX_AGE_S, workers)
            return await paths_of_two_submits(client)

    first, second = asyncio.run(scenario())
    assert first == {"event_loop": 0, "thread_pool": 1}
    assert second == {"event_loop": 1, "thread_pool": 0}


def test_a_broker_gone_after_the_commit_leaves_the_step_to_the_reconciler(
    settings: Settings, backend: str, tmp_path: Path
) -> None:
    """Redis stops between two inline submits: the second still answers 202, its step
    is committed and unsent, and the reconciler sends it once Redis is back."""
    from workers.celery_app import make_celery

    server = EmbeddedRedis(tmp_path / "redis", persist=True).start()
    celery = make_celery()
    try:
        with use_settings(settings.model_copy(update={"redis_url": server.url})) as s:

            async def scenario() -> tuple[str, dict[str, int]]:
                dispatcher = CeleryDispatcher(celery)
                async with api(dispatcher) as client:
                    await client.post("/v1/workflows", json=SPEC)  # the pool view, fresh for 1 s
                    server.stop()
                    before = dict(SUBMIT_PATHS)
                    resp = await client.post("/v1/workflows", json=SPEC)
                    assert resp.status_code == 202, resp.text
                await dispatcher.aclose()
                return resp.json()["id"], paths_after(before)

            wid, paths = asyncio.run(scenario())
            assert paths == {"event_loop": 1, "thread_pool": 0}
            [(sid, status)] = steps_of(wid)
            assert status is StepStatus.queued
            server.start()
            broker = redis.Redis.from_url(s.broker_url)
            assert broker.exists(SENT_PREFIX + sid) == 0
            resent = RecordingDispatcher()
            reconcile(resent, older_than_s=0)
            assert sid in {d.step_run_id for d in resent.sent}
            broker.close()
    finally:
        celery.close()
        server.stop()


def test_the_loop_writer_leaves_the_wal_to_a_checkpoint_thread(
    isolated: Settings, backend: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The loop's connection never checkpoints at commit (an fsync would stall the loop);
    every CHECKPOINT_EVERY of its commits a thread copies the WAL into the database file.
    Seen by opening a copy of the database file alone, without its WAL."""
    if backend != "sqlite":
        pytest.skip("SQLite's WAL")
    path = Path(str(db.get_engine().url.database))
    with closing(sqlite3.connect(path)) as conn:  # start from a checkpointed file
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    monkeypatch.setattr(db, "CHECKPOINT_EVERY", 3)
    monkeypatch.setattr(db, "_loop_commits", 0)

    def in_file_alone(name: str) -> int:
        copy = tmp_path / "alone.db"
        shutil.copyfile(path, copy)
        with closing(sqlite3.connect(copy)) as conn:
            found = conn.execute("SELECT count(*) FROM workflow_run WHERE name = ?", (name,))
            return int(found.fetchone()[0])

    async def submit(client: httpx.AsyncClient, name: str) -> None:
        before = dict(SUBMIT_PATHS)
        resp = await client.post("/v1/workflows", json={**SPEC, "name": name})
        assert resp.status_code == 202, resp.text
        assert paths_after(before)["event_loop"] == 1

    async def scenario() -> tuple[int, int]:
        async with api(RecordingDispatcher()) as client:
            await client.post("/v1/workflows", json=SPEC)  # warm: may not run inline
            monkeypatch.setattr(db, "_loop_commits", 0)
            await submit(client, "wal-1")
            await submit(client, "wal-2")
            before = in_file_alone("wal-1")  # two loop commits: still only in the WAL
            await submit(client, "wal-3")  # the third: a checkpoint thread starts
            checkpointer = db._checkpointer
            assert checkpointer is not None
            await asyncio.to_thread(checkpointer.join, 10)
            return before, in_file_alone("wal-3")

    before, after = asyncio.run(scenario())
    assert before == 0
    assert after == 1
    with db.get_engine(write=True, loop=True).connect() as conn:
        assert conn.exec_driver_sql("PRAGMA wal_autocheckpoint").scalar() == 0
