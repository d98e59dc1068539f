"""The API app in this process, driven over ASGI by an httpx client (no server, no port)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx

from app.api.main import create_app
from app.store import db, keys


@asynccontextmanager
async def api(name: str = "asgi", *, admin: bool = False) -> AsyncIterator[httpx.AsyncClient]:
    """A client of the API app holding a new API key named ``name`` (an admin key with
    ``admin``)."""
    with db.session_scope(write=True) as session:
        _row, key = keys.create_key(session, name, admin=admin)
    app = create_app()
    transport = httpx.ASGITransport(app=app)
    headers = {"Authorization": f"Bearer {key}"}
    try:
        async with httpx.AsyncClient(
            transport=transport, base_url="http://corral", headers=headers
        ) as client:
            yield client
    finally:
        await app.state.finished.close()
