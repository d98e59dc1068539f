"""Embedding queued messages with the real tiny-embed model, in batches, exactly once."""

from __future__ import annotations

import uuid

import numpy as np

from app.memory.embedding import drain, fit_text, pending_count
from app.memory.keys import EMBED_PENDING, pending_member
from app.memory.service import Memory
from app.memory.store import NewMessage
from models.tiny import _WORDS
from workers.runtime import LlamaCppRuntime, RunControl


def test_drain_embeds_queued_messages_in_batches(
    mem: Memory, tenant: str, embed_runtime: LlamaCppRuntime
) -> None:
    conv = mem.conversations.create(tenant, uuid.uuid4().hex, "u1", ttl_s=600)
    texts = [f"{_WORDS[i]} {_WORDS[i + 1]} {_WORDS[i + 2]}" for i in range(70)]
    texts[40] = "word " * 3000  # longer than tiny-embed's 512 tokens: embedded cut to fit
    mem.conversations.append(tenant, conv, [NewMessage("user", t) for t in texts])
    batches: list[int] = []

    def embed(batch: list[str]) -> np.ndarray:
        batches.append(len(batch))
        fitted = [fit_text(t, embed_runtime.count_tokens, embed_runtime.n_ctx - 4) for t in batch]
        out = embed_runtime.embed({"texts": fitted, "normalize": True}, RunControl())
        return np.asarray(out["vectors"], dtype=np.float32)

    # The queue is shared: other tests' messages are embedded too, oldest first.
    assert drain(mem, embed, batches=10_000) >= 70
    assert pending_count(mem) == 0
    assert max(batches) <= mem.settings.memory_embed_batch and len(batches) >= 3
    assert mem.conversations.get(tenant, conv.id).embedded_count == 70
    # Each message is found by its own text's vector.
    (vector,) = embed([texts[5]])
    (hit, *_) = mem.vectors.search(tenant, "u1", vector, 3)
    assert (hit.conversation_id, hit.seq) == (conv.id, 6)
    assert hit.score > 0.999
    # Queued again (a batch whose lease ran out after it was stored): nothing doubles.
    mem.redis.zadd(EMBED_PENDING, {pending_member(tenant, conv.id, s): 0 for s in (1, 2, 3)})
    mem.conversations.append(tenant, conv, [NewMessage("user", "one more")])
    drain(mem, embed, batches=10_000)
    assert mem.conversations.get(tenant, conv.id).embedded_count == 71
