"""Reading memory back: recent history, semantic search, key moments, enriched context.

The same functions serve the API's memory routes, the model's memory tools and context
assembly, so all three see a user's memory the same way.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from app.core.errors import SpecError
from app.memory.schemas import Conversation, Message, SearchHit
from app.memory.service import Memory
from app.memory.vectors import Vectors


def hits_with_messages(
    mem: Memory,
    tenant: str,
    user_id: str,
    query: Vectors,
    k: int,
    *,
    conversation_id: str | None = None,
    exclude: Collection[tuple[str, int]] = (),
) -> list[SearchHit]:
    """The ``k`` messages of the user nearest to ``query`` (a vector), best first."""
    hits = mem.vectors.search(
        tenant,
        user_id,
        query,
        k,
        conversation_ids=[conversation_id] if conversation_id else None,
        exclude=exclude,
    )
    by_conv: dict[str, list[int]] = {}
    for hit in hits:
        by_conv.setdefault(hit.conversation_id, []).append(hit.seq)
    found: dict[tuple[str, int], Message] = {}
    for cid, seqs in by_conv.items():
        for m in mem.conversations.messages(tenant, cid, seqs):
            found[(cid, m.seq)] = m
    return [
        SearchHit(score=h.score, message=found[(h.conversation_id, h.seq)])
        for h in hits
        if (h.conversation_id, h.seq) in found
    ]


def search(
    mem: Memory,
    tenant: str,
    user_id: str,
    query: str,
    k: int,
    *,
    conversation_id: str | None = None,
) -> list[SearchHit]:
    """Embed ``query`` on the embedding pool and return the user's nearest messages."""
    from app.memory.embedding import embed_queries

    limit = 50
    if k > limit:
        raise SpecError.single(("k",), f"k must be ≤ {limit}, got {k}", "limit")
    if conversation_id is not None:
        conv = mem.conversations.get(tenant, conversation_id)
        if conv.user_id != user_id:
            raise SpecError.single(
                ("conversation_id",),
                f"conversation {conversation_id!r} belongs to another user",
                "user_mismatch",
            )
    vector = embed_queries(mem, [query])[0]
    return hits_with_messages(mem, tenant, user_id, vector, k, conversation_id=conversation_id)


def recent(mem: Memory, tenant: str, conv: Conversation, limit: int) -> list[Message]:
    """The conversation's latest ``limit`` messages, oldest first."""
    return mem.conversations.latest(tenant, mem.conversations.get(tenant, conv.id), limit)


def compact(message: Message, score: float | None = None) -> dict[str, Any]:
    """A message as a tool result shows it to the model."""
    out: dict[str, Any] = {
        "conversation_id": message.conversation_id,
        "seq": message.seq,
        "role": message.role,
        "content": message.content,
        "at": message.created_at.isoformat(timespec="seconds"),
    }
    if score is not None:
        out["score"] = round(score, 4)
    if message.key_moment:
        out["key_moment"] = True
        if message.note:
            out["note"] = message.note
    return out


def enriched(
    mem: Memory,
    tenant: str,
    user_id: str,
    conv: Conversation | None,
    query: Vectors | None,
    *,
    limit: int = 10,
    k: int = 5,
    moments: int = 5,
) -> dict[str, list[dict[str, Any]]]:
    """Recent turns, plus the nearest earlier messages, plus key moments — without repeats."""
    recent_msgs = recent(mem, tenant, conv, limit) if conv is not None else []
    seen = {(m.conversation_id, m.seq) for m in recent_msgs}
    semantic: list[dict[str, Any]] = []
    if query is not None and k:
        for hit in hits_with_messages(mem, tenant, user_id, query, k, exclude=seen):
            semantic.append(compact(hit.message, hit.score))
            seen.add((hit.message.conversation_id, hit.message.seq))
    key = [
        compact(m)
        for m in mem.conversations.key_moments(tenant, user_id, moments)
        if (m.conversation_id, m.seq) not in seen
    ]
    return {"recent": [compact(m) for m in recent_msgs], "semantic": semantic, "key_moments": key}
