"""Chat-step inputs for conversation memory, validated at submit like every other field."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from app.core.config import Settings
from app.core.errors import SpecError
from app.workflows.spec import validate_workflow
from models.catalog import load_catalog

CATALOG = load_catalog()


def chat(inp: dict[str, Any]) -> dict[str, Any]:
    return {"name": "m", "steps": [{"id": "c", "kind": "chat", "model": "tiny-chat", "input": inp}]}


def problems(inp: dict[str, Any]) -> list[str]:
    try:
        validate_workflow(chat(inp), CATALOG, Settings())
    except SpecError as exc:
        return [f"{'.'.join(map(str, e.loc))}: {e.msg}" for e in exc.errors]
    return []


def test_memory_inputs_that_pass() -> None:
    cid = uuid.uuid4().hex
    assert problems({"conversation_id": cid}) == []  # answer the conversation as it stands
    assert (
        problems(
            {
                "conversation_id": cid,
                "messages": [{"role": "user", "content": "hi"}],
                "memory": {"semantic_k": 2, "context_tokens": 2048, "record": False},
                "tools": ["memory_append", "semantic_search"],
                "tool_choice": "required",
            }
        )
        == []
    )
    assert (
        problems(
            {
                "user_id": "ada",
                "messages": [{"role": "user", "content": "x"}],
                "tools": ["key_moments"],
            }
        )
        == []
    )


@pytest.mark.parametrize(
    ("inp", "expected"),
    [
        ({}, "messages must have at least 1 item (or give a conversation_id)"),
        (
            {"messages": [{"role": "user", "content": "x"}], "tools": ["memory_append"]},
            "tools need a conversation_id or a user_id",
        ),
        (
            {
                "user_id": "u",
                "messages": [{"role": "user", "content": "x"}],
                "tools": ["key_moments"],
                "tool_choice": "memory_append",
            },
            "tool_choice 'memory_append' is not one of tools",
        ),
        ({"conversation_id": "not-hex"}, "steps.0.input.conversation_id"),
        ({"conversation_id": uuid.uuid4().hex, "tools": ["rm_rf"]}, "steps.0.input.tools.0"),
        (
            {"conversation_id": uuid.uuid4().hex, "memory": {"semantic_k": 500}},
            "steps.0.input.memory.semantic_k",
        ),
        (
            {"conversation_id": uuid.uuid4().hex, "memory": {"bogus": 1}},
            "unknown field 'bogus'",
        ),
    ],
)
def test_memory_inputs_that_fail(inp: dict[str, Any], expected: str) -> None:
    found = problems(inp)
    assert any(expected in p for p in found), found
