"""The API app in this process, driven over ASGI by an httpx client (no server, no port)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import httpx

from app import loopdb
from app.store import db
from app.store import keys
from app.api.main import create_app


@asynccontextmanager
async def api(dispatcher: Any, name: str = "asgi") -> AsyncIterator[httpx.AsyncClient]:
    """A client of ``create_app(dispatcher)`` holding a new API key named ``name``.

    ASGITransport runs no lifespan, so what the app's shutdown would close, the running
    loop's PostgreSQL connections (:mod:`app.loopdb`), is closed here."""
    with db.session_scope(write=True) as session:
        _row, key = keys.create_key(session, name)
    transport = httpx.ASGITransport(app=create_app(dispatcher))
    headers = {"Authorization": f"Bearer {key}"}
    try:
        async with httpx.AsyncClient(
            transport=transport, base_url="http://corral", headers=headers
        ) as client:
            yield client
    finally:
        await loopdb.close_loop()


async def submit_while_held(
    client: httpx.AsyncClient, spec: dict[str, Any], release: Callable[[], object]
) -> tuple[bool, httpx.Response]:
    """Submit ``spec`` while something holds its write back; check that the loop answers
    ``/healthz`` meanwhile; then ``release`` it. Whether the submit was still waiting when
    released, and its answer."""
    submit = asyncio.create_task(client.post("/v1/workflows", json=spec))
    await asyncio.sleep(0.3)
    health = await asyncio.wait_for(client.get("/healthz"), 5)
    assert health.status_code == 200
    waited = not submit.done()
    release()
    return waited, await asyncio.wait_for(submit, 30)


# Two steps, the second reading the first's output.
CHAINED: dict[str, Any] = {
    "name": "chained",
    "steps": [
        {"id": "a", "kind": "generate", "model": "tiny-chat", "input": {"prompt": "hi"}},
        {
            "id": "b",
            "kind": "generate",
            "model": "tiny-chat",
            "input": {"prompt": "{{ steps.a.output.text }}"},
            "depends_on": ["a"],
        },
    ],
}
