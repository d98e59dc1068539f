"""The memory tool-call protocol: parsing model output, executing calls, forcing a call with
a grammar on the real tiny model."""

from __future__ import annotations

import json
import uuid

import numpy as np
import pytest

from app.memory import tools
from app.memory.service import Memory
from app.memory.store import NewMessage
from app.memory.tools import ToolContext, execute, parse_tool_calls
from workers.runtime import LlamaCppRuntime, RunControl


def no_embedder(text: str) -> np.ndarray:
    raise AssertionError("no query embedding expected")


def ctx_for(mem: Memory, tenant: str, conv=None, **kw) -> ToolContext:
    return ToolContext(mem, tenant, "u1", conv, kw.pop("source", "model:test"), no_embedder, **kw)


def test_parse_the_documented_formats() -> None:
    line = '{"tool": "memory_append", "args": {"block": "user", "text": "likes tea"}}'
    prose = f"Sure, noted.\n{line}\nAnything else?"
    assert [(c.tool, c.args) for c in parse_tool_calls(prose)] == [
        ("memory_append", {"block": "user", "text": "likes tea"})
    ]
    fenced = f"```json\n{json.dumps(json.loads(line), indent=2)}\n```"
    assert parse_tool_calls(fenced)[0].tool == "memory_append"
    assert parse_tool_calls(json.dumps(json.loads(line), indent=2))[0].args["text"] == "likes tea"
    two = line + "\n" + '{"tool": "recent_history", "args": {"limit": 3}}'
    assert [c.tool for c in parse_tool_calls(two)] == ["memory_append", "recent_history"]
    assert parse_tool_calls("no tools here {not json}") == []
    assert parse_tool_calls('{"name": "x"}') == []
    assert len(parse_tool_calls("\n".join([line] * 20))) == tools.MAX_CALLS


def test_model_output_edits_a_block_with_history(mem: Memory, tenant: str) -> None:
    mem.blocks.put(tenant, "u1", "user", "Name: Ada", source="api")
    output = (
        "I will remember that.\n"
        '{"tool": "memory_append", "args": {"block": "user", "text": "Prefers short answers"}}\n'
        '{"tool": "memory_replace", "args": {"block": "user", "old": "Ada", "new": "Ada L."}}'
    )
    ctx = ctx_for(mem, tenant, source="model:tiny-chat workflow=w step=s")
    results = [execute(ctx, c, f"0:{i}") for i, c in enumerate(parse_tool_calls(output))]
    assert [r["ok"] for r in results] == [True, True]
    assert results[1]["result"]["value"] == "Name: Ada L.\nPrefers short answers"
    history = mem.blocks.history(tenant, "u1", "user")
    assert [e.op for e in history] == ["replace", "append", "put"]
    assert history[0].source == "model:tiny-chat workflow=w step=s"


def test_bad_calls_are_results_not_crashes(mem: Memory, tenant: str) -> None:
    mem.blocks.put(tenant, "u1", "persona", "tiny", source="api", limit=8)
    ctx = ctx_for(mem, tenant, allowed=["memory_append", "memory_replace"])
    cases = {
        "nope": {},
        "key_moments": {"limit": 1},  # not enabled in this step
        "memory_append": {"block": "persona"},  # text missing
    }
    for tool, args in cases.items():
        out = execute(ctx, tools.ToolCall(tool, args, ""))
        assert out["ok"] is False and out["error"]
    over = execute(ctx, tools.ToolCall("memory_append", {"block": "persona", "text": "x" * 20}, ""))
    assert over["ok"] is False and "limit is 8" in over["error"]
    assert mem.blocks.get(tenant, "u1", "persona").value == "tiny"


def test_a_retried_step_does_not_repeat_an_edit(mem: Memory, tenant: str) -> None:
    call = tools.ToolCall("memory_append", {"block": "project", "text": "ship v1"}, "")
    first = execute(ctx_for(mem, tenant, scope="wf1:reply"), call, "0:0")
    again = execute(ctx_for(mem, tenant, scope="wf1:reply"), call, "0:0")
    assert first["ok"] and again["replayed"]
    assert mem.blocks.get(tenant, "u1", "project").value == "ship v1"


def test_read_tools(mem: Memory, tenant: str) -> None:
    conv = mem.conversations.create(tenant, uuid.uuid4().hex, "u1", ttl_s=600)
    mem.conversations.append(tenant, conv, [NewMessage("user", f"m{i}") for i in range(6)])
    mem.conversations.mark(tenant, conv.id, 2, on=True, note="breakthrough")
    ctx = ctx_for(mem, tenant, conv)
    recent = execute(ctx, tools.ToolCall("recent_history", {"limit": 3}, ""))
    assert [m["seq"] for m in recent["result"]] == [4, 5, 6]
    moments = execute(ctx, tools.ToolCall("key_moments", {}, ""))
    assert [(m["seq"], m["note"]) for m in moments["result"]] == [(2, "breakthrough")]
    enriched = execute(ctx, tools.ToolCall("enriched_context", {"limit": 2, "k": 0}, ""))
    assert [m["seq"] for m in enriched["result"]["recent"]] == [5, 6]
    assert [m["seq"] for m in enriched["result"]["key_moments"]] == [2]
    no_conv = execute(ctx_for(mem, tenant), tools.ToolCall("recent_history", {}, ""))
    assert no_conv["ok"] is False


@pytest.mark.parametrize(
    "allowed", [["memory_append"], ["memory_replace"], ["semantic_search", "key_moments"]]
)
def test_grammar_forces_a_valid_call_from_the_tiny_model(
    mem: Memory, tenant: str, chat_runtime: LlamaCppRuntime, allowed: list[str]
) -> None:
    """tiny-chat never writes JSON on its own; under the grammar it writes a valid call."""
    mem.blocks.put(tenant, "u1", "persona", "I am a cat.\nI like fish", source="api")
    blocks = mem.blocks.all(tenant, "u1")
    gbnf = tools.grammar(allowed, blocks)
    assert gbnf is not None
    inp = {
        "messages": [{"role": "user", "content": "Remember that I like the sea"}],
        "max_tokens": 200,
        "temperature": 0.7,
        "top_p": 0.95,
        "top_k": 40,
        "repeat_penalty": 1.0,
        "seed": 7,
        "grammar": gbnf,
    }
    out = chat_runtime.chat(inp, RunControl())
    assert out["finish_reason"] == "stop"
    (call,) = parse_tool_calls(out["text"])
    assert call.tool in allowed
    result = execute(ctx_for(mem, tenant, allowed=allowed), call)
    if call.tool.startswith("memory_"):
        assert result["ok"], result
        assert mem.blocks.history(tenant, "u1", call.args["block"])[0].source == "model:test"
    if call.tool == "memory_replace":
        assert call.args["old"] in "I am a cat.\nI like fish"
    # Nothing a block does not hold can be replaced, so no grammar when all are empty.
    assert tools.grammar(["memory_replace"], mem.blocks.all(tenant, "nobody")) is None
