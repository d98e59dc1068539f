"""Status reads never wait for a writer: what lets the API read SQLite on its event loop."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from sqlalchemy import update

from app import rows
from app.store import db
from app.core.config import Settings
from tests.utils.asgi import CHAINED, api
from tests.utils.recording import RecordingDispatcher

SPEC = {**CHAINED, "name": "read-while-writing"}


def test_a_status_read_answers_while_a_writer_holds_the_lock(settings: Settings) -> None:
    """A writer has the database's write lock (SQLite: BEGIN IMMEDIATE) or the workflow's
    row (PostgreSQL) and an uncommitted change: the read answers at once, with what was
    committed."""
    dispatcher = RecordingDispatcher()

    async def scenario() -> tuple[dict[str, Any], dict[str, Any], float]:
        async with api(dispatcher, "reads") as client:
            resp = await client.post("/v1/workflows", json=SPEC)
            assert resp.status_code == 202, resp.text
            wid = resp.json()["id"]
            writer = db.get_engine(write=True).connect()
            tx = writer.begin()  # SQLite's write engine: BEGIN IMMEDIATE
            try:
                writer.execute(
                    update(rows.WORKFLOW)
                    .where(rows.WORKFLOW.c.id == wid)
                    .values(status="failed", error="not committed")
                )
                started = time.monotonic()
                during = await asyncio.wait_for(client.get(f"/v1/workflows/{wid}"), 20)
                waited = time.monotonic() - started
                # A long poll's first read takes the same path.
                polled = await asyncio.wait_for(
                    client.get(f"/v1/workflows/{wid}", params={"wait_s": 0.2}), 20
                )
            finally:
                tx.rollback()
                writer.close()
            assert during.status_code == 200 and polled.status_code == 200
            return during.json(), polled.json(), waited

    during, polled, waited = asyncio.run(scenario())
    for view in (during, polled):
        assert view["status"] == "running" and view["error"] is None
        assert [s["status"] for s in view["steps"]] == ["queued", "pending"]
    # Not a speed target: SQLite's busy handler would have held a blocked read for its
    # 30 s timeout; it came back while the writer still held the lock.
    assert waited < 10
    assert [d.step_run_id for d in dispatcher.sent] and len(dispatcher.sent) == 1
