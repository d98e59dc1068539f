"""Memory routes answer what a client did wrong, or what the server lacks, with a 4xx that
says so: semantic search without an embedding model (409), a key moment on a message
that does not exist (404 with the conversation's range). The real app in this process,
on the session's real Redis and database."""

from __future__ import annotations

import asyncio
import base64
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest

from app.api.main import create_app
from app.core.config import Settings, use_settings
from app.store import db, keys

T = TypeVar("T")


def run(settings: Settings, calls: Callable[[httpx.AsyncClient], Awaitable[T]], **update: Any) -> T:
    """``calls`` with a client of the app holding a new API key, under ``settings`` with
    ``update`` applied."""
    with db.session_scope(write=True) as session:
        _row, key = keys.create_key(session, "memory-errors")

    async def main() -> T:
        transport = httpx.ASGITransport(app=create_app())
        headers = {"Authorization": f"Bearer {key}"}
        async with httpx.AsyncClient(
            transport=transport, base_url="http://corral", headers=headers
        ) as client:
            return await calls(client)

    with use_settings(settings.model_copy(update=update)):
        return asyncio.run(main())


def search(user: str, **body: Any) -> Callable[[httpx.AsyncClient], Awaitable[httpx.Response]]:
    async def calls(client: httpx.AsyncClient) -> httpx.Response:
        return await client.post(f"/v1/memory/{user}/search", json={"query": "hello", **body})

    return calls


def test_search_without_an_embedding_model_is_a_409_saying_what_to_set(
    settings: Settings,
) -> None:
    resp = run(settings, search("u1"), memory_embed_model="")
    assert resp.status_code == 409, resp.text
    detail = resp.json()["detail"]
    assert "semantic search is unavailable" in detail
    assert "CORRAL_MEMORY_EMBED_MODEL is empty" in detail
    assert "corral worker --model" in detail


def test_search_with_no_embed_model_file_names_the_models_to_pull(
    settings: Settings, tmp_path: Path
) -> None:
    resp = run(settings, search("u1"), memory_embed_model="auto", models_dir=tmp_path)
    assert resp.status_code == 409, resp.text
    detail = resp.json()["detail"]
    assert "no embedding model's file is present" in detail
    assert "tiny-embed" in detail and "corral models pull" in detail


@pytest.mark.parametrize(
    ("name", "phrase"),
    [("tiny-chat", "is a chat model; name an embed model"), ("nope", "unknown model 'nope'")],
)
def test_search_with_a_misconfigured_embedding_model_is_a_409(
    settings: Settings, name: str, phrase: str
) -> None:
    resp = run(settings, search("u1"), memory_embed_model=name)
    assert resp.status_code == 409, resp.text
    assert "CORRAL_MEMORY_EMBED_MODEL" in resp.json()["detail"]
    assert phrase in resp.json()["detail"]


def test_bad_search_input_is_still_a_422_naming_the_field(settings: Settings) -> None:
    resp = run(settings, search("u1", k=51), memory_embed_model="")
    assert resp.status_code == 422, resp.text
    assert resp.json()["detail"][0]["loc"] == ["body", "k"]
    assert "k must be ≤ 50, got 51" in resp.json()["detail"][0]["msg"]


def test_a_key_moment_on_a_missing_message_is_a_404_naming_the_range(settings: Settings) -> None:
    user = f"km-{uuid.uuid4().hex[:8]}"

    async def calls(client: httpx.AsyncClient) -> dict[str, Any]:
        empty = (await client.post("/v1/conversations", json={"user_id": user})).json()["id"]
        cid = (await client.post("/v1/conversations", json={"user_id": user})).json()["id"]
        for text in ("first", "second"):
            resp = await client.post(f"/v1/conversations/{cid}/messages", json={"content": text})
            assert resp.status_code == 201, resp.text
        out: dict[str, Any] = {"cid": cid}
        for seq in (0, -1, 3, 10**30, -(10**30)):
            out[str(seq)] = await client.put(
                f"/v1/conversations/{cid}/messages/{seq}/key-moment", json={"note": "x"}
            )
        out["empty"] = await client.put(f"/v1/conversations/{empty}/messages/1/key-moment", json={})
        out["ok"] = await client.put(
            f"/v1/conversations/{cid}/messages/2/key-moment", json={"note": "found it"}
        )
        out["moments"] = (await client.get(f"/v1/memory/{user}/key-moments")).json()
        out["messages"] = (await client.get(f"/v1/conversations/{cid}/messages")).json()
        return out

    out = run(settings, calls, memory_embed_model="")
    cid = out["cid"]
    for seq in ("0", "-1", "3", str(10**30), str(-(10**30))):
        resp = out[seq]
        assert resp.status_code == 404, (seq, resp.text)
        assert resp.json()["detail"] == (
            f"conversation {cid!r} has no message {seq}: its messages are seq 1 to 2"
        )
    assert out["empty"].status_code == 404
    assert "has no message 1: it has no messages yet" in out["empty"].json()["detail"]
    assert out["ok"].status_code == 200, out["ok"].text
    assert out["ok"].json()["seq"] == 2 and out["ok"].json()["note"] == "found it"
    # The refused marks changed nothing: one key moment, the one that was asked for.
    assert [(m["seq"], m["note"]) for m in out["moments"]] == [(2, "found it")]
    assert [m["key_moment"] for m in out["messages"]["items"]] == [False, True]


def raw(
    method: str, path: str, body: str
) -> Callable[[httpx.AsyncClient], Awaitable[httpx.Response]]:
    """A request with ``body`` sent as it is (JSON may escape what ``json=`` cannot send)."""

    async def calls(client: httpx.AsyncClient) -> httpx.Response:
        return await client.request(
            method, path, content=body.encode(), headers={"content-type": "application/json"}
        )

    return calls


def nested(depth: int) -> str:
    return '{"a":' * depth + "1" + "}" * depth


def test_text_a_store_cannot_give_back_is_refused_naming_the_field(settings: Settings) -> None:
    """A lone UTF-16 surrogate (JSON may escape one) or metadata nested past the limit
    would be stored and then fail every later read of the conversation or block: 422,
    nothing written. A surrogate pair is one character, and is fine."""
    user = f"text-{uuid.uuid4().hex[:8]}"

    async def calls(client: httpx.AsyncClient) -> dict[str, Any]:
        cid = (await client.post("/v1/conversations", json={"user_id": user})).json()["id"]
        out: dict[str, Any] = {"cid": cid}
        for name, method, path, body in [
            ("title", "POST", "/v1/conversations", f'{{"user_id":"{user}","title":"a\\ud800"}}'),
            ("key", "PATCH", f"/v1/conversations/{cid}", '{"metadata":{"k\\udc00":1}}'),
            ("content", "POST", f"/v1/conversations/{cid}/messages", '{"content":"\\ud83d"}'),
            ("block", "PUT", f"/v1/memory/{user}/blocks/notes", '{"value":"x \\udfff y"}'),
            (
                "tool",
                "POST",
                f"/v1/memory/{user}/tools/memory_append",
                '{"args":{"block":"notes","text":"\\ud800"}}',
            ),
            (
                "deep",
                "POST",
                f"/v1/conversations/{cid}/messages",
                f'{{"content":"hi","metadata":{nested(64)}}}',
            ),
            (
                "pair",
                "POST",
                f"/v1/conversations/{cid}/messages",
                '{"content":"\\ud83d\\ude00 \\\\ud800"}',
            ),
        ]:
            out[name] = await raw(method, path, body)(client)
        out["conv"] = (await client.get(f"/v1/conversations/{cid}")).json()
        out["convs"] = (await client.get("/v1/conversations", params={"user_id": user})).json()
        out["block read"] = await client.get(f"/v1/memory/{user}/blocks/notes")
        out["history"] = await client.get(f"/v1/memory/{user}/blocks/notes/history")
        return out

    out = run(settings, calls, memory_embed_model="")
    for name, loc in [
        ("title", ["body", "title"]),
        ("key", ["body", "metadata"]),
        ("content", ["body", "content"]),
        ("block", ["body", "value"]),
        ("tool", ["body", "args", "text"]),
    ]:
        assert out[name].status_code == 422, (name, out[name].text)
        [error] = out[name].json()["detail"]
        assert error["loc"] == loc and error["type"] == "unicode", (name, error)
        assert "lone UTF-16 surrogate" in error["msg"]
    [error] = out["deep"].json()["detail"]
    assert out["deep"].status_code == 422 and error["loc"] == ["body", "metadata"]
    assert "at most 64 levels deep" in error["msg"]
    # Nothing was written, and everything reads back.
    assert out["pair"].status_code == 201, out["pair"].text
    assert out["pair"].json()["message"]["content"] == "\U0001f600 \\ud800"
    assert out["conv"]["message_count"] == 1 and out["conv"]["metadata"] == {}
    assert [c["id"] for c in out["convs"]["items"]] == [out["cid"]]
    assert out["block read"].status_code == 404  # never written
    assert out["history"].status_code == 200 and out["history"].json() == []


@pytest.mark.parametrize("score", ["nan", "inf", "-inf", "1e400"])
def test_a_cursor_that_no_page_handed_out_is_a_422(settings: Settings, score: str) -> None:
    cursor = base64.urlsafe_b64encode(f"{score}|{'a' * 32}".encode()).decode()

    async def calls(client: httpx.AsyncClient) -> httpx.Response:
        return await client.get("/v1/conversations", params={"cursor": cursor})

    resp = run(settings, calls)
    assert resp.status_code == 422, resp.text
    assert resp.json()["detail"][0]["loc"] == ["query", "cursor"]
