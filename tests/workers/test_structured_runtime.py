"""The runtime's streamed text, JSON-schema answers and function calls, on tiny-chat."""

from __future__ import annotations

import json

import jsonschema_rs

from app.workflows.spec import ChatInput, GenerateInput
from workers.runtime import LlamaCppRuntime, RunControl


def chat_input(**kw: object) -> dict[str, object]:
    messages = kw.pop("messages", [{"role": "user", "content": "Tell me about the sea"}])
    return ChatInput.model_validate({"messages": messages, "temperature": 0, **kw}).model_dump()


def test_streamed_pieces_join_to_the_text(runtime: LlamaCppRuntime) -> None:
    pieces: list[str] = []
    inp = GenerateInput.model_validate(
        {"prompt": "Once upon a time", "max_tokens": 40, "temperature": 0}
    ).model_dump()
    out = runtime.generate(inp, RunControl(on_text=pieces.append))
    assert "".join(pieces) == out["text"] and len(pieces) > 10
    # A chat streams the same way, and the same call without a listener gives the same text.
    pieces.clear()
    streamed = runtime.chat(chat_input(max_tokens=40), RunControl(on_text=pieces.append))
    assert (
        "".join(pieces)
        == streamed["text"]
        == runtime.chat(chat_input(max_tokens=40), RunControl())["text"]
    )


def test_a_stop_sequence_is_never_streamed(runtime: LlamaCppRuntime) -> None:
    """A piece that might begin a stop sequence waits until it is known not to: the
    pieces are the text llama.cpp cut at the stop, nothing of the stop itself."""
    base = GenerateInput.model_validate(
        {"prompt": "Once upon a time", "max_tokens": 40, "temperature": 0}
    ).model_dump()
    full = runtime.generate(base, RunControl())["text"]
    words = full.split()
    stop = " ".join(words[5:7])  # two words from the middle, spanning tokens
    pieces: list[str] = []
    out = runtime.generate({**base, "stop": [stop]}, RunControl(on_text=pieces.append))
    assert out["text"] == full[: full.index(stop)]
    assert "".join(pieces) == out["text"]
    assert all(stop not in "".join(pieces[: i + 1]) for i in range(len(pieces)))


SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "tags": {"type": "array", "items": {"type": "string", "enum": ["a", "b"]}, "maxItems": 3},
        "ok": {"type": "boolean"},
    },
    "required": ["name", "tags", "ok"],
    "additionalProperties": False,
}


def test_a_json_schema_answer_validates(runtime: LlamaCppRuntime) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "thing", "schema": SCHEMA}}
    out = runtime.chat(chat_input(max_tokens=120, response_format=fmt), RunControl())
    assert out["finish_reason"] == "stop"
    jsonschema_rs.validate(SCHEMA, json.loads(out["text"]))
    obj = runtime.chat(
        chat_input(max_tokens=120, response_format={"type": "json_object"}), RunControl()
    )
    if obj["finish_reason"] == "stop":
        assert isinstance(json.loads(obj["text"]), dict)


LOOKUP = {
    "name": "lookup",
    "description": "Look a word up.",
    "parameters": {
        "type": "object",
        "properties": {"word": {"type": "string", "maxLength": 16}, "limit": {"type": "integer"}},
        "required": ["word", "limit"],
        "additionalProperties": False,
    },
}
NOW = {"name": "now", "parameters": {"type": "object", "properties": {}}}


def test_a_forced_call_is_a_valid_call(runtime: LlamaCppRuntime) -> None:
    for choice in ("required", "lookup", "now"):
        out = runtime.chat(
            chat_input(max_tokens=80, functions=[LOOKUP, NOW], function_call=choice),
            RunControl(),
        )
        assert out["finish_reason"] == "tool_calls", out["text"]
        (call,) = out["function_calls"]
        assert call["id"].startswith("call_")
        assert call["name"] in (("lookup", "now") if choice == "required" else (choice,))
        schema = LOOKUP if call["name"] == "lookup" else NOW
        jsonschema_rs.validate(schema["parameters"], json.loads(call["arguments"]))


def test_function_call_none_and_earlier_calls_in_the_messages(runtime: LlamaCppRuntime) -> None:
    messages = [
        {"role": "user", "content": "Look up 'sea'."},
        {
            "role": "assistant",
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "lookup", "arguments": '{"word": "sea", "limit": 1}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": '{"meaning": "salt water"}'},
    ]
    out = runtime.chat(
        chat_input(messages=messages, max_tokens=12, functions=[LOOKUP], function_call="none"),
        RunControl(),
    )
    assert "function_calls" not in out and out["finish_reason"] in ("stop", "length")
    # The earlier call and its result reached the prompt, written as plain turns.
    bare = runtime.chat(chat_input(messages=messages[:1], max_tokens=12), RunControl())
    assert out["prompt_tokens"] > bare["prompt_tokens"] + 10
