"""The rolling summary: folding the oldest turns of a conversation into it.

Where it runs (``CORRAL_MEMORY_SUMMARY_MODEL``):

- empty (the default) or the chat step's own model: **inline**, on the worker that runs
  the chat step, with the model it has loaded, before it answers — the reply already
  sees the new summary;
- another chat model: the chat step answers with the turns that fit (recalled messages
  may bring back older ones) and **enqueues** a one-step workflow on that model's queue —
  a ``chat`` step with ``memory.task: summarise`` — whose worker folds the turns and
  stores the summary; a Redis lock keeps one such workflow per conversation at a time.

Folding reads the turns in chunks that fit the summarising model's window, each call
rewriting the summary to cover one more chunk, and stores the result only if it moves
the summary forward (concurrent folds cannot move it back).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from app.core.config import Settings
from app.memory.context import PromptMessage, Tokenizer, message_tokens
from app.memory.keys import Keys, key_id_of
from app.memory.schemas import Conversation, Message
from app.memory.service import Memory

INSTRUCTIONS = (
    "You keep the running summary of a conversation. Rewrite the summary so that it also "
    "covers the new messages: keep names, facts, decisions, preferences and open "
    "questions; drop small talk. Reply with the summary only."
)
LOCK_S = 600

# (messages, max_tokens) → the model's reply
ChatFn = Callable[[list[PromptMessage], int], str]


@dataclass
class Folded:
    """What one fold did."""

    upto: int
    summary: str
    tokens: int
    calls: int
    stored: bool


def prompt(summary: str | None, messages: list[Message]) -> list[PromptMessage]:
    transcript = "\n".join(f"{m.role}: {m.content}" for m in messages)
    current = f"Current summary:\n{summary}\n\n" if summary else ""
    return [
        {"role": "system", "content": INSTRUCTIONS},
        {"role": "user", "content": f"{current}New messages:\n{transcript}"},
    ]


def fold(
    mem: Memory,
    tok: Tokenizer,
    tenant: str,
    conv: Conversation,
    upto: int,
    chat: ChatFn,
    *,
    window: int,
    max_tokens: int,
) -> Folded:
    """Fold messages ``conv.summary_upto + 1 … upto`` into the summary and store it."""
    budget = window - max_tokens
    summary = conv.summary or ""
    calls = 0

    def run(chunk: list[Message]) -> None:
        nonlocal summary, calls
        messages = prompt(summary or None, chunk)
        if tok.count_chat_tokens(messages) > budget:
            if len(chunk) > 1:
                half = len(chunk) // 2
                run(chunk[:half])
                run(chunk[half:])
                return
            # One message too long for the window on its own: keep its beginning.
            only = chunk[0]
            room = max(1, budget - tok.count_chat_tokens(prompt(summary or None, [])) - 8)
            keep = len(only.content) * room // max(message_tokens(only, tok), 1) * 9 // 10
            clipped = only.model_copy(update={"content": only.content[: max(1, keep)]})
            messages = prompt(summary or None, [clipped])
        summary = chat(messages, max_tokens).strip()
        calls += 1

    seq = conv.summary_upto + 1
    chunk: list[Message] = []
    used = 0
    while seq <= upto:
        page = mem.conversations.messages(tenant, conv.id, range(seq, min(upto, seq + 63) + 1))
        seq += 64
        for m in page:
            cost = message_tokens(m, tok) + 8
            if chunk and used + cost > budget // 2:
                run(chunk)
                chunk, used = [], 0
            chunk.append(m)
            used += cost
    if chunk:
        run(chunk)
    tokens = tok.count_tokens(summary)
    stored = mem.conversations.set_summary(
        tenant, conv.id, upto=upto, summary=summary, tokens=tokens, model=tok.name
    )
    return Folded(upto, summary, tokens, calls, stored)


def enqueue(
    mem: Memory, tenant: str, conv: Conversation, upto: int, settings: Settings
) -> str | None:
    """Queue a summary workflow on ``CORRAL_MEMORY_SUMMARY_MODEL``; None if one is queued."""
    from app.workflows import service
    from app.workflows.spec import validate_workflow
    from models.catalog import load_catalog

    lock = Keys(tenant).summarising(conv.id)
    if not mem.redis.set(lock, upto, nx=True, ex=LOCK_S):
        return None
    raw = {
        "name": f"memory summary {conv.id}",
        "steps": [
            {
                "id": "summarise",
                "kind": "chat",
                "model": settings.memory_summary_model,
                "input": {
                    "conversation_id": conv.id,
                    "max_tokens": settings.memory_summary_max_tokens,
                    "temperature": 0,
                    "memory": {"task": "summarise", "upto": upto},
                },
            }
        ],
    }
    try:
        validated = validate_workflow(raw, load_catalog(settings.catalog_path), settings)
        run = service.submit_validated(validated, api_key_id=key_id_of(tenant))
    except Exception:
        mem.redis.delete(lock)
        raise
    return run.id


def release(mem: Memory, tenant: str, cid: str) -> None:
    mem.redis.delete(Keys(tenant).summarising(cid))
