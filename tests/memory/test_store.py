"""Conversations and messages on a real Redis: order, idempotency, TTL, deletion, tenants."""

from __future__ import annotations

import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from app.core.errors import NotFoundError, SpecError
from app.memory.keys import Keys
from app.memory.service import Memory
from app.memory.store import NewMessage


def conv_of(mem: Memory, tenant: str, user: str = "alice", ttl_s: int = 3600, **kw):
    return mem.conversations.create(tenant, uuid.uuid4().hex, user, ttl_s=ttl_s, **kw)


def test_append_and_read_back(mem: Memory, tenant: str) -> None:
    conv = conv_of(mem, tenant, title="t", model="tiny-chat", metadata={"a": 1})
    assert conv.message_count == 0 and conv.title == "t" and conv.metadata == {"a": 1}
    seqs = mem.conversations.append(
        tenant,
        conv,
        [
            NewMessage("user", "hello there", 2, "tiny-chat", {"k": "v"}),
            NewMessage("assistant", "hi", 1, "tiny-chat"),
        ],
        embed=False,
    )
    assert seqs == [1, 2]
    assert mem.conversations.append(tenant, conv, [NewMessage("user", "x")], embed=False) == [3]
    msgs = mem.conversations.page(tenant, conv.id, after=0, limit=10)
    assert [(m.seq, m.role, m.content) for m in msgs] == [
        (1, "user", "hello there"),
        (2, "assistant", "hi"),
        (3, "user", "x"),
    ]
    assert msgs[0].tokens == 2 and msgs[0].tokens_model == "tiny-chat"
    assert msgs[0].metadata == {"k": "v"}
    assert msgs[0].created_at <= msgs[2].created_at
    assert [
        m.seq for m in mem.conversations.latest(tenant, mem.conversations.get(tenant, conv.id), 2)
    ] == [2, 3]
    got = mem.conversations.get(tenant, conv.id)
    assert got.message_count == 3
    assert got.updated_at >= got.created_at
    assert 3500 < (got.expires_in_s or 0) <= 3600


def test_concurrent_appends_keep_order_and_lose_nothing(mem: Memory, tenant: str) -> None:
    conv = conv_of(mem, tenant)
    writers, per_writer = 8, 60
    start = threading.Barrier(writers)

    def write(w: int) -> list[int]:
        start.wait()
        out = []
        for i in range(per_writer):
            if i % 10 == 9:  # some appends are batches of three
                batch = [NewMessage("user", f"{w}:{i}:{j}") for j in range(3)]
                out += mem.conversations.append(tenant, conv, batch, embed=False)
            else:
                out += mem.conversations.append(
                    tenant, conv, [NewMessage("user", f"{w}:{i}")], embed=False
                )
        return out

    with ThreadPoolExecutor(writers) as pool:
        returned = list(pool.map(write, range(writers)))
    total = writers * (per_writer + 2 * (per_writer // 10))
    flat = sorted(s for seqs in returned for s in seqs)
    assert flat == list(range(1, total + 1))  # every seq handed out once, none skipped
    assert mem.conversations.get(tenant, conv.id).message_count == total
    msgs = mem.conversations.page(tenant, conv.id, limit=total)
    assert [m.seq for m in msgs] == list(range(1, total + 1))
    # Each writer's messages appear in the order it appended them; a batch stays together.
    for w in range(writers):
        mine = [m for m in msgs if m.content.startswith(f"{w}:")]
        keys = [tuple(int(x) for x in m.content.split(":")[1:]) for m in mine]
        assert keys == sorted(keys)
        for i in range(9, per_writer, 10):
            batch = [m.seq for m in mine if m.content.startswith(f"{w}:{i}:")]
            assert batch == list(range(batch[0], batch[0] + 3))
    # Server time stamps never go backwards along the seqs.
    stamps = [m.created_at for m in msgs]
    assert stamps == sorted(stamps)


def test_idempotent_append(mem: Memory, tenant: str) -> None:
    conv = conv_of(mem, tenant)
    first = mem.conversations.append(
        tenant, conv, [NewMessage("user", "a"), NewMessage("user", "b")], idempotency_key="k1"
    )
    again = mem.conversations.append(
        tenant, conv, [NewMessage("user", "a"), NewMessage("user", "b")], idempotency_key="k1"
    )
    assert first == again == [1, 2]
    assert mem.conversations.get(tenant, conv.id).message_count == 2


def test_ttl_expires_every_key_of_a_conversation(mem: Memory, tenant: str) -> None:
    conv = conv_of(mem, tenant, ttl_s=1)
    mem.conversations.append(tenant, conv, [NewMessage("user", "soon gone")])
    mem.conversations.mark(tenant, conv.id, 1, on=True)
    mem.vectors.add(tenant, conv.id, conv.user_id, [1], np.ones((1, 8), dtype=np.float32))
    keys = Keys(tenant).conversation_keys(conv.id)
    assert mem.redis.exists(*keys) == len(keys) - 1  # all but the idempotency hash
    time.sleep(1.3)
    assert mem.redis.exists(*keys) == 0
    assert mem.conversations.find(tenant, conv.id) is None
    with pytest.raises(NotFoundError):
        mem.conversations.append(tenant, conv, [NewMessage("user", "late")])
    items, _ = mem.conversations.list_page(tenant, user_id="alice")
    assert items == []
    assert mem.conversations.key_moments(tenant, "alice") == []
    assert mem.vectors.search(tenant, "alice", np.ones(8, dtype=np.float32), 5) == []


def test_pruning_drops_expired_conversations_from_every_list(mem: Memory, tenant: str) -> None:
    gone = conv_of(mem, tenant, ttl_s=1)
    kept = conv_of(mem, tenant)
    for c in (gone, kept):
        mem.conversations.append(tenant, c, [NewMessage("user", "m1"), NewMessage("user", "m2")])
        mem.conversations.mark(tenant, c.id, 2, on=True)
    k = Keys(tenant)
    lists = (k.convs, k.user_convs("alice"))
    mem.conversations.prune_expired()  # nothing of this tenant has expired yet
    assert all(mem.redis.zcard(index) == 2 for index in lists)
    time.sleep(1.3)
    # Expired, but still listed (a sorted set has no TTL per member) until pruned.
    assert all(mem.redis.zscore(index, gone.id) is not None for index in lists)
    assert mem.conversations.prune_expired() >= 1
    for index in lists:
        assert [m.decode() for m in mem.redis.zrange(index, 0, -1)] == [kept.id]
    moments = [m.decode() for m in mem.redis.zrange(k.user_moments("alice"), 0, -1)]
    assert moments == [f"{kept.id}:2"]
    assert [c.id for c in mem.conversations.list_page(tenant, user_id="alice")[0]] == [kept.id]
    # Nothing more to do the second time round for this tenant; the live one is untouched.
    mem.conversations.prune_expired()
    assert mem.redis.zcard(k.convs) == 1
    assert mem.conversations.get(tenant, kept.id).message_count == 2


def test_activity_renews_the_ttl(mem: Memory, tenant: str) -> None:
    conv = conv_of(mem, tenant, ttl_s=2)
    for _ in range(3):  # 3 × 1.1 s > 2 s: alive only because each append renews it
        time.sleep(1.1)
        mem.conversations.append(tenant, conv, [NewMessage("user", "still here")])
    assert mem.conversations.get(tenant, conv.id).message_count == 3
    assert mem.conversations.touch(tenant, conv.id, conv.user_id, ttl_s=1)
    assert mem.conversations.get(tenant, conv.id).ttl_s == 1
    time.sleep(1.3)
    assert mem.conversations.find(tenant, conv.id) is None


def test_delete_removes_messages_vectors_and_moments(mem: Memory, tenant: str) -> None:
    conv = conv_of(mem, tenant)
    other = conv_of(mem, tenant)
    for c in (conv, other):
        mem.conversations.append(tenant, c, [NewMessage("user", "m1"), NewMessage("user", "m2")])
        mem.vectors.add(tenant, c.id, "alice", [1, 2], np.eye(2, 4, dtype=np.float32))
        mem.conversations.mark(tenant, c.id, 2, on=True, note="eureka")
    mem.conversations.delete(tenant, conv.id)
    mem.vectors.drop(tenant, conv.id)
    assert list(mem.redis.scan_iter(match=f"*{conv.id}*")) == []
    assert mem.conversations.find(tenant, conv.id) is None
    moments = mem.conversations.key_moments(tenant, "alice")
    assert [(m.conversation_id, m.seq, m.note) for m in moments] == [(other.id, 2, "eureka")]
    hits = mem.vectors.search(tenant, "alice", np.array([1, 0, 0, 0], dtype=np.float32), 10)
    assert {h.conversation_id for h in hits} == {other.id}
    with pytest.raises(NotFoundError):
        mem.conversations.delete(tenant, conv.id)


def test_another_tenant_sees_nothing(mem: Memory, tenant: str) -> None:
    conv = conv_of(mem, tenant)
    mem.conversations.append(tenant, conv, [NewMessage("user", "secret")])
    intruder = tenant + "x"
    assert mem.conversations.find(intruder, conv.id) is None
    with pytest.raises(NotFoundError):
        mem.conversations.get(intruder, conv.id)
    with pytest.raises(NotFoundError):
        mem.conversations.append(intruder, conv, [NewMessage("user", "injected")])
    with pytest.raises(NotFoundError):
        mem.conversations.delete(intruder, conv.id)
    with pytest.raises(NotFoundError):
        mem.conversations.mark(intruder, conv.id, 1, on=True)
    assert mem.conversations.list_page(intruder)[0] == []
    assert mem.conversations.get(tenant, conv.id).message_count == 1


def test_list_pages_most_recent_first(mem: Memory, tenant: str) -> None:
    convs = [conv_of(mem, tenant, user="bob" if i % 2 else "carol") for i in range(7)]
    # Activity reorders: the first conversation becomes the most recent.
    time.sleep(0.01)
    mem.conversations.append(tenant, convs[0], [NewMessage("user", "bump")])
    seen, cursor = [], None
    while True:
        items, cursor = mem.conversations.list_page(tenant, limit=3, cursor=cursor)
        seen += [c.id for c in items]
        if cursor is None:
            break
    assert len(seen) == len(set(seen)) == 7
    assert seen[0] == convs[0].id
    bobs, _ = mem.conversations.list_page(tenant, user_id="bob", limit=50)
    assert {c.id for c in bobs} == {c.id for i, c in enumerate(convs) if i % 2}
    with pytest.raises(SpecError):
        mem.conversations.list_page(tenant, cursor="!!")


def test_key_moments_and_summary(mem: Memory, tenant: str) -> None:
    conv = conv_of(mem, tenant)
    mem.conversations.append(tenant, conv, [NewMessage("user", f"m{i}") for i in range(5)])
    mem.conversations.mark(tenant, conv.id, 2, on=True, note="found it")
    mem.conversations.mark(tenant, conv.id, 4, on=True)
    assert [m.seq for m in mem.conversations.key_moments(tenant, "alice")] == [4, 2]
    mem.conversations.mark(tenant, conv.id, 4, on=False)
    (only,) = mem.conversations.key_moments(tenant, "alice")
    assert only.seq == 2 and only.key_moment and only.note == "found it"
    with pytest.raises(NotFoundError, match="no message 9"):
        mem.conversations.mark(tenant, conv.id, 9, on=True)
    assert mem.conversations.set_summary(tenant, conv.id, upto=3, summary="s3", tokens=1, model="m")
    assert not mem.conversations.set_summary(
        tenant, conv.id, upto=2, summary="older", tokens=1, model="m"
    )
    got = mem.conversations.get(tenant, conv.id)
    assert (got.summary, got.summary_upto) == ("s3", 3)
