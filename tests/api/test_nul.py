"""NUL (U+0000) in a path parameter, a query parameter or a JSON body: PostgreSQL's text
refuses it, so every route answers 422 naming the field, and nothing is written. The
real app over ASGI, on the session's database (SQLite and PostgreSQL) and Redis."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from sqlmodel import func, select

from app.api.main import create_app
from app.core.config import Settings
from app.store import db, keys
from app.store.tables import Silence, WorkflowRun


@pytest.fixture(scope="module")
def app() -> Iterator[FastAPI]:
    yield create_app()
    gc.unfreeze()  # the lifespan froze what was alive; hand it back to the collector


def call(app: FastAPI, key: str, method: str, url: str, content: str | None = None) -> Any:
    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
        async with httpx.AsyncClient(
            transport=transport, base_url="http://corral", headers=headers
        ) as client:
            return await client.request(method, url, content=content)

    return asyncio.run(go())


def count(table: type[Silence] | type[WorkflowRun]) -> int:
    with db.session_scope() as session:
        return int(session.exec(select(func.count()).select_from(table)).one())


@pytest.mark.parametrize(
    ("method", "url", "body", "loc"),
    [
        ("GET", "/v1/alerts?rule=%00", None, ["query", "rule"]),
        ("GET", "/v1/workflows?name=a%00b", None, ["query", "name"]),
        ("GET", "/v1/workflows/wf%00", None, ["path", "workflow_id"]),
        ("GET", "/v1/rules/%00", None, ["path", "rule_id"]),
        ("DELETE", "/v1/silences/%00x", None, ["path", "silence_id"]),
        (
            "POST",
            "/v1/silences",
            '{"rule_id": "gpu-memory-high", "duration_s": 60, "comment": "quiet\\u0000"}',
            ["body", "comment"],
        ),
        (
            "POST",
            "/v1/workflows",
            '{"name": "n\\u0000", "steps": [{"id": "a", "kind": "generate",'
            ' "model": "tiny-chat", "input": {"prompt": "hi"}}]}',
            ["body", "name"],
        ),
    ],
)
def test_nul_anywhere_a_client_writes_is_a_422_naming_the_field(
    isolated: Settings, app: FastAPI, method: str, url: str, body: str | None, loc: list[str]
) -> None:
    with db.session_scope(write=True) as session:
        _row, key = keys.create_key(session, "nul", admin=True)
    before = count(Silence), count(WorkflowRun)
    resp = call(app, key, method, url, body)
    assert resp.status_code == 422, resp.text
    [error] = resp.json()["detail"]
    assert error["loc"] == loc and error["type"] == "nul", error
    assert "U+0000" in error["msg"]
    assert (count(Silence), count(WorkflowRun)) == before


def test_an_escaped_backslash_before_u0000_is_ordinary_text(
    isolated: Settings, app: FastAPI
) -> None:
    """``\\\\u0000`` in JSON is a backslash and the letters u0000, not NUL: stored as sent."""
    with db.session_scope(write=True) as session:
        _row, key = keys.create_key(session, "nul", admin=True)
    resp = call(
        app,
        key,
        "POST",
        "/v1/silences",
        '{"rule_id": "gpu-memory-high", "duration_s": 60, "comment": "path C:\\\\u0000"}',
    )
    assert resp.status_code == 201, resp.text
    assert resp.json()["comment"] == "path C:\\u0000"
