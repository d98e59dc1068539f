"""Context assembly with the real tiny-chat tokenizer: never over the window, parts add up,
overflow folds into the summary; and a whole memory chat step run in-process."""

from __future__ import annotations

import random
import uuid
from collections.abc import Iterator

import pytest

from app.core.config import Settings, use_settings
from app.core.errors import StepInputError
from app.memory import summary
from app.memory.context import ContextRequest, assemble
from app.memory.schemas import SearchHit
from app.memory.service import Memory, get_memory
from app.memory.store import NewMessage
from app.store.tables import utcnow
from app.workflows.engine import StepWork
from app.workflows.spec import ChatInput
from models.tiny import _WORDS
from workers.memory import memory_chat
from workers.runtime import LlamaCppRuntime, RunControl


def words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(n))


def filled(mem: Memory, tenant: str, rt: LlamaCppRuntime, n: int, seed: int = 0):
    rng = random.Random(seed)
    conv = mem.conversations.create(tenant, uuid.uuid4().hex, "u1", ttl_s=600)
    msgs = []
    for i in range(n):
        text = words(rng, rng.randint(3, 120))
        # Half the messages carry no stored count: assembly counts them itself.
        counted = rt.count_tokens(text) if i % 2 else None
        msgs.append(NewMessage("user" if i % 2 == 0 else "assistant", text, counted, rt.name))
    mem.conversations.append(tenant, conv, msgs, embed=False)
    return mem.conversations.get(tenant, conv.id)


def request(conv, tenant: str, window: int, max_tokens: int, **kw) -> ContextRequest:
    return ContextRequest(
        tenant=tenant,
        conversation=conv,
        system_prompt=kw.pop("system_prompt", "You are terse."),
        blocks=kw.pop("blocks", None),
        tools_text=kw.pop("tools_text", None),
        pinned=kw.pop("pinned", [{"role": "user", "content": "And now?"}]),
        before_seq=kw.pop("before_seq", conv.message_count + 1),
        window=window,
        max_tokens=max_tokens,
        **kw,
    )


def test_count_chat_tokens_is_what_llama_cpp_sends(chat_runtime: LlamaCppRuntime) -> None:
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "hello world, the quick brown fox"},
        {"role": "assistant", "content": "jump over the lazy dog"},
        {"role": "user", "content": "again?"},
    ]
    inp = ChatInput.model_validate({"messages": messages, "max_tokens": 2}).model_dump()
    out = chat_runtime.chat(inp, RunControl())
    assert out["prompt_tokens"] == chat_runtime.count_chat_tokens(messages)


@pytest.mark.parametrize(
    ("window", "max_tokens"), [(256, 32), (700, 300), (2048, 64), (8192, 512), (8192, 7900)]
)
def test_context_never_exceeds_the_window(
    mem: Memory, tenant: str, chat_runtime: LlamaCppRuntime, window: int, max_tokens: int
) -> None:
    conv = filled(mem, tenant, chat_runtime, 400, seed=window)
    mem.blocks.put(tenant, "u1", "user", words(random.Random(1), 40), source="api")
    hits = [
        SearchHit(score=0.9 - i / 100, message=m)
        for i, m in enumerate(mem.conversations.messages(tenant, conv.id, range(1, 400, 37)))
    ]
    req = request(
        conv,
        tenant,
        window,
        max_tokens,
        blocks=mem.blocks.all(tenant, "u1"),
        semantic=hits,
        semantic_k=4,
    )
    asm = assemble(mem.conversations, chat_runtime, req)
    exact = chat_runtime.count_chat_tokens(asm.messages)
    assert exact == asm.tokens["prompt"] <= window - max_tokens
    parts = (
        "system",
        "blocks",
        "summary",
        "archive",
        "semantic",
        "tools",
        "recent",
        "input",
        "tool_rounds",
    )
    assert sum(asm.tokens[p] for p in parts) + asm.tokens["template"] == exact
    assert asm.tokens["budget"] == window - max_tokens
    # The latest turns are a contiguous run that ends right before the turn being answered.
    seqs = [m.seq for m in asm.recent]
    assert seqs == list(range(400 - len(seqs) + 1, 401))
    assert asm.overflow and asm.fold_upto is not None and asm.fold_upto <= 400
    assert len(asm.semantic) <= 4
    assert not {h.message.seq for h in asm.semantic} & set(seqs)
    if window - max_tokens > 1000:  # room enough: something recalled, something recent
        assert asm.semantic and asm.recent


def test_a_turn_that_cannot_fit_is_an_input_error(
    mem: Memory, tenant: str, chat_runtime: LlamaCppRuntime
) -> None:
    conv = filled(mem, tenant, chat_runtime, 5)
    huge = [{"role": "user", "content": words(random.Random(2), 400)}]
    with pytest.raises(StepInputError, match="over the 256-token window"):
        assemble(mem.conversations, chat_runtime, request(conv, tenant, 256, 32, pinned=huge))


def test_overflow_folds_into_the_summary(
    mem: Memory, tenant: str, chat_runtime: LlamaCppRuntime
) -> None:
    conv = filled(mem, tenant, chat_runtime, 120, seed=9)
    asm = assemble(mem.conversations, chat_runtime, request(conv, tenant, 1024, 64))
    assert asm.overflow and asm.fold_upto is not None

    def chat(messages, max_tokens):
        inp = ChatInput.model_validate(
            {"messages": messages, "max_tokens": max_tokens, "temperature": 0}
        ).model_dump()
        out = chat_runtime.chat(inp, RunControl())
        assert out["prompt_tokens"] + max_tokens <= 1024
        return out["text"]

    done = summary.fold(
        mem, chat_runtime, tenant, conv, asm.fold_upto, chat, window=1024, max_tokens=48
    )
    assert done.stored and done.calls >= 2 and done.summary
    conv = mem.conversations.get(tenant, conv.id)
    assert conv.summary_upto == asm.fold_upto and conv.summary == done.summary
    after = assemble(mem.conversations, chat_runtime, request(conv, tenant, 1024, 64))
    assert after.tokens["summary"] > 0
    assert after.tokens["prompt"] <= 1024 - 64
    assert all(m.seq > conv.summary_upto for m in after.recent)


@pytest.fixture
def no_embedding(settings: Settings) -> Iterator[Settings]:
    with use_settings(settings.model_copy(update={"memory_embed_model": ""})) as s:
        yield s


def work_for(inp: dict, step_id: str = "reply") -> StepWork:
    # No workflow row: the step runs as tenant "_" (work submitted without a key).
    return StepWork(
        uuid.uuid4().hex,
        "wf" + uuid.uuid4().hex[:10],
        step_id,
        "chat",
        "tiny-chat",
        1,
        inp,
        None,
        0.0,
        utcnow(),
    )


def test_memory_chat_step_in_process(no_embedding: Settings, chat_runtime: LlamaCppRuntime) -> None:
    mem = get_memory()
    conv = filled(mem, "_", chat_runtime, 200, seed=11)
    raw = {
        "conversation_id": conv.id,
        "messages": [{"role": "user", "content": "what did we say"}],
        "max_tokens": 200,  # room for the forced call's JSON
        "temperature": 0,
        "memory": {"context_tokens": 1500},
        "tools": ["memory_append"],
        "tool_choice": "memory_append",
        "max_tool_rounds": 1,
    }
    params = ChatInput.model_validate(raw).model_dump()
    work = work_for(raw)
    out = memory_chat(work, chat_runtime, params, RunControl())
    report = out["memory"]
    assert report["appended"] == [201]
    assert report["summary"]["action"] == "inline"
    for rnd in report["rounds"]:
        assert rnd["prompt_tokens"] + 200 <= 1500
        assert rnd["parts"]["prompt"] == rnd["prompt_tokens"]
    (call,) = out["tool_calls"]
    assert call["ok"] and call["tool"] == "memory_append"
    block = mem.blocks.get("_", "u1", call["args"]["block"])
    assert block.value.endswith(call["args"]["text"])
    assert report["reply_seq"] == 202
    stored = mem.conversations.get("_", conv.id)
    assert stored.message_count == 202 and stored.summary_upto > 0
    # A retried attempt appends nothing twice and repeats no edit.
    again = memory_chat(work, chat_runtime, params, RunControl())
    assert again["memory"]["appended"] == [201] and again["memory"]["reply_seq"] == 202
    assert again["tool_calls"][0].get("replayed") is True
    assert mem.blocks.get("_", "u1", call["args"]["block"]).version == block.version


def test_tools_without_a_conversation(
    no_embedding: Settings, chat_runtime: LlamaCppRuntime
) -> None:
    """A plain chat step may still edit the user's memory: tools with a user_id."""
    mem = get_memory()
    user = f"solo{uuid.uuid4().hex[:6]}"
    mem.blocks.put("_", user, "project", "Goal: ship", source="api")
    raw = {
        "user_id": user,
        "messages": [{"role": "user", "content": "we changed the goal"}],
        "max_tokens": 200,
        "temperature": 0,
        "tools": ["memory_replace"],
        "tool_choice": "required",
        "max_tool_rounds": 0,
    }
    params = ChatInput.model_validate(raw).model_dump()
    out = memory_chat(work_for(raw), chat_runtime, params, RunControl())
    (call,) = out["tool_calls"]
    assert call["ok"] and call["args"]["block"] == "project"
    assert call["args"]["old"] in ("Goal: ship", "Goal:", "ship")
    assert mem.blocks.get("_", user, "project").value == call["result"]["value"]
    assert out["memory"]["conversation_id"] is None and len(out["memory"]["rounds"]) == 1
