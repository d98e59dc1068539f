"""With Redis unreachable, memory routes answer 503 (not 500) and change nothing."""

from __future__ import annotations

import asyncio

import httpx

from app.api.main import create_app
from app.core.config import Settings, use_settings
from app.core.embedded import free_port
from app.store import db, keys


def test_memory_routes_answer_503_without_redis(settings: Settings) -> None:
    with db.session_scope(write=True) as session:
        _row, key = keys.create_key(session, "redis-down")
    dead = settings.model_copy(update={"redis_url": f"redis://127.0.0.1:{free_port()}/0"})

    async def calls() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=create_app())
        headers = {"Authorization": f"Bearer {key}"}
        async with httpx.AsyncClient(
            transport=transport, base_url="http://corral", headers=headers
        ) as client:
            return [
                await client.post("/v1/conversations", json={"user_id": "u"}),
                await client.get("/v1/memory/u/blocks"),
            ]

    with use_settings(dead):
        for resp in asyncio.run(calls()):
            assert resp.status_code == 503, resp.text
            assert "Redis is unavailable" in resp.json()["detail"]
