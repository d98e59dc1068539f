"""Embedding messages on the embedding model's pool, and query embeddings on demand.

New messages are queued atomically with their append (``corral:mem:_embed:pending``, a
ZSET of "tenant|cid|seq"). A *kick* — at most one every two seconds — sends the task
``corral.memory.embed`` to the embedding model's queue ``model.<name>``; the worker that
takes it (the pool that has the model loaded) drains the queue in batches of
``CORRAL_MEMORY_EMBED_BATCH``: it leases a batch, embeds it with one llama.cpp call,
stores the vectors and removes the batch. A worker that dies mid-batch leaves the lease to
expire; the next kick takes the batch again (storing a vector twice is a no-op).

Queries (semantic search from the API or a chat step) go as ``corral.memory.embed_query``
to the same queue with a reply key; the caller waits on that key (BLPOP) for the vector.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Callable, Sequence
from typing import cast

import numpy as np

from app.core.errors import ConfigError, ServiceUnavailable
from app.memory.keys import EMBED_KICK, EMBED_PENDING, ROOT, parse_pending
from app.memory.service import Memory, embed_model
from app.memory.vectors import Vectors
from app.workflows.names import EMBED_QUERY_TASK, EMBED_TASK, queue_for

log = logging.getLogger(__name__)

LEASE_MS = 60_000
KICK_EVERY_MS = 2000
BATCHES_PER_TASK = 16

EmbedFn = Callable[[list[str]], Vectors]

_CLAIM = """
redis.replicate_commands()
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local items = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, ARGV[1])
for _, m in ipairs(items) do redis.call('ZADD', KEYS[1], 'XX', now + ARGV[2], m) end
return items
"""


def _send(task: str, args: list[object], model: str, expires: float | None = None) -> None:
    from app.workflows.dispatch import producer

    producer().send_task(task, args=args, queue=queue_for(model), expires=expires)


def kick(mem: Memory) -> bool:
    """Ask the embedding pool to drain the pending queue; False when embedding is off."""
    entry = embed_model(mem.settings)
    if entry is None:
        return False
    if mem.redis.set(EMBED_KICK, 1, nx=True, px=KICK_EVERY_MS):
        try:
            _send(EMBED_TASK, [], entry.name)
        except Exception as exc:  # the broker is down: the next append kicks again
            mem.redis.delete(EMBED_KICK)
            log.warning("could not send %s: %s", EMBED_TASK, exc)
    return True


def embedding_on(mem: Memory) -> bool:
    return embed_model(mem.settings) is not None


def fit_text(text: str, count_tokens: Callable[[str], int], limit: int) -> str:
    """``text`` cut (at the end) until it is at most ``limit`` tokens."""
    text = text or " "
    n = count_tokens(text)
    while n > limit and len(text) > 1:
        text = text[: max(1, int(len(text) * limit / n * 0.9))]
        n = count_tokens(text)
    return text


def drain(mem: Memory, embed: EmbedFn, *, batches: int = BATCHES_PER_TASK) -> int:
    """Embed pending messages, a batch per model call; returns how many vectors were stored.

    Runs on the embedding model's worker (``embed`` calls its loaded model). When more is
    pending after ``batches`` batches it kicks again, so query embeddings waiting on the
    same queue are not starved.
    """
    mem.redis.delete(EMBED_KICK)
    claim = mem.redis.register_script(_CLAIM)
    stored = 0
    for _ in range(batches):
        raw = cast(
            list[bytes],
            claim(keys=[EMBED_PENDING], args=[mem.settings.memory_embed_batch, LEASE_MS]),
        )
        if not raw:
            return stored
        members = [m.decode() for m in raw]
        groups: dict[tuple[str, str], list[int]] = {}
        for member in members:
            tenant, cid, seq = parse_pending(member)
            groups.setdefault((tenant, cid), []).append(seq)
        texts: list[str] = []
        plan: list[tuple[str, str, str, list[int]]] = []
        for (tenant, cid), seqs in groups.items():
            conv = mem.conversations.find(tenant, cid)
            if conv is None:  # deleted or expired since: nothing to embed
                continue
            found = mem.conversations.messages(tenant, cid, seqs)
            plan.append((tenant, cid, conv.user_id, [m.seq for m in found]))
            texts += [mem.settings.memory_document_prefix + m.content for m in found]
        if texts:
            vectors = embed(texts)
            at = 0
            for tenant, cid, user_id, seqs in plan:
                part = vectors[at : at + len(seqs)]
                at += len(seqs)
                stored += mem.vectors.add(tenant, cid, user_id, seqs, part)
        mem.redis.zrem(EMBED_PENDING, *members)
    if mem.redis.zcard(EMBED_PENDING):
        kick(mem)
    return stored


def pending_count(mem: Memory) -> int:
    return int(mem.redis.zcard(EMBED_PENDING))


def answer_query(mem: Memory, reply_key: str, texts: Sequence[str], embed: EmbedFn) -> None:
    """Embed query texts and push the vectors (or the error) to ``reply_key``."""
    try:
        vectors = embed(list(texts))
        body = {"vectors": vectors.tolist()}
    except Exception as exc:
        log.warning("query embedding failed: %s", exc)
        body = {"error": f"{type(exc).__name__}: {exc}"}
    pipe = mem.redis.pipeline()
    pipe.rpush(reply_key, json.dumps(body))
    pipe.expire(reply_key, 60)
    pipe.execute()


def embed_queries(
    mem: Memory, texts: Sequence[str], timeout_s: float | None = None, *, documents: bool = False
) -> Vectors:
    """Vectors of ``texts`` from the embedding pool (``ServiceUnavailable`` if none answers):
    as queries, or with ``documents`` as stored texts (each prefix as configured)."""
    entry = embed_model(mem.settings)
    if entry is None:
        raise ConfigError(
            "semantic search needs an embedding model: set CORRAL_MEMORY_EMBED_MODEL "
            "(or leave it 'auto' with an embed model's GGUF present)"
        )
    timeout_s = timeout_s or mem.settings.memory_embed_timeout_s
    reply_key = f"{ROOT}:_rpc:{uuid.uuid4().hex}"
    prefix = mem.settings.memory_document_prefix if documents else mem.settings.memory_query_prefix
    prefixed = [prefix + t for t in texts]
    try:
        _send(EMBED_QUERY_TASK, [reply_key, prefixed], entry.name, expires=timeout_s)
    except Exception as exc:
        raise ServiceUnavailable(f"cannot reach the broker to embed the query: {exc}") from exc
    deadline = time.monotonic() + timeout_s
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            mem.redis.delete(reply_key)
            raise ServiceUnavailable(
                f"no worker of embed model {entry.name!r} answered within {timeout_s:g} s; "
                f"start one with `corral worker --model {entry.name}`"
            )
        got = cast(tuple[bytes, bytes] | None, mem.redis.blpop([reply_key], timeout=min(left, 4.0)))
        if got is not None:
            body = json.loads(got[1])
            if "error" in body:
                raise ServiceUnavailable(f"embedding the query failed: {body['error']}")
            return np.asarray(body["vectors"], dtype=np.float32)
