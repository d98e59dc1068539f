"""The consolidate task of a chat step: one conversation's new turns become long-term memory.

A consolidation run (:mod:`app.memory.consolidate`) sends each conversation as a ``chat``
step with ``memory.task: consolidate`` to the consolidation model's pool. The step reads
the messages after the conversation's watermark (up to ``memory.upto``), in chunks that
fit the model's context; for each chunk it asks the model, under a JSON-schema grammar,
for a summary and facts, embeds them on the embedding pool, and commits them with the
watermark (:func:`app.memory.learn.commit`). A chunk that another run committed first is
left alone, so a retried or duplicated step learns nothing twice.
"""

from __future__ import annotations

import time
from typing import Any

from app.core.errors import StepInputError
from app.memory import embedding, learn
from app.memory.consolidate import release
from app.memory.context import message_tokens
from app.memory.options import MemoryOptions
from app.memory.schemas import Block, Conversation, Message
from app.memory.service import Memory
from app.workflows.structured import schema_grammar
from workers.runtime import ModelRuntime, RunControl

PAGE = 64


def consolidate(
    mem: Memory,
    tenant: str,
    conv: Conversation | None,
    runtime: ModelRuntime,
    params: dict[str, Any],
    opts: MemoryOptions,
    control: RunControl,
) -> dict[str, Any]:
    """Consolidate one conversation up to ``opts.upto`` with the sampling of the step's
    (validated) input ``params``; returns the step's output."""
    if conv is None:
        raise StepInputError("input.memory.task consolidate needs a conversation_id")
    started = time.perf_counter()
    settings = mem.settings
    upto = min(opts.upto or conv.message_count, conv.message_count)
    blocks = mem.blocks.all(tenant, conv.user_id)
    names = learn.blocks_for(blocks)
    grammar = schema_grammar(learn.schema(names, settings.consolidate_max_facts))
    max_tokens = int(params["max_tokens"])
    embed = _embedder(mem)
    report: dict[str, Any] = {
        "conversation_id": conv.id,
        "user_id": conv.user_id,
        "run": opts.run,
        "from_seq": conv.consolidated_upto + 1,
        "upto": conv.consolidated_upto,
        "chunks": [],
        "facts": [],
        "entries": 0,
        "merged": 0,
        "block_edits": [],
        "block_skipped": [],
        "errors": [],
        "prompt_tokens": 0,
        "completion_tokens": 0,
    }
    mark = conv.consolidated_upto
    while mark < upto:
        chunk = _chunk(mem, tenant, conv, runtime, blocks, mark, upto, max_tokens)
        request = {**params, "messages": learn.prompt(blocks, chunk), "grammar": grammar}
        out = runtime.chat(request, control)
        report["prompt_tokens"] += int(out["prompt_tokens"])
        report["completion_tokens"] += int(out["completion_tokens"])
        learnt = learn.parse(str(out["text"]), names)
        vectors = learn.embed_learnt(learnt, embed)
        done = learn.commit(
            mem,
            tenant,
            conv.id,
            conv.user_id,
            expected=mark,
            upto=chunk[-1].seq,
            learnt=learnt,
            vectors=vectors,
            run_id=opts.run,
        )
        report["chunks"].append(
            {"from_seq": mark + 1, "to_seq": chunk[-1].seq, "stale": done.stale}
        )
        if done.stale:  # another run consolidated these turns first: start from its mark
            fresh = mem.conversations.get(tenant, conv.id)
            mark = fresh.consolidated_upto
            continue
        if learnt.error:
            report["errors"].append({"from_seq": mark + 1, "error": learnt.error})
        report["facts"] += [
            {"text": f.text, "kind": f.kind, "block": f.block} for f in learnt.facts
        ]
        report["entries"] += len(done.entries)
        report["merged"] += len(done.merged)
        report["block_edits"] += [{"block": b, "text": t} for b, t in done.block_edits]
        report["block_skipped"] += [
            {"block": b, "text": t, "why": why} for b, t, why in done.block_skipped
        ]
        mark = chunk[-1].seq
    report["upto"] = max(mark, report["upto"])
    if opts.run:  # done with it: a later run may take its newer turns at once
        release(mem, opts.run, tenant, conv.id)
    report["timings"] = {"total_ms": round((time.perf_counter() - started) * 1000, 3)}
    report["text"] = f"consolidated messages {report['from_seq']} to {report['upto']}"
    return report


def _embedder(mem: Memory) -> learn.EmbedFn | None:
    if not embedding.embedding_on(mem):
        return None

    def embed(texts: list[str]) -> Any:
        return embedding.embed_queries(mem, texts, documents=True)

    return embed


def _chunk(
    mem: Memory,
    tenant: str,
    conv: Conversation,
    runtime: ModelRuntime,
    blocks: dict[str, Block],
    mark: int,
    upto: int,
    max_tokens: int,
) -> list[Message]:
    """The messages after ``mark`` (up to ``upto``) that fit the model's context with the
    instructions and the blocks; at least one (cut to fit when it alone is too long)."""
    fixed = runtime.count_chat_tokens(learn.prompt(blocks, [Message.model_validate(_PLACEHOLDER)]))
    budget = runtime.n_ctx - max_tokens - fixed - 16
    chunk: list[Message] = []
    used = 0
    seq = mark + 1
    while seq <= upto:
        page = mem.conversations.messages(
            tenant, conv.id, range(seq, min(upto, seq + PAGE - 1) + 1)
        )
        seq += PAGE
        for m in page:
            cost = message_tokens(m, runtime) + 8
            if chunk and used + cost > budget:
                return chunk
            if not chunk and cost > budget:
                keep = len(m.content) * max(budget - 8, 1) // cost * 9 // 10
                return [m.model_copy(update={"content": m.content[: max(1, keep)]})]
            chunk.append(m)
            used += cost
    if not chunk:
        raise StepInputError(
            f"conversation {conv.id!r} has no messages {mark + 1} to {upto} (deleted meanwhile)"
        )
    return chunk


_PLACEHOLDER = {
    "conversation_id": "0" * 32,
    "seq": 1,
    "role": "user",
    "content": "",
    "created_at": "2026-01-01T00:00:00Z",
}
