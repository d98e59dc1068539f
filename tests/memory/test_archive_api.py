"""Archival memory over HTTP: the archive routes (paging, one entry, delete, 404 and 422,
tenant isolation) and search ``scope`` through the real platform."""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import httpx
import pytest

from app.api.main import create_app
from app.core.config import Settings, use_settings
from app.memory.archive import KINDS
from app.memory.keys import tenant_of
from app.memory.service import Memory
from app.store import db, keys
from tests.memory.conftest import Embed
from tests.memory.test_archive import entry, phrase, remember
from tests.utils.platform import Platform

T = TypeVar("T")


# --- routes -----------------------------------------------------------------------------


def new_key(name: str) -> tuple[str, str]:
    """A new API key: its tenant and its plaintext."""
    with db.session_scope(write=True) as session:
        row, key = keys.create_key(session, name)
        return tenant_of(row.id), key


def through_api(settings: Settings, calls: Callable[..., Awaitable[T]], *keys_: str) -> T:
    """``calls(*clients)``: clients of the app in this process, one per API key."""

    async def main() -> T:
        app = create_app()
        transport = httpx.ASGITransport(app=app)
        clients = [
            httpx.AsyncClient(
                transport=transport,
                base_url="http://corral",
                headers={"Authorization": f"Bearer {key}"},
            )
            for key in keys_
        ]
        try:
            return await calls(*clients)
        finally:
            for client in clients:
                await client.aclose()
            await app.state.finished.close()

    with use_settings(settings):
        return asyncio.run(main())


def test_archive_routes(settings: Settings, mem: Memory) -> None:
    (tenant, key), (_, other_key) = new_key("archive-a"), new_key("archive-b")
    user = "ada@example.org"
    new = [entry(f"note {i}", KINDS[i % 4]) for i in range(7)]
    mem.archive.add(tenant, user, new)
    newest_first = [e.id for e in reversed(new)]
    one = newest_first[0]
    base = f"/v1/memory/{user}/archive"

    async def calls(mine: httpx.AsyncClient, theirs: httpx.AsyncClient) -> dict[str, Any]:
        out: dict[str, Any] = {"pages": []}
        cursor = None
        while True:
            params: dict[str, Any] = {"limit": 3} | ({"cursor": cursor} if cursor else {})
            resp = await mine.get(base, params=params)
            assert resp.status_code == 200, resp.text
            out["pages"].append(resp.json())
            cursor = resp.json()["next_cursor"]
            if cursor is None:
                break
        out["events"] = await mine.get(base, params={"kind": "event"})
        out["get"] = await mine.get(f"{base}/{one}")
        out["theirs_list"] = await theirs.get(base)
        out["theirs_get"] = await theirs.get(f"{base}/{one}")
        out["theirs_delete"] = await theirs.delete(f"{base}/{one}")
        out["delete"] = await mine.delete(f"{base}/{one}")
        out["again"] = await mine.delete(f"{base}/{one}")
        out["gone"] = await mine.get(f"{base}/{one}")
        out["unknown"] = await mine.get(f"{base}/{uuid.uuid4().hex}")
        out["bad_id"] = await mine.get(f"{base}/not-an-id")
        out["bad_delete_id"] = await mine.delete(f"{base}/{'A' * 32}")
        out["bad_cursor"] = await mine.get(base, params={"cursor": "soon"})
        out["nan_cursor"] = await mine.get(base, params={"cursor": "nan"})
        out["bad_kind"] = await mine.get(base, params={"kind": "rumour"})
        out["bad_limit"] = await mine.get(base, params={"limit": 10_000})
        out["bad_user"] = await mine.get("/v1/memory/no spaces/archive")
        out["after"] = (await mine.get(base)).json()
        return out

    out = through_api(settings, calls, key, other_key)
    listed = [e["id"] for page in out["pages"] for e in page["items"]]
    assert listed == newest_first and [len(p["items"]) for p in out["pages"]] == [3, 3, 1]
    events = out["events"].json()["items"]
    assert [e["kind"] for e in events] == ["event"] * 2
    got = out["get"].json()
    assert got["id"] == one and got["text"] == "note 6" and got["user_id"] == user
    source = {"conversation_id": "c" * 32, "from_seq": 1, "to_seq": 2, "run_id": None}
    assert got["source"] == source
    # Another key sees nothing and deletes nothing.
    assert out["theirs_list"].json() == {"items": [], "next_cursor": None}
    assert out["theirs_get"].status_code == 404 and out["theirs_delete"].status_code == 404
    assert out["delete"].status_code == 204
    assert out["again"].status_code == 404 and out["gone"].status_code == 404
    assert out["unknown"].status_code == 404
    assert "has no archival entry" in out["unknown"].json()["detail"]
    for name, loc in [
        ("bad_id", ["path", "entry_id"]),
        ("bad_delete_id", ["path", "entry_id"]),
        ("bad_cursor", ["query", "cursor"]),
        ("nan_cursor", ["query", "cursor"]),
        ("bad_kind", ["query", "kind"]),
        ("bad_limit", ["query", "limit"]),
        ("bad_user", ["path", "user_id"]),
    ]:
        resp = out[name]
        assert resp.status_code == 422, (name, resp.text)
        assert resp.json()["detail"][0]["loc"] == loc, (name, resp.text)
    assert [e["id"] for e in out["after"]["items"]] == newest_first[1:]
    assert mem.archive.count(tenant, user) == 6


# --- search over HTTP, the query embedded by the platform's tiny-embed pool ------------------


@pytest.mark.e2e
def test_search_scope_over_http(platform: Platform, mem: Memory, embed: Embed) -> None:
    tenant, key = new_key("archive-search")
    user = "scope-user"
    rng = random.Random(41)
    said = [phrase(rng) for _ in range(6)]
    learnt = [phrase(rng) for _ in range(6)]
    with httpx.Client(
        base_url=platform.url, headers={"Authorization": f"Bearer {key}"}, timeout=30
    ) as c:
        cid = c.post("/v1/conversations", json={"user_id": user}).json()["id"]
        for text in said:
            assert c.post(f"/v1/conversations/{cid}/messages", json={"content": text}).is_success
        deadline = time.monotonic() + 90
        while c.get(f"/v1/conversations/{cid}").json()["embedded_count"] < len(said):
            assert time.monotonic() < deadline, "not embedded in time"
            time.sleep(0.1)
        stored = remember(mem, tenant, user, learnt, embed, cid=cid)

        def search(**body: Any) -> list[dict[str, Any]]:
            resp = c.post(f"/v1/memory/{user}/search", json={"query": learnt[3], **body})
            assert resp.status_code == 200, resp.text
            out: list[dict[str, Any]] = resp.json()
            return out

        default = search(k=4)
        assert [h["source"] for h in default] == ["message"] * 4
        assert all(h["message"] and h["entry"] is None for h in default)
        archive = search(k=4, scope="archive")
        assert [h["source"] for h in archive] == ["archive"] * 4
        assert archive[0]["entry"]["id"] == stored[3].id and archive[0]["message"] is None
        assert archive[0]["score"] == pytest.approx(1.0, abs=1e-3)
        both = search(k=8, scope="all")
        assert len(both) == 8 and {h["source"] for h in both} == {"message", "archive"}
        assert [h["score"] for h in both] == sorted((h["score"] for h in both), reverse=True)
        assert both[0]["entry"]["id"] == stored[3].id
        merged = sorted(default + search(k=8, scope="archive"), key=lambda h: -h["score"])
        assert [h["score"] for h in both[:4]] == pytest.approx([h["score"] for h in merged[:4]])
        bad = c.post(f"/v1/memory/{user}/search", json={"query": "x", "scope": "everything"})
        assert bad.status_code == 422 and bad.json()["detail"][0]["loc"] == ["body", "scope"]
        tool = c.post(
            f"/v1/memory/{user}/tools/semantic_search", json={"args": {"query": learnt[3], "k": 2}}
        ).json()
        assert tool["ok"] and tool["result"][0]["text"] == learnt[3]
        assert tool["result"][0]["source"] == "archive"
    # Another key, same user id: none of it.
    other = platform.client.post(
        f"/v1/memory/{user}/search", json={"query": learnt[3], "scope": "all"}
    )
    assert other.status_code == 200 and other.json() == []
