"""End to end: the conversation and memory API over HTTP, with real tiny-chat and tiny-embed
worker processes doing replies, summaries, tool calls and embeddings."""

from __future__ import annotations

import os
import random
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from app.store import db, keys
from models.tiny import _WORDS
from tests.utils.platform import Platform

pytestmark = pytest.mark.e2e
N_CTX = 8192  # tiny-chat's context


def words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(n))


def create(client: httpx.Client, user: str, **body: Any) -> dict[str, Any]:
    resp = client.post("/v1/conversations", json={"user_id": user, **body})
    assert resp.status_code == 201, resp.text
    out: dict[str, Any] = resp.json()
    return out


def say(client: httpx.Client, cid: str, content: str, **body: Any) -> dict[str, Any]:
    resp = client.post(f"/v1/conversations/{cid}/messages", json={"content": content, **body})
    assert resp.status_code == 201, resp.text
    out: dict[str, Any] = resp.json()
    return out


def long_history(client: httpx.Client, cid: str, seed: int) -> None:
    """150 messages of 110 words: about 18,000 tokens, over twice tiny-chat's window."""
    rng = random.Random(seed)
    for i in range(150):
        say(client, cid, words(rng, 110), role="user" if i % 2 == 0 else "assistant")


def wait_embedded(client: httpx.Client, cid: str, timeout_s: float = 90) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        conv: dict[str, Any] = client.get(f"/v1/conversations/{cid}").json()
        if conv["embedded_count"] == conv["message_count"]:
            return conv
        assert time.monotonic() < deadline, f"not embedded in time: {conv}"
        time.sleep(0.1)


@pytest.fixture(scope="module")
def other_client(platform: Platform) -> Iterator[httpx.Client]:
    """A client with a second API key: another tenant."""
    with db.session_scope(write=True) as session:
        _row, key = keys.create_key(session, f"memory-other-{os.getpid()}")
    client = httpx.Client(
        base_url=platform.url, headers={"Authorization": f"Bearer {key}"}, timeout=30
    )
    yield client
    client.close()


def test_conversation_lifecycle(platform: Platform) -> None:
    c = platform.client
    conv = create(c, "lc-user", title="first", ttl_s=600, metadata={"topic": "x"})
    assert conv["model"] == "tiny-chat" and conv["ttl_s"] == 600
    assert 590 < conv["expires_in_s"] <= 600
    first = say(c, conv["id"], "hello the world", metadata={"lang": "en"})
    assert first["message"]["seq"] == 1 and first["message"]["tokens"] == 3
    assert first["reply"] is None and first["workflow_id"] is None
    say(c, conv["id"], "we found it", key_moment=True)
    say(c, conv["id"], "bye", role="assistant")
    page = c.get(f"/v1/conversations/{conv['id']}/messages", params={"limit": 2}).json()
    assert [m["seq"] for m in page["items"]] == [1, 2] and page["next_after"] == 2
    rest = c.get(f"/v1/conversations/{conv['id']}/messages", params={"after": 2}).json()
    assert [m["content"] for m in rest["items"]] == ["bye"] and rest["next_after"] is None
    moments = c.get("/v1/memory/lc-user/key-moments").json()
    assert [(m["seq"], m["content"]) for m in moments] == [(2, "we found it")]
    unmark = c.put(
        f"/v1/conversations/{conv['id']}/messages/2/key-moment", json={"key_moment": False}
    )
    assert unmark.json()["key_moment"] is False
    listed = c.get("/v1/conversations", params={"user_id": "lc-user"}).json()
    assert [x["id"] for x in listed["items"]] == [conv["id"]]
    patched = c.patch(f"/v1/conversations/{conv['id']}", json={"title": "renamed"}).json()
    assert patched["title"] == "renamed" and patched["message_count"] == 3
    wait_embedded(c, conv["id"])
    assert c.delete(f"/v1/conversations/{conv['id']}").status_code == 204
    assert c.get(f"/v1/conversations/{conv['id']}").status_code == 404
    assert (
        c.post(f"/v1/conversations/{conv['id']}/messages", json={"content": "x"}).status_code == 404
    )
    hits = c.post("/v1/memory/lc-user/search", json={"query": "we found it", "k": 5}).json()
    assert hits == []  # its vectors went with it


def test_reply_reports_tokens_per_part(platform: Platform) -> None:
    c = platform.client
    conv = create(c, "reply-user", system_prompt="You are terse.")
    c.put("/v1/memory/reply-user/blocks/user", json={"value": "Name: Ada"})
    say(c, conv["id"], "hello")
    out = say(
        c,
        conv["id"],
        "tell me a story",
        respond={"max_tokens": 16, "temperature": 0, "seed": 1},
    )
    assert out["status"] == "succeeded", out
    reply = out["reply"]
    assert reply["role"] == "assistant" and reply["seq"] == 3 and reply["content"]
    assert out["output"]["completion_tokens"] == 16
    assert reply["tokens"] >= 16 and reply["tokens_model"] == "tiny-chat"  # recounted as text
    memory = out["output"]["memory"]
    tokens = memory["tokens"]
    assert tokens["system"] > 0 and tokens["blocks"] > 0 and tokens["recent"] > 0
    assert tokens["input"] > 0
    assert tokens["prompt"] == out["output"]["prompt_tokens"] <= N_CTX - 16
    assert memory["counts"]["recent"] == 1  # "hello"; "tell me a story" is the turn itself
    run = platform.client.get(f"/v1/workflows/{out['workflow_id']}").json()
    assert run["status"] == "succeeded"
    # Without waiting: the workflow id, to poll.
    later = say(c, conv["id"], "and?", respond={"max_tokens": 4, "wait": False})
    assert later["status"] == "running" and later["reply"] is None
    assert platform.wait(later["workflow_id"])["status"] == "succeeded"


def test_long_history_is_summarised_and_never_overflows(platform: Platform) -> None:
    c = platform.client
    conv = create(c, "long-user")
    long_history(c, conv["id"], seed=5)
    out = say(c, conv["id"], "sum it up", respond={"max_tokens": 64, "temperature": 0})
    assert out["status"] == "succeeded", out
    memory = out["output"]["memory"]
    assert memory["summary"]["action"] == "inline"
    assert memory["summary"]["upto"] > 0
    for rnd in memory["rounds"]:
        assert rnd["prompt_tokens"] + 64 <= N_CTX
    assert memory["tokens"]["summary"] > 0
    stored = c.get(f"/v1/conversations/{conv['id']}").json()
    assert stored["summary_upto"] == memory["summary"]["upto"] and stored["summary"]
    assert stored["message_count"] == 152


def test_search_finds_a_planted_message(platform: Platform) -> None:
    c = platform.client
    rng = random.Random(7)
    planted = "the quick brown fox jump over the lazy dog near the river"
    convs = [create(c, "search-user") for _ in range(2)]
    for i in range(30):
        say(c, convs[i % 2]["id"], words(rng, 12))
        if i == 17:
            say(c, convs[1]["id"], planted)
    for conv in convs:
        wait_embedded(c, conv["id"])
    hits = c.post("/v1/memory/search-user/search", json={"query": planted, "k": 3}).json()
    assert hits[0]["message"]["content"] == planted
    assert hits[0]["message"]["conversation_id"] == convs[1]["id"]
    assert hits[0]["score"] == pytest.approx(1.0, abs=1e-4)
    assert len(hits) == 3 and hits[1]["score"] < hits[0]["score"]
    only = c.post(
        "/v1/memory/search-user/search",
        json={"query": planted, "k": 3, "conversation_id": convs[0]["id"]},
    ).json()
    assert {h["message"]["conversation_id"] for h in only} == {convs[0]["id"]}
    # The same search as the model's tool.
    tool = c.post(
        "/v1/memory/search-user/tools/semantic_search", json={"args": {"query": planted, "k": 1}}
    ).json()
    assert tool["ok"] and tool["result"][0]["content"] == planted


def test_the_model_edits_its_own_block(platform: Platform) -> None:
    c = platform.client
    conv = create(c, "tool-user")
    c.put("/v1/memory/tool-user/blocks/user", json={"value": "Name: Ada"})
    out = say(
        c,
        conv["id"],
        "Please remember that I like the sea",
        respond={
            "max_tokens": 200,
            "temperature": 0,
            "tools": ["memory_append", "recent_history"],
            "tool_choice": "memory_append",
            "max_tool_rounds": 1,
        },
    )
    assert out["status"] == "succeeded", out
    (call,) = out["output"]["tool_calls"]
    assert call["tool"] == "memory_append" and call["ok"], call
    name, text = call["args"]["block"], call["args"]["text"]
    block = c.get(f"/v1/memory/tool-user/blocks/{name}").json()
    assert block["value"].endswith(text)
    (edit, *_) = c.get(f"/v1/memory/tool-user/blocks/{name}/history").json()
    assert edit["op"] == "append" and edit["new"] == block["value"]
    assert edit["source"].startswith(f"model:tiny-chat workflow={out['workflow_id']}")
    assert len(out["output"]["memory"]["rounds"]) == 2  # the call, then the answer
    assert out["reply"]["metadata"]["tool_calls"] == [{"tool": "memory_append", "ok": True}]


def test_tenants_are_isolated(platform: Platform, other_client: httpx.Client) -> None:
    mine = platform.client
    conv = create(mine, "shared-name")
    say(mine, conv["id"], "private words")
    mine.put("/v1/memory/shared-name/blocks/user", json={"value": "mine only"})
    cid = conv["id"]
    assert other_client.get(f"/v1/conversations/{cid}").status_code == 404
    assert other_client.get(f"/v1/conversations/{cid}/messages").status_code == 404
    assert other_client.get(f"/v1/conversations/{cid}/messages/1").status_code == 404
    assert (
        other_client.post(f"/v1/conversations/{cid}/messages", json={"content": "x"}).status_code
        == 404
    )
    assert other_client.patch(f"/v1/conversations/{cid}", json={"title": "x"}).status_code == 404
    assert other_client.delete(f"/v1/conversations/{cid}").status_code == 404
    assert (
        other_client.put(f"/v1/conversations/{cid}/messages/1/key-moment", json={}).status_code
        == 404
    )
    assert (
        other_client.get("/v1/conversations", params={"user_id": "shared-name"}).json()["items"]
        == []
    )
    assert other_client.get("/v1/memory/shared-name/blocks/user").json()["value"] == ""
    other_client.put("/v1/memory/shared-name/blocks/user", json={"value": "theirs"})
    assert mine.get("/v1/memory/shared-name/blocks/user").json()["value"] == "mine only"
    # A workflow under the other key cannot use this conversation either.
    run = other_client.post(
        "/v1/workflows",
        json={
            "name": "steal",
            "steps": [
                {
                    "id": "s",
                    "kind": "chat",
                    "model": "tiny-chat",
                    "input": {"conversation_id": cid, "max_tokens": 4},
                }
            ],
        },
    )
    assert run.status_code == 202
    done = _wait(other_client, run.json()["id"])
    assert done["status"] == "failed" and "no conversation" in done["steps"][0]["error"]
    assert mine.get(f"/v1/conversations/{cid}").json()["message_count"] == 1


def _wait(client: httpx.Client, wid: str, timeout_s: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        run: dict[str, Any] = client.get(f"/v1/workflows/{wid}").json()
        if run["status"] != "running":
            return run
        assert time.monotonic() < deadline, run
        time.sleep(0.05)


def test_bad_requests_name_the_field(platform: Platform) -> None:
    c = platform.client
    bad_user = c.post("/v1/conversations", json={"user_id": "no spaces allowed"})
    assert bad_user.status_code == 422
    too_long_ttl = c.post("/v1/conversations", json={"user_id": "u", "ttl_s": 10**10})
    assert too_long_ttl.status_code == 422
    assert too_long_ttl.json()["detail"][0]["loc"] == ["body", "ttl_s"]
    embed_model = c.post("/v1/conversations", json={"user_id": "u", "model": "tiny-embed"})
    assert embed_model.status_code == 422 and "not chat" in embed_model.text
    conv = create(c, "u")
    huge = c.post(f"/v1/conversations/{conv['id']}/messages", json={"content": "x" * 100_001})
    assert huge.status_code == 422
    assert "CORRAL_MEMORY_MAX_MESSAGE_CHARS" in huge.json()["detail"][0]["msg"]
    bad_reply = c.post(
        f"/v1/conversations/{conv['id']}/messages",
        json={"content": "hi", "respond": {"max_tokens": 9000}},
    )
    assert bad_reply.status_code == 422
    assert bad_reply.json()["detail"][0]["loc"] == ["body", "respond", "max_tokens"]
    assert c.get(f"/v1/conversations/{conv['id']}").json()["message_count"] == 0
    over = c.put("/v1/memory/u/blocks/persona", json={"value": "x" * 50, "limit": 10})
    assert over.status_code == 422 and "its limit is 10" in over.text
    assert c.get("/v1/memory/u/blocks/Not-A-Name").status_code == 422
    assert c.post("/v1/memory/u/tools/rm_rf", json={}).status_code == 422
    assert c.get("/v1/conversations/not-an-id").status_code == 404
    assert c.get("/v1/conversations", params={"limit": 10**6}).status_code == 422
    assert "/v1/conversations" in c.get("/openapi.json").json()["paths"]
