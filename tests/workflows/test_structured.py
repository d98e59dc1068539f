"""Function calls read from a model's reply, and earlier calls written back as turns."""

from __future__ import annotations

import json

import pytest

from app.workflows.structured import FunctionDef, parse_call, template_messages

FUNCTIONS = [FunctionDef(name="lookup"), FunctionDef(name="now")]


@pytest.mark.parametrize(
    ("reply", "name", "args"),
    [
        ('{"name": "lookup", "arguments": {"word": "sea"}}', "lookup", {"word": "sea"}),
        ('```json\n{"name": "now", "arguments": {}}\n```', "now", {}),
        ('{"name": "lookup", "arguments": "{\\"word\\": \\"x\\"}"}', "lookup", {"word": "x"}),
        ('{"name": "lookup", "parameters": {"word": "y"}}', "lookup", {"word": "y"}),
    ],
)
def test_a_reply_that_is_one_call_is_read_as_one(reply: str, name: str, args: dict) -> None:
    call = parse_call(reply, FUNCTIONS)
    assert call is not None and call["id"].startswith("call_")
    assert call["name"] == name and json.loads(call["arguments"]) == args


@pytest.mark.parametrize(
    "reply",
    [
        "The sea is salt water.",
        '{"name": "unknown", "arguments": {}}',
        '{"name": "lookup", "arguments": [1]}',
        'Calling {"name": "lookup", "arguments": {}} now',
        '{"name": "lookup", "arguments": {',
    ],
)
def test_anything_else_is_an_answer(reply: str) -> None:
    assert parse_call(reply, FUNCTIONS) is None


def test_earlier_calls_and_results_become_plain_turns() -> None:
    call = {"id": "c1", "type": "function", "function": {"name": "lookup", "arguments": '{"w": 1}'}}
    turns = template_messages(
        [
            {"role": "user", "content": "hi", "name": None},
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "c1", "content": "42"},
        ]
    )
    assert turns == [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": '{"name": "lookup", "arguments": {"w": 1}}'},
        {"role": "user", "content": "<tool_result name='c1'>\n42\n</tool_result>"},
    ]
