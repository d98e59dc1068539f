"""Archival (long-term) memory: the store on a real Redis (paging, kinds, deletion, exact
search against a NumPy brute force), its API routes (tenants, 404s and 422s), search with a
scope, the memory tools, and context assembly — with vectors from the real tiny-embed model."""

from __future__ import annotations

import random
import time
import uuid
from collections.abc import Iterator
from typing import Any, TypeVar

import numpy as np
import pytest

from app.core.config import Settings, use_settings
from app.core.errors import NotFoundError
from app.memory import recall, tools
from app.memory.archive import KINDS, Kind, NewEntry
from app.memory.context import ContextRequest, archive_line, assemble
from app.memory.keys import Keys
from app.memory.schemas import ArchiveHit, SearchHit
from app.memory.service import Memory, get_memory
from app.memory.store import NewMessage
from app.store.tables import utcnow
from app.workflows.engine import StepWork
from app.workflows.spec import ChatInput
from models.tiny import _WORDS
from tests.memory.conftest import Embed
from tests.utils.platform import Platform
from workers.memory import memory_chat
from workers.runtime import LlamaCppRuntime, RunControl

T = TypeVar("T")


def entry(text: str, kind: Kind = "fact", cid: str = "c" * 32, vector=None, **kw) -> NewEntry:
    return NewEntry(text, kind, cid, kw.pop("from_seq", 1), kw.pop("to_seq", 2), vector=vector)


def phrase(rng: random.Random, n: int = 6) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(n))


def remember(mem: Memory, tenant: str, user: str, texts: list[str], embed: Embed, **kw) -> list:
    """Archival entries of ``texts`` with their tiny-embed vectors (document prefix)."""
    prefix = mem.settings.memory_document_prefix
    vectors = embed([prefix + t for t in texts])
    new = [entry(t, KINDS[i % 4], vector=vectors[i], **kw) for i, t in enumerate(texts)]
    mem.archive.add(tenant, user, new)
    return new


def messages_with_vectors(
    mem: Memory, tenant: str, user: str, texts: list[str], embed: Embed
) -> str:
    """A conversation of ``texts``, each message stored with its tiny-embed vector."""
    conv = mem.conversations.create(tenant, uuid.uuid4().hex, user, ttl_s=600)
    seqs = mem.conversations.append(
        tenant, conv, [NewMessage("user", t) for t in texts], embed=False
    )
    prefix = mem.settings.memory_document_prefix
    mem.vectors.add(tenant, conv.id, user, seqs, embed([prefix + t for t in texts]))
    return conv.id


# --- the store --------------------------------------------------------------------------


def test_pages_run_newest_first_with_a_cursor_and_a_kind(mem: Memory, tenant: str) -> None:
    first = [entry(f"old {i}", KINDS[i % 4]) for i in range(5)]
    mem.archive.add(tenant, "u1", first)
    time.sleep(0.002)  # a later commit: a later millisecond
    second = [entry(f"new {i}", KINDS[i % 4]) for i in range(6)]
    mem.archive.add(tenant, "u1", second)
    newest_first = [e.id for e in reversed(first + second)]
    assert mem.archive.count(tenant, "u1") == 11
    seen: list[str] = []
    cursor = None
    while True:
        page = mem.archive.page(
            tenant, "u1", limit=4, before=float(cursor) if cursor is not None else None
        )
        assert len(page.items) <= 4
        seen += [e.id for e in page.items]
        cursor = page.next_cursor
        if cursor is None:
            break
    assert seen == newest_first
    facts = [e.id for e in reversed(first + second) if e.kind == "fact"]
    page = mem.archive.page(tenant, "u1", kind="fact", limit=2)
    assert [e.id for e in page.items] == facts[:2] and page.next_cursor is not None
    rest = mem.archive.page(tenant, "u1", kind="fact", limit=2, before=float(page.next_cursor))
    assert [e.id for e in rest.items] == facts[2:] and rest.next_cursor is None
    assert mem.archive.page(tenant, "u2").items == []  # per user
    stored = mem.archive.get(tenant, "u1", first[0].id)
    assert stored.text == "old 0" and stored.kind == "fact" and stored.user_id == "u1"
    assert stored.source.conversation_id == "c" * 32 and stored.embedded is False
    assert (stored.source.from_seq, stored.source.to_seq, stored.seen) == (1, 2, 1)


def test_delete_forgets_the_entry_and_its_vector(mem: Memory, tenant: str) -> None:
    kept, gone = entry("kept", vector=np.ones(8)), entry("gone", vector=np.arange(8.0))
    mem.archive.add(tenant, "u1", [kept, gone])
    assert mem.archive.get(tenant, "u1", gone.id).embedded is True
    mem.archive.delete(tenant, "u1", gone.id)
    k = Keys(tenant)
    assert not mem.redis.hexists(k.archive_vec("u1"), gone.id)
    assert mem.redis.zscore(k.archive_time("u1"), gone.id) is None
    with pytest.raises(NotFoundError):
        mem.archive.get(tenant, "u1", gone.id)
    with pytest.raises(NotFoundError):
        mem.archive.delete(tenant, "u1", gone.id)
    assert mem.archive.vectors(tenant, "u1")[0] == [kept.id]
    assert [h.entry.id for h in mem.archive.search(tenant, "u1", np.ones(8), 5)] == [kept.id]


def test_search_is_exact_cosine_like_numpy(mem: Memory, tenant: str) -> None:
    rng = np.random.default_rng(3)
    rows = rng.normal(size=(60, 24)) * rng.uniform(0.1, 5, size=(60, 1))  # not unit length
    new = [entry(f"e{i}", KINDS[i % 4], vector=rows[i]) for i in range(60)]
    mem.archive.add(tenant, "u1", [*new, entry("no vector")])
    for _ in range(5):
        query = rng.normal(size=24)
        unit = rows / np.linalg.norm(rows, axis=1, keepdims=True)
        scores = unit @ (query / np.linalg.norm(query))
        order = np.argsort(-scores)
        got = mem.archive.search(tenant, "u1", query, 10)
        assert [h.entry.id for h in got] == [new[i].id for i in order[:10]]
        assert [h.score for h in got] == pytest.approx([scores[i] for i in order[:10]], abs=1e-5)
        events = mem.archive.search(tenant, "u1", query, 4, kinds=["event"])
        want = [new[i].id for i in order if new[i].kind == "event"][:4]
        assert [h.entry.id for h in events] == want
    assert len(mem.archive.search(tenant, "u1", rng.normal(size=24), 100)) == 60
    assert mem.archive.search(tenant, "u1", rng.normal(size=24), 0) == []


def test_another_dimension_is_left_out(mem: Memory, tenant: str) -> None:
    """Entries embedded by an older model (another dimension) are not compared."""
    rng = np.random.default_rng(5)
    old = [entry(f"old {i}", vector=rng.normal(size=8)) for i in range(3)]
    new = [entry(f"new {i}", vector=rng.normal(size=16)) for i in range(2)]
    mem.archive.add(tenant, "u1", [*old, *new])
    found = mem.archive.search(tenant, "u1", rng.normal(size=16), 10)
    assert {h.entry.id for h in found} == {e.id for e in new}
    assert mem.archive.search(tenant, "u1", rng.normal(size=8), 10) == []
    assert mem.archive.search(tenant, "nobody", rng.normal(size=16), 10) == []
    assert mem.archive.count(tenant, "u1") == 5  # still listed and readable


# --- search with a scope, over tiny-embed vectors ----------------------------------------


def test_scopes_find_messages_entries_or_both_by_score(
    mem: Memory, tenant: str, embed: Embed
) -> None:
    rng = random.Random(11)
    said = [phrase(rng) for _ in range(8)]
    learnt = [phrase(rng) for _ in range(8)]
    cid = messages_with_vectors(mem, tenant, "u1", said, embed)
    other = messages_with_vectors(mem, tenant, "u1", [phrase(rng) for _ in range(3)], embed)
    remember(mem, tenant, "u1", learnt[:5], embed)
    remember(mem, tenant, "u1", learnt[5:], embed, cid=cid)
    query = embed([mem.settings.memory_query_prefix + learnt[2]])[0]

    messages = recall.nearest(mem, tenant, "u1", query, 6)
    assert [h.source for h in messages] == ["message"] * 6
    assert all(h.entry is None and h.message is not None for h in messages)
    plain = recall.hits_with_messages(mem, tenant, "u1", query, 6)
    assert [(h.message, h.score) for h in messages] == [(h.message, h.score) for h in plain]

    archive = recall.nearest(mem, tenant, "u1", query, 6, scope="archive")
    assert [h.source for h in archive] == ["archive"] * 6
    assert archive[0].entry is not None and archive[0].entry.text == learnt[2]
    assert archive[0].score == pytest.approx(1.0, abs=1e-4)
    assert all(h.message is None for h in archive)

    every = recall.nearest(mem, tenant, "u1", query, 10, scope="all")
    union = sorted(
        [
            *recall.nearest(mem, tenant, "u1", query, 10),
            *recall.archive_hits(mem, tenant, "u1", query, 99),
        ],
        key=lambda h: -h.score,
    )[:10]
    assert [(h.source, h.score) for h in every] == [(h.source, h.score) for h in union]
    assert {h.source for h in every} == {"message", "archive"}  # 11 messages, 8 entries
    scores = [h.score for h in every]
    assert scores == sorted(scores, reverse=True) and len(every) == 10

    # One conversation: its messages, and the entries learnt from it.
    only = recall.nearest(mem, tenant, "u1", query, 20, scope="all", conversation_id=cid)
    assert {h.message.conversation_id for h in only if h.message} == {cid}
    assert sorted(h.entry.text for h in only if h.entry) == sorted(learnt[5:])
    assert other not in {h.message.conversation_id for h in only if h.message}
    # Another tenant, another user: nothing.
    assert recall.nearest(mem, "x" + tenant, "u1", query, 5, scope="all") == []
    assert recall.nearest(mem, tenant, "u2", query, 5, scope="all") == []


def test_a_hit_holds_what_its_source_says() -> None:
    with pytest.raises(ValueError, match="archive hit holds `entry`"):
        SearchHit(score=0.5, source="archive")
    with pytest.raises(ValueError, match="message hit holds `message`"):
        SearchHit(score=0.5)


# --- tools ------------------------------------------------------------------------------


def test_tools_see_long_term_memory(mem: Memory, tenant: str, embed: Embed) -> None:
    rng = random.Random(12)
    said = [phrase(rng) for _ in range(5)]
    learnt = [phrase(rng) for _ in range(4)]
    cid = messages_with_vectors(mem, tenant, "u1", said, embed)
    remember(mem, tenant, "u1", learnt, embed, cid=cid)
    conv = mem.conversations.get(tenant, cid)
    queries: list[str] = []

    def embed_query(text: str) -> np.ndarray:
        queries.append(text)
        return embed([mem.settings.memory_query_prefix + text])[0]

    ctx = tools.ToolContext(mem, tenant, "u1", conv, "model:test", embed_query)

    def call(tool: str, **args: Any) -> Any:
        out = tools.execute(ctx, tools.ToolCall(tool, args, ""))
        assert out["ok"], out
        return out["result"]

    both = call("semantic_search", query=learnt[1], k=9)  # scope "all" for models
    assert len(both) == 9 and {h["source"] for h in both} == {"message", "archive"}
    top = both[0]
    assert top["source"] == "archive" and top["text"] == learnt[1]
    assert top["kind"] == "preference" and top["conversation_id"] == cid
    assert top["score"] == pytest.approx(1.0, abs=1e-3)
    assert set(top) == {"source", "kind", "text", "score", "conversation_id", "at"}
    assert [h["score"] for h in both] == sorted((h["score"] for h in both), reverse=True)
    messages = call("semantic_search", query=said[3], k=3, scope="messages")
    assert [h["source"] for h in messages] == ["message"] * 3
    assert messages[0]["content"] == said[3] and messages[0]["seq"] == 4
    archive = call("semantic_search", query=said[3], k=3, scope="archive")
    assert [h["source"] for h in archive] == ["archive"] * 3
    bad = tools.execute(ctx, tools.ToolCall("semantic_search", {"query": "x", "scope": "x"}, ""))
    assert bad["ok"] is False and "scope" in bad["error"]

    enriched = call("enriched_context", query=learnt[0], limit=2, k=2)
    assert [m["seq"] for m in enriched["recent"]] == [4, 5]
    assert len(enriched["archive"]) == 2 and enriched["archive"][0]["text"] == learnt[0]
    assert call("enriched_context", limit=2, k=2)["archive"] == []  # no query, no recall
    assert queries == [learnt[1], said[3], said[3], learnt[0]]  # each call embeds once


def test_grammar_admits_a_scope_and_the_tiny_model_follows_it(
    mem: Memory, tenant: str, chat_runtime: LlamaCppRuntime, embed: Embed
) -> None:
    gbnf = tools.grammar(["semantic_search"], {})
    assert gbnf is not None
    assert 'scope ::= "\\"all\\"" | "\\"messages\\"" | "\\"archive\\""' in gbnf
    assert "semantic_search" in tools.instructions(["semantic_search"], ["user"])
    assert '"scope"' in tools.DESCRIPTIONS["semantic_search"]
    remember(mem, tenant, "u1", ["the sea is blue"], embed)
    ctx = tools.ToolContext(
        mem, tenant, "u1", None, "model:test", lambda text: embed([text])[0], ["semantic_search"]
    )
    scopes = set()
    for seed in range(6):
        inp = {
            "messages": [{"role": "user", "content": "What do you know about me?"}],
            "max_tokens": 200,
            "temperature": 1.0,
            "top_p": 1.0,
            "top_k": 0,
            "repeat_penalty": 1.0,
            "seed": seed,
            "grammar": gbnf,
        }
        out = chat_runtime.chat(inp, RunControl())
        assert out["finish_reason"] == "stop", out
        (call,) = tools.parse_tool_calls(out["text"])
        assert call.tool == "semantic_search"
        result = tools.execute(ctx, call)
        assert result["ok"], result
        scopes.add(call.args.get("scope", "(none)"))
    assert scopes - {"(none)"}, scopes  # the optional scope is reachable under the grammar


# --- context assembly -------------------------------------------------------------------


def test_context_puts_long_term_memory_in_the_prompt(
    mem: Memory, tenant: str, chat_runtime: LlamaCppRuntime
) -> None:
    rng = random.Random(21)
    conv = mem.conversations.create(tenant, uuid.uuid4().hex, "u1", ttl_s=600)
    mem.conversations.append(
        tenant, conv, [NewMessage("user", phrase(rng, 30)) for _ in range(40)], embed=False
    )
    conv = mem.conversations.get(tenant, conv.id)
    learnt = [entry(phrase(rng, 8), KINDS[i % 4]) for i in range(5)]
    learnt[0].text = "Lives in Lisbon.\nHas a cat."  # one line in the prompt
    mem.archive.add(tenant, "u1", learnt)
    notes = [
        ArchiveHit(score=0.9 - i / 10, entry=mem.archive.get(tenant, "u1", e.id))
        for i, e in enumerate(learnt)
    ]
    recalled = [
        SearchHit(score=0.5, message=m) for m in mem.conversations.messages(tenant, conv.id, [3])
    ]
    mem.blocks.put(tenant, "u1", "user", "Name: Ada", source="api")

    def build(window: int, max_tokens: int, **kw: Any) -> Any:
        req = ContextRequest(
            tenant=tenant,
            conversation=conv,
            system_prompt="You are terse.",
            blocks=mem.blocks.all(tenant, "u1"),
            tools_text=None,
            pinned=[{"role": "user", "content": "And now?"}],
            before_seq=conv.message_count + 1,
            window=window,
            max_tokens=max_tokens,
            semantic=recalled,
            archive=notes,
            **kw,
        )
        return assemble(mem.conversations, chat_runtime, req)

    asm = build(1024, 64)  # the history overflows: a recalled message has room
    assert [h.entry.id for h in asm.archive] == [e.id for e in learnt[:3]]  # archive_k: 3
    system = asm.messages[0]["content"]
    lines = [archive_line(h) for h in asm.archive]
    section = "<long_term_memory>\n" + "\n".join(lines) + "\n</long_term_memory>"
    assert section in system
    assert lines[0] == f"- [fact, {notes[0].entry.updated_at:%Y-%m-%d}] Lives in Lisbon. Has a cat."
    assert system.index("<memory_blocks>") < system.index(section)
    assert system.index(section) < system.index("<recalled_messages>")
    assert asm.tokens["archive"] == sum(chat_runtime.count_tokens(t) for t in lines)
    parts = {k: v for k, v in asm.tokens.items() if k not in ("prompt", "budget", "window")}
    assert sum(parts.values()) == asm.tokens["prompt"] and asm.tokens["template"] >= 0
    assert asm.tokens["prompt"] == chat_runtime.count_chat_tokens(asm.messages)

    assert len(build(1024, 64, archive_k=5).archive) == 5
    none = build(1024, 64, archive_k=0)
    assert none.archive == [] and none.tokens["archive"] == 0
    assert "<long_term_memory>" not in none.messages[0]["content"]
    # Tighter windows: never over budget, and fewer entries as the room shrinks.
    fitted = []
    for window in (260, 300, 400, 700, 1024):
        tight = build(window, 32, archive_k=5, semantic_share=0.3)
        assert tight.tokens["prompt"] == chat_runtime.count_chat_tokens(tight.messages)
        assert tight.tokens["prompt"] <= window - 32
        fitted.append(len(tight.archive))
    assert fitted == sorted(fitted) and fitted[0] == 0 and fitted[-1] == 5, fitted


@pytest.fixture
def no_embedding(settings: Settings) -> Iterator[Settings]:
    with use_settings(settings.model_copy(update={"memory_embed_model": ""})) as s:
        yield s


def chat_step(conv_id: str, content: str, **memory: Any) -> tuple[StepWork, dict[str, Any]]:
    raw = {
        "conversation_id": conv_id,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": 8,
        "temperature": 0,
        "memory": {"context_tokens": 2048, **memory},
    }
    work = StepWork(
        uuid.uuid4().hex,
        "wf" + uuid.uuid4().hex[:10],
        "reply",
        "chat",
        "tiny-chat",
        1,
        raw,
        None,
        0.0,
        utcnow(),
    )  # no workflow row: tenant "_"
    return work, ChatInput.model_validate(raw).model_dump()


def test_no_embedding_means_no_long_term_recall(
    no_embedding: Settings, chat_runtime: LlamaCppRuntime
) -> None:
    mem = get_memory()
    user = f"arch{uuid.uuid4().hex[:6]}"
    conv = mem.conversations.create("_", uuid.uuid4().hex, user, ttl_s=600)
    mem.archive.add("_", user, [entry("Lives in Lisbon.", vector=np.ones(8))])
    work, params = chat_step(conv.id, "where do I live")
    out = memory_chat(work, chat_runtime, params, RunControl())
    report = out["memory"]
    assert report["semantic"] == {"status": "off"}
    assert report["tokens"]["archive"] == 0 and report["counts"]["archive"] == 0


@pytest.mark.e2e
def test_a_chat_step_recalls_long_term_memory(
    platform: Platform, chat_runtime: LlamaCppRuntime, embed: Embed
) -> None:
    """The turn is embedded once by the platform's tiny-embed pool; the entry that says
    the same is recalled into the prompt and its tokens counted."""
    mem = get_memory()
    user = f"arch{uuid.uuid4().hex[:6]}"
    conv = mem.conversations.create("_", uuid.uuid4().hex, user, ttl_s=600)
    rng = random.Random(31)
    learnt = [phrase(rng) for _ in range(6)]
    stored = remember(mem, "_", user, learnt, embed, cid=conv.id)
    work, params = chat_step(conv.id, learnt[4], archive_k=2, semantic_k=0)
    out = memory_chat(work, chat_runtime, params, RunControl())
    report = out["memory"]
    assert report["semantic"]["status"] == "ok", report
    assert report["semantic"]["archive_candidates"] == 2
    assert report["counts"]["archive"] == 2 and report["tokens"]["archive"] > 0
    first = report["recalled_archive"][0]
    assert first["id"] == stored[4].id and first["score"] == pytest.approx(1.0, abs=1e-3)
    assert report["tokens"]["prompt"] == out["prompt_tokens"] <= 2048 - 8
    work, params = chat_step(conv.id, learnt[4], archive_k=0)
    off = memory_chat(work, chat_runtime, params, RunControl())
    assert off["memory"]["tokens"]["archive"] == 0
