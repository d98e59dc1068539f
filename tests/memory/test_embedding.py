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


def test_beat_sweep_rekicks_a_lost_embedding_task(mem: Memory, tenant: str, platform) -> None:  # type: ignore[no-untyped-def]
    """Messages queued with no embed task on its way are embedded after beat's sweep."""
    import subprocess
    import sys
    import time

    from app.core.config import settings_env
    from app.memory.keys import EMBED_KICK

    conv = mem.conversations.create(tenant, uuid.uuid4().hex, "u1", ttl_s=600)
    # Appended straight into the store: queued for embedding, but no task is sent (as if
    # the kick's message had been lost).
    mem.redis.delete(EMBED_KICK)
    mem.conversations.append(tenant, conv, [NewMessage("user", "the lost embedding")])
    time.sleep(1.0)
    assert pending_count(mem) >= 1
    assert mem.conversations.get(tenant, conv.id).embedded_count == 0
    sweep = subprocess.run(
        [sys.executable, "-c", "from workers.tasks import memory_sweep_task as t; print(t())"],
        env=settings_env(platform.settings),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert sweep.returncode == 0, sweep.stderr
    assert int(sweep.stdout.strip().splitlines()[-1]) >= 1
    deadline = time.monotonic() + 30
    while mem.conversations.get(tenant, conv.id).embedded_count < 1:
        assert time.monotonic() < deadline, "the platform's tiny-embed pool never embedded it"
        time.sleep(0.1)
