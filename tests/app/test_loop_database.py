"""PostgreSQL submits and status reads awaited on the API's event loop (app/loopdb.py).

On PostgreSQL the API writes a submit and reads a workflow's state over asyncio
connections of its own instead of in the thread pool: the same rows and views as the
thread pool's path (``CORRAL_DATABASE_LOOP=false``); the loop keeps answering while the
server makes a submit wait; statements are prepared once per connection; a connection
lost on the server is a 503 that writes nothing, and the next request reconnects; after
an error or a cancelled query the connection is closed, not reused.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import psycopg
import pytest
from sqlalchemy import func, select, text
from sqlalchemy.exc import IntegrityError

from app import loopdb, prepared, rows
from app.store import db
from app.api.routes.workflows import SUBMIT_PATHS
from app.core.config import Settings, get_settings, use_settings
from app.store.tables import new_id
from tests.utils.asgi import CHAINED, api, submit_while_held
from tests.utils.engine_rows import run_row
from tests.utils.recording import RecordingDispatcher

SPEC: dict[str, Any] = {**CHAINED, "name": "on-the-loop"}
# What differs between two submits of the same spec: ids, times, the key.
_VOLATILE = {"id", "workflow_id", "api_key_id", "created_at", "updated_at", "queued_at"}


@pytest.fixture
def pg(isolated: Settings) -> Settings:
    if not isolated.sqlalchemy_url.startswith("postgresql"):
        pytest.skip("the loop's connections are to a PostgreSQL server")
    return isolated


def _paths(before: dict[str, int]) -> dict[str, int]:
    return {k: SUBMIT_PATHS[k] - before.get(k, 0) for k in ("event_loop", "thread_pool")}


def _stored(workflow_id: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    with db.connection_scope() as conn:
        run = conn.execute(select(rows.WORKFLOW).where(rows.WORKFLOW.c.id == workflow_id)).one()
        steps = conn.execute(
            select(rows.STEP)
            .where(rows.STEP.c.workflow_id == workflow_id)
            .order_by(rows.STEP.c.position)
        ).all()
    return dict(run._mapping), [dict(s._mapping) for s in steps]


def _stable(row: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in row.items() if k not in _VOLATILE}


def _runs_named(name: str) -> int:
    with db.connection_scope() as conn:
        query = select(func.count()).select_from(rows.WORKFLOW).where(rows.WORKFLOW.c.name == name)
        return int(conn.execute(query).scalar_one())


def _submit_and_read(loop: bool) -> tuple[str, dict[str, int], dict[str, Any], int]:
    """A submit and a read with the loop's connections on or off: the workflow's id, where
    the submit ran, the view read back, and the connections the loop made."""
    dispatcher = RecordingDispatcher()
    with use_settings(get_settings().model_copy(update={"database_loop": loop})):

        async def scenario() -> tuple[str, dict[str, int], dict[str, Any], int]:
            async with api(dispatcher) as client:
                await client.post("/v1/workflows", json=SPEC)  # the vocabulary, the pool view
                before = dict(SUBMIT_PATHS)
                resp = await client.post("/v1/workflows", json=SPEC)
                assert resp.status_code == 202, resp.text
                paths = _paths(before)
                wid = resp.json()["id"]
                view = await client.get(f"/v1/workflows/{wid}")
                assert view.status_code == 200, view.text
                loop_db = loopdb.for_loop()
                return wid, paths, view.json(), loop_db.connects if loop_db else 0

        found = asyncio.run(scenario())
    assert [d.step_run_id for d in dispatcher.sent[-1:]] == [
        s["id"] for s in _stored(found[0])[1][:1]
    ]  # the ready step was sent, after its commit
    return found


def test_a_submit_and_a_read_on_the_loop_store_and_show_what_the_thread_pool_does(
    pg: Settings,
) -> None:
    on_id, on_paths, on_view, on_connects = _submit_and_read(loop=True)
    off_id, off_paths, off_view, off_connects = _submit_and_read(loop=False)
    assert on_paths == {"event_loop": 1, "thread_pool": 0}
    assert off_paths == {"event_loop": 0, "thread_pool": 1}
    assert (on_connects, off_connects) == (1, 0)  # one connection served the loop's 3 calls
    on_run, on_steps = _stored(on_id)
    off_run, off_steps = _stored(off_id)
    assert _stable(on_run) == _stable(off_run)
    assert [_stable(s) for s in on_steps] == [_stable(s) for s in off_steps]
    assert [s["status"] for s in on_steps] == ["queued", "pending"]

    def shown(view: dict[str, Any]) -> dict[str, Any]:
        steps = [{k: v for k, v in s.items() if not k.endswith("_at")} for s in view["steps"]]
        return {**_stable(view), "steps": [{**s, "id": None} for s in steps]}

    assert on_view["id"] == on_id and off_view["id"] == off_id
    assert shown(on_view) == shown(off_view)


def test_the_loop_answers_while_the_server_makes_a_submit_wait(pg: Settings) -> None:
    """Another session holds the workflow table locked: the submit's write waits on the
    server, and meanwhile the same loop answers a health check; once the lock goes, the
    submit is stored, once, from the loop."""
    dispatcher = RecordingDispatcher()
    name = f"waited-{new_id()}"

    async def scenario() -> tuple[bool, int, dict[str, int]]:
        async with api(dispatcher) as client:
            await client.post("/v1/workflows", json=SPEC)  # the vocabulary, the pool view
            before = dict(SUBMIT_PATHS)
            with psycopg.connect(pg.database_url or "", autocommit=False) as locker:
                locker.execute("LOCK TABLE workflow_run IN ACCESS EXCLUSIVE MODE")
                waited, resp = await submit_while_held(
                    client, {**SPEC, "name": name}, locker.rollback
                )
            return waited, resp.status_code, _paths(before)

    waited, status, paths = asyncio.run(scenario())
    assert waited and status == 202
    assert paths == {"event_loop": 1, "thread_pool": 0}
    assert _runs_named(name) == 1


def test_statements_are_prepared_once_per_loop_connection(pg: Settings) -> None:
    async def scenario() -> tuple[int, dict[str, int]]:
        async with api(RecordingDispatcher()) as client:
            for _ in range(3):
                wid = (await client.post("/v1/workflows", json=SPEC)).json()["id"]
                assert (await client.get(f"/v1/workflows/{wid}")).status_code == 200
            loop_db = loopdb.for_loop()
            assert loop_db is not None
            [slot] = list(loop_db._idle)
            cursor = await slot.conn.execute(
                "SELECT name, generic_plans + custom_plans FROM pg_prepared_statements"
            )
            return loop_db.connects, dict(await cursor.fetchall())

    connects, on_session = asyncio.run(scenario())
    assert connects == 1
    dialect = db.get_engine().dialect
    view = prepared.prepare(rows.VIEW, dialect).server
    assert view is not None
    assert on_session[view[0]] == 3  # prepared by the first read, run by name since


@pytest.mark.parametrize("idle", [False, True], ids=["used just now", "idle past the window"])
def test_a_connection_the_server_dropped_is_replaced(pg: Settings, idle: bool) -> None:
    """The server ends the loop's connection. Used again within PING_AFTER_IDLE_S it is
    not pinged: the submit fails as a 503 that stored nothing, and the next one
    reconnects. Idle past the window, the ping finds it gone and the submit reconnects."""
    name = f"dropped-{new_id()}"

    async def scenario() -> tuple[list[int], str, int]:
        async with api(RecordingDispatcher()) as client:
            await client.post("/v1/workflows", json=SPEC)
            loop_db = loopdb.for_loop()
            assert loop_db is not None and loop_db.connects == 1
            [slot] = list(loop_db._idle)
            with psycopg.connect(pg.database_url or "", autocommit=True) as admin:
                admin.execute("SELECT pg_terminate_backend(%s)", [slot.conn.info.backend_pid])
            if idle:
                slot.used_at -= 2 * db.PING_AFTER_IDLE_S
            codes, detail = [], ""
            for _ in range(2):
                resp = await client.post("/v1/workflows", json={**SPEC, "name": name})
                codes.append(resp.status_code)
                if resp.status_code != 202:
                    detail = resp.text
            return codes, detail, loop_db.connects

    codes, detail, connects = asyncio.run(scenario())
    if idle:
        assert codes == [202, 202] and _runs_named(name) == 2
    else:
        assert codes == [503, 202], detail
        assert "the database is unavailable" in detail
        assert _runs_named(name) == 1  # the failed submit stored nothing
    assert connects == 2


def test_an_error_or_a_cancelled_query_costs_its_connection(pg: Settings) -> None:
    """After a failed script (a duplicate key, raised as SQLAlchemy's IntegrityError) or
    a query whose request was cancelled, the connection is closed, not handed out again;
    the next script gets a new one and works."""
    wid = new_id()
    insert = rows.inserts(run_row(wid), [])

    async def scenario() -> list[int]:
        loop_db = loopdb.LoopDatabase(db.get_engine())
        try:
            await loop_db.script(insert)
            seen = [loop_db.connects]
            with pytest.raises(IntegrityError):
                await loop_db.script(insert)
            assert not loop_db._idle and not loop_db._open
            (found,) = await loop_db.script([(rows.VIEW, {"workflow_id": wid})])
            assert found and found[0].id == wid
            seen.append(loop_db.connects)
            sleeper = asyncio.create_task(loop_db.script([(text("SELECT pg_sleep(5)"), {})]))
            await asyncio.sleep(0.3)
            sleeper.cancel()
            started = time.monotonic()
            with pytest.raises(asyncio.CancelledError):
                await sleeper
            assert time.monotonic() - started < 4  # not held until the sleep ended
            assert not loop_db._idle and not loop_db._open
            (found,) = await loop_db.script([(rows.VIEW, {"workflow_id": wid})])
            assert found[0].id == wid
            seen.append(loop_db.connects)
            return seen
        finally:
            await loop_db.aclose()

    assert asyncio.run(scenario()) == [1, 2, 3]


def test_sqlite_and_the_setting_off_have_no_loop_connections(settings: Settings) -> None:
    async def found(loop: bool) -> loopdb.LoopDatabase | None:
        with use_settings(settings.model_copy(update={"database_loop": loop})):
            return loopdb.for_loop()

    on, off = asyncio.run(found(True)), asyncio.run(found(False))
    assert off is None
    if settings.sqlalchemy_url.startswith("sqlite"):
        assert on is None  # reads and inline writes there are calls in this process
    else:
        assert isinstance(on, loopdb.LoopDatabase) and on.connects == 0  # none made yet
