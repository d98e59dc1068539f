"""The API app in this process, driven over ASGI by an httpx client (no server, no port)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx

from app import db, keys, loopdb
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
