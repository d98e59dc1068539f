"""Archival memory: what consolidation learnt about a user, as entries with a source.

An entry is a fact, a preference, an event or a summary, with the conversation and the
message range it came from, and (when an embedding model is on) its vector. Entries of a
user live in three keys under the tenant (see :mod:`app.memory.keys`): a hash of entry
JSON by id, a sorted set of ids by creation time (listing, newest first) and a hash of
L2-normalised float32 vectors by id. Search is exact cosine over the user's vectors with
one NumPy product; archives are per user, so they stay small.

Entries are written only by :func:`stage`, inside the optimistic transaction that also
moves a conversation's consolidation watermark (:mod:`app.memory.consolidate`): an entry
exists exactly when the watermark that produced it moved.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, cast

import numpy as np
import redis
from redis.client import Pipeline

from app.core.errors import NotFoundError
from app.memory.keys import Keys
from app.memory.schemas import ArchiveEntry, ArchiveHit, ArchivePage, from_ms
from app.memory.vectors import Vectors, normalise

Kind = Literal["fact", "preference", "event", "summary"]
KINDS: tuple[Kind, ...] = ("fact", "preference", "event", "summary")


@dataclass
class NewEntry:
    """An entry to store: its text, kind, source and (maybe) vector."""

    text: str
    kind: Kind
    conversation_id: str
    from_seq: int
    to_seq: int
    run_id: str | None = None
    block: str | None = None
    vector: Vectors | None = None
    id: str = field(default_factory=lambda: uuid.uuid4().hex)


@dataclass
class Merge:
    """A new fact that repeats a stored entry: the entry is seen again, not repeated."""

    entry_id: str
    conversation_id: str
    to_seq: int
    run_id: str | None


def _entry(raw: bytes) -> ArchiveEntry:
    data = json.loads(raw)
    data["created_at"] = from_ms(data["created_at"])
    data["updated_at"] = from_ms(data["updated_at"])
    return ArchiveEntry.model_validate(data)


class ArchiveStore:
    """The archival memory of every user of every tenant."""

    def __init__(self, client: redis.Redis) -> None:
        self.redis = client

    def get(self, tenant: str, user_id: str, entry_id: str) -> ArchiveEntry:
        raw = cast(bytes | None, self.redis.hget(Keys(tenant).archive(user_id), entry_id))
        if raw is None:
            raise NotFoundError(f"user {user_id!r} has no archival entry {entry_id!r}")
        return _entry(raw)

    def count(self, tenant: str, user_id: str) -> int:
        return int(self.redis.hlen(Keys(tenant).archive(user_id)))

    def page(
        self,
        tenant: str,
        user_id: str,
        *,
        kind: Kind | None = None,
        limit: int = 50,
        before: float | None = None,
    ) -> ArchivePage:
        """Entries newest first (optionally of one kind), older than the cursor ``before``."""
        k = Keys(tenant)
        items: list[tuple[float, ArchiveEntry]] = []
        high: float | str = f"({before}" if before is not None else "+inf"
        chunk = limit + 1
        while len(items) <= limit:
            ids = cast(
                list[tuple[bytes, float]],
                self.redis.zrevrangebyscore(
                    k.archive_time(user_id), high, "-inf", start=0, num=chunk, withscores=True
                ),
            )
            if not ids:
                break
            raws = cast(
                list[bytes | None], self.redis.hmget(k.archive(user_id), [i for i, _ in ids])
            )
            for (_id, score), raw in zip(ids, raws, strict=True):
                if raw is not None:
                    entry = _entry(raw)
                    if kind is None or entry.kind == kind:
                        items.append((score, entry))
            high = f"({ids[-1][1]}"
            if len(ids) < chunk:
                break
        more = len(items) > limit
        items = items[:limit]
        cursor = repr(items[-1][0]) if items and more else None
        return ArchivePage(items=[e for _, e in items], next_cursor=cursor)

    def delete(self, tenant: str, user_id: str, entry_id: str) -> None:
        k = Keys(tenant)
        pipe = self.redis.pipeline()
        pipe.hdel(k.archive(user_id), entry_id)
        pipe.zrem(k.archive_time(user_id), entry_id)
        pipe.hdel(k.archive_vec(user_id), entry_id)
        if not pipe.execute()[0]:
            raise NotFoundError(f"user {user_id!r} has no archival entry {entry_id!r}")

    def add(self, tenant: str, user_id: str, entries: Sequence[NewEntry]) -> None:
        """Store entries as they are (no merging, no watermark): consolidation commits
        through :func:`stage`; this is for entries that come from elsewhere."""
        secs, micros = self.redis.time()
        pipe = self.redis.pipeline()
        stage(pipe, tenant, user_id, secs * 1000 + micros // 1000, entries, [], {})
        pipe.execute()

    def vectors(self, tenant: str, user_id: str) -> tuple[list[str], Vectors | None]:
        """The user's entry ids and their vectors (one row each), or None without any."""
        raw = cast(dict[bytes, bytes], self.redis.hgetall(Keys(tenant).archive_vec(user_id)))
        return _matrix(raw)

    def search(
        self,
        tenant: str,
        user_id: str,
        query: Vectors,
        k: int,
        *,
        kinds: Sequence[Kind] | None = None,
    ) -> list[ArchiveHit]:
        """The ``k`` entries nearest to ``query`` by cosine, best first (ties by id)."""
        ids, matrix = self.vectors(tenant, user_id)
        if matrix is None or k <= 0:
            return []
        q = normalise(query)[0]
        if q.shape[0] != matrix.shape[1]:
            return []  # stored with another embedding model's dimension
        scores = matrix @ q
        order = sorted(range(len(ids)), key=lambda i: (-float(scores[i]), ids[i]))
        raws = cast(
            list[bytes | None],
            self.redis.hmget(Keys(tenant).archive(user_id), [ids[i] for i in order]),
        )
        hits = []
        for i, raw in zip(order, raws, strict=True):
            if raw is None:
                continue
            entry = _entry(raw)
            if kinds is None or entry.kind in kinds:
                hits.append(ArchiveHit(score=float(scores[i]), entry=entry))
                if len(hits) == k:
                    break
        return hits


def _matrix(raw: dict[bytes, bytes]) -> tuple[list[str], Vectors | None]:
    if not raw:
        return [], None
    dims = {len(v) // 4 for v in raw.values()}
    dim = max(dims)  # entries from an older model's dimension are left out
    ids = [i.decode() for i, v in raw.items() if len(v) // 4 == dim]
    rows = [np.frombuffer(v, dtype=np.float32) for v in raw.values() if len(v) // 4 == dim]
    return ids, cast(Vectors, np.vstack(rows))


def watched(pipe: Pipeline, tenant: str, user_id: str) -> tuple[list[str], Vectors | None]:
    """The user's entry vectors, read on a pipeline that WATCHes the archive (before MULTI)."""
    raw = cast(dict[bytes, bytes], pipe.hgetall(Keys(tenant).archive_vec(user_id)))
    return _matrix(raw)


def stage(
    pipe: Pipeline,
    tenant: str,
    user_id: str,
    now_ms: int,
    entries: Sequence[NewEntry],
    merges: Sequence[Merge],
    merged_into: dict[str, dict[str, Any]],
) -> None:
    """Queue the writes of new entries and merges on a MULTI pipeline. ``merged_into``
    holds the current JSON of each merged entry (read while watching)."""
    k = Keys(tenant)
    for i, e in enumerate(entries):  # the score orders a commit's entries
        body: dict[str, Any] = {
            "id": e.id,
            "user_id": user_id,
            "text": e.text,
            "kind": e.kind,
            "block": e.block,
            "source": {
                "conversation_id": e.conversation_id,
                "from_seq": e.from_seq,
                "to_seq": e.to_seq,
                "run_id": e.run_id,
            },
            "seen": 1,
            "sources": [],
            "embedded": e.vector is not None,
            "created_at": now_ms,
            "updated_at": now_ms,
        }
        pipe.hset(k.archive(user_id), e.id, json.dumps(body))
        pipe.zadd(k.archive_time(user_id), {e.id: now_ms * 1000 + i})
        if e.vector is not None:
            pipe.hset(k.archive_vec(user_id), e.id, normalise(e.vector)[0].tobytes())
    for m in merges:
        body = merged_into[m.entry_id]
        body["seen"] = int(body.get("seen", 1)) + 1
        body["updated_at"] = now_ms
        seen_in = {"conversation_id": m.conversation_id, "to_seq": m.to_seq, "run_id": m.run_id}
        body["sources"] = [*body.get("sources", []), seen_in][-20:]
        pipe.hset(k.archive(user_id), m.entry_id, json.dumps(body))
