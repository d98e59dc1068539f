"""Reading memory back: recent history, semantic search (over messages and archival
entries), key moments, enriched context.

The same functions serve the API's memory routes, the model's memory tools and context
assembly, so all three see a user's memory the same way.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from app.core.errors import ConfigError, ConflictError, SpecError
from app.memory.schemas import ArchiveEntry, Conversation, Message, SearchHit, SearchScope
from app.memory.service import Memory, embed_model
from app.memory.vectors import Vectors
from models.catalog import CatalogEntry, load_catalog


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


def archive_hits(
    mem: Memory,
    tenant: str,
    user_id: str,
    query: Vectors,
    k: int,
    *,
    conversation_id: str | None = None,
) -> list[SearchHit]:
    """The ``k`` archival entries of the user nearest to ``query``, best first (only those
    learnt from ``conversation_id`` when given)."""
    if k <= 0:
        return []
    if conversation_id is None:
        found = mem.archive.search(tenant, user_id, query, k)
    else:
        every = mem.archive.search(tenant, user_id, query, mem.archive.count(tenant, user_id))
        found = [h for h in every if h.entry.source.conversation_id == conversation_id][:k]
    return [SearchHit(score=h.score, source="archive", entry=h.entry) for h in found]


def nearest(
    mem: Memory,
    tenant: str,
    user_id: str,
    query: Vectors,
    k: int,
    *,
    scope: SearchScope = "messages",
    conversation_id: str | None = None,
) -> list[SearchHit]:
    """The ``k`` nearest messages, archival entries, or both merged by score (best first;
    a message before an entry of the same score)."""
    found: list[SearchHit] = []
    if scope != "archive":
        found += hits_with_messages(mem, tenant, user_id, query, k, conversation_id=conversation_id)
    if scope != "messages":
        found += archive_hits(mem, tenant, user_id, query, k, conversation_id=conversation_id)
    return sorted(found, key=lambda h: -h.score)[:k]


def search(
    mem: Memory,
    tenant: str,
    user_id: str,
    query: str,
    k: int,
    *,
    conversation_id: str | None = None,
    scope: SearchScope = "messages",
) -> list[SearchHit]:
    """Embed ``query`` once on the embedding pool and return the user's nearest messages,
    archival entries, or both (``scope``)."""
    from app.memory.embedding import embed_queries

    limit = 50
    if k > limit:
        raise SpecError.single(("body", "k"), f"k must be ≤ {limit}, got {k}", "limit")
    if conversation_id is not None:
        conv = mem.conversations.get(tenant, conversation_id)
        if conv.user_id != user_id:
            raise SpecError.single(
                ("body", "conversation_id"),
                f"conversation {conversation_id!r} belongs to another user",
                "user_mismatch",
            )
    search_model(mem)
    vector = embed_queries(mem, [query])[0]
    return nearest(mem, tenant, user_id, vector, k, scope=scope, conversation_id=conversation_id)


def search_model(mem: Memory) -> CatalogEntry:
    """The model that embeds search queries; ConflictError (409) naming what is missing
    and what to do when this server has none (semantic search is then unavailable)."""
    name = mem.settings.memory_embed_model.strip()
    try:
        entry = embed_model(mem.settings)
    except ConfigError as exc:
        raise ConflictError(f"semantic search is unavailable: {exc}") from exc
    if entry is not None:
        return entry
    if not name:
        raise ConflictError(
            "semantic search is unavailable: this server has no embedding model "
            "(CORRAL_MEMORY_EMBED_MODEL is empty); set CORRAL_MEMORY_EMBED_MODEL to an embed "
            "model of the catalog and run its worker (`corral worker --model NAME`)"
        )
    catalog = load_catalog(mem.settings.catalog_path)
    embeds = [e.name for e in catalog.entries if e.kind == "embed"]
    raise ConflictError(
        "semantic search is unavailable: no embedding model's file is present "
        f"(CORRAL_MEMORY_EMBED_MODEL=auto; the catalog's embed models: "
        f"{', '.join(embeds) or 'none'}); pull one with `corral models pull NAME` and run "
        "its worker (`corral worker --model NAME`)"
    )


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


def compact_entry(entry: ArchiveEntry, score: float | None = None) -> dict[str, Any]:
    """An archival entry as a tool result shows it to the model."""
    out: dict[str, Any] = {"source": "archive", "kind": entry.kind, "text": entry.text}
    if score is not None:
        out["score"] = round(score, 4)
    out["conversation_id"] = entry.source.conversation_id
    out["at"] = entry.updated_at.isoformat(timespec="seconds")
    return out


def compact_hit(hit: SearchHit) -> dict[str, Any]:
    """A search hit as a tool result shows it: a message or an archival entry."""
    if hit.entry is not None:
        return compact_entry(hit.entry, hit.score)
    if hit.message is None:
        raise ValueError("a search hit holds a message or an archival entry")
    return {"source": "message", **compact(hit.message, hit.score)}


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
    """Recent turns, plus the nearest earlier messages, plus key moments — without repeats
    — and the ``k`` nearest archival entries (long-term memory)."""
    recent_msgs = recent(mem, tenant, conv, limit) if conv is not None else []
    seen = {(m.conversation_id, m.seq) for m in recent_msgs}
    semantic: list[dict[str, Any]] = []
    if query is not None and k:
        for hit in hits_with_messages(mem, tenant, user_id, query, k, exclude=seen):
            if (m := hit.message) is not None:
                semantic.append(compact(m, hit.score))
                seen.add((m.conversation_id, m.seq))
    key = [
        compact(m)
        for m in mem.conversations.key_moments(tenant, user_id, moments)
        if (m.conversation_id, m.seq) not in seen
    ]
    archive: list[dict[str, Any]] = []
    if query is not None and k:
        archive = [
            compact_entry(h.entry, h.score) for h in mem.archive.search(tenant, user_id, query, k)
        ]
    return {
        "recent": [compact(m) for m in recent_msgs],
        "semantic": semantic,
        "archive": archive,
        "key_moments": key,
    }
