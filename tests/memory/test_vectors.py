"""Vector storage and cosine search: every index gives the exact top-k a brute force gives.

Each test runs twice: on the session's Redis with the scan index, and on a private Redis
8.2 with RediSearch (``search_redis_url``) with the native index.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import numpy as np
import pytest

from app.core.config import Settings, get_settings, use_settings
from app.core.errors import ConfigError
from app.core.redis import get_redis
from app.memory.service import Memory, build_memory
from app.memory.store import NewMessage
from app.memory.vectors import (
    RediSearchIndex,
    ScanIndex,
    VectorIndex,
    detect_index,
    normalise,
    search_supported,
)

DIM = 16


def reference(planted, query, k, exclude=()):
    """Brute-force exact cosine top-k, ties by (conversation id, seq)."""
    q = query / np.linalg.norm(query)
    rows = []
    for (cid, seq), vec in planted.items():
        if (cid, seq) in exclude:
            continue
        rows.append((-float(np.float32(normalise(vec)[0] @ q.astype(np.float32))), cid, seq))
    rows.sort()
    return [(cid, seq) for _, cid, seq in rows[:k]]


@pytest.fixture(params=["scan", "redisearch"])
def kind(request: pytest.FixtureRequest, settings: Settings) -> Iterator[str]:
    """Which index the test runs on; ``redisearch`` on the Redis with vector search."""
    if request.param == "scan":
        yield "scan"
        return
    url = request.getfixturevalue("search_redis_url")
    with use_settings(settings.model_copy(update={"redis_url": url})):
        yield "redisearch"


@pytest.fixture
def mem(kind: str) -> Memory:
    return build_memory(get_redis(), get_settings())


@pytest.fixture
def index(kind: str, mem: Memory) -> VectorIndex:
    return RediSearchIndex(mem.redis) if kind == "redisearch" else ScanIndex(mem.redis)


def plant(mem: Memory, tenant: str, index: VectorIndex, user: str, convs: int, per: int, seed: int):
    rng = np.random.default_rng(seed)
    planted = {}
    for _ in range(convs):
        conv = mem.conversations.create(tenant, uuid.uuid4().hex, user, ttl_s=600)
        mem.conversations.append(
            tenant, conv, [NewMessage("user", f"m{i}") for i in range(per)], embed=False
        )
        vecs = rng.standard_normal((per, DIM)).astype(np.float32)
        # Duplicate vectors make exact ties; the order must still be deterministic.
        vecs[1] = vecs[0]
        assert index.add(tenant, conv.id, user, list(range(1, per + 1)), vecs) == per
        for i in range(per):
            planted[(conv.id, i + 1)] = vecs[i]
    return planted


def test_exact_top_k_matches_brute_force(mem: Memory, tenant: str, index: VectorIndex) -> None:
    planted = plant(mem, tenant, index, "u1", convs=4, per=50, seed=1)
    plant(mem, tenant, index, "someone-else", convs=1, per=50, seed=2)
    rng = np.random.default_rng(3)
    for _ in range(5):
        query = rng.standard_normal(DIM).astype(np.float32)
        hits = index.search(tenant, "u1", query, 7)
        assert [(h.conversation_id, h.seq) for h in hits] == reference(planted, query, 7)
        assert all(-1.0001 <= h.score <= 1.0001 for h in hits)
        assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    # The planted vector itself is its own nearest neighbour, at cosine 1.
    (cid, _seq), vec = next(iter(planted.items()))
    best = index.search(tenant, "u1", vec, 2)
    assert {(h.conversation_id, h.seq) for h in best} == {(cid, 1), (cid, 2)}
    assert best[0].score == pytest.approx(1.0, abs=1e-5)


def test_exclusions_and_conversation_filter(mem: Memory, tenant: str, index: VectorIndex) -> None:
    planted = plant(mem, tenant, index, "u1", convs=3, per=20, seed=4)
    query = np.random.default_rng(5).standard_normal(DIM).astype(np.float32)
    top = reference(planted, query, 5)
    hits = index.search(tenant, "u1", query, 5, exclude=set(top[:2]))
    assert [(h.conversation_id, h.seq) for h in hits] == reference(
        planted, query, 5, exclude=set(top[:2])
    )
    one = top[0][0]
    only = index.search(tenant, "u1", query, 5, conversation_ids=[one])
    assert {h.conversation_id for h in only} == {one}
    assert [(h.conversation_id, h.seq) for h in only] == reference(
        {k: v for k, v in planted.items() if k[0] == one}, query, 5
    )


def test_vectors_are_stored_once_and_counted(mem: Memory, tenant: str, index: VectorIndex) -> None:
    conv = mem.conversations.create(tenant, uuid.uuid4().hex, "u1", ttl_s=600)
    mem.conversations.append(tenant, conv, [NewMessage("user", "a"), NewMessage("user", "b")])
    vecs = np.eye(2, DIM, dtype=np.float32)
    assert index.add(tenant, conv.id, "u1", [1, 2], vecs) == 2
    assert index.add(tenant, conv.id, "u1", [1, 2], vecs) == 0  # a redelivered batch
    assert mem.conversations.get(tenant, conv.id).embedded_count == 2
    assert len(index.search(tenant, "u1", vecs[0], 10)) == 2
    assert index.add(tenant, "0" * 32, "u1", [1], vecs[:1]) == 0  # no such conversation


def test_scan_cache_sees_new_vectors(mem: Memory, tenant: str) -> None:
    cached = ScanIndex(mem.redis)
    planted = plant(mem, tenant, cached, "u1", convs=2, per=30, seed=6)
    query = np.random.default_rng(7).standard_normal(DIM).astype(np.float32)
    cached.search(tenant, "u1", query, 5)  # fills the cache
    more = plant(mem, tenant, cached, "u1", convs=1, per=30, seed=8)
    planted |= more
    fresh = ScanIndex(mem.redis)
    for q in (query, next(iter(more.values()))):
        want = reference(planted, q, 6)
        assert [(h.conversation_id, h.seq) for h in cached.search(tenant, "u1", q, 6)] == want
        assert [(h.conversation_id, h.seq) for h in fresh.search(tenant, "u1", q, 6)] == want


def test_detection_on_this_server(kind: str) -> None:
    client = get_redis()
    supported = search_supported(client)
    if kind == "redisearch":
        assert supported
    picked = detect_index(client, "auto")
    assert picked.kind == ("redisearch" if supported else "scan")
    assert detect_index(client, "scan").kind == "scan"
    if not supported:
        with pytest.raises(ConfigError, match="no vector search"):
            detect_index(client, "redisearch")


def test_native_index_and_scan_agree_on_10k_vectors(search_redis_url: str, settings) -> None:
    """On one server, the native index and the exact scan, each holding the same 10,000
    vectors (2,000 of them another user's), give the same top-k, and the brute force's."""
    with use_settings(settings.model_copy(update={"redis_url": search_redis_url})):
        mem = build_memory(get_redis(), get_settings())
        found = {}
        for index in (RediSearchIndex(mem.redis), ScanIndex(mem.redis)):
            tenant = f"t{uuid.uuid4().hex[:10]}"
            planted = plant(mem, tenant, index, "u1", convs=40, per=200, seed=11)
            plant(mem, tenant, index, "u2", convs=10, per=200, seed=12)
            assert len(planted) == 8000
            ordinal = {cid: n for n, cid in enumerate(dict.fromkeys(c for c, _ in planted))}
            rng = np.random.default_rng(13)
            rows = []
            for _ in range(10):
                query = rng.standard_normal(DIM).astype(np.float32)
                hits = [(h.conversation_id, h.seq) for h in index.search(tenant, "u1", query, 10)]
                assert hits == reference(planted, query, 10)
                rows.append([(ordinal[c], seq) for c, seq in hits])
            found[index.kind] = rows
        assert found["redisearch"] == found["scan"]
