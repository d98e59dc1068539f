"""Workflow spec validation: every problem found at once, each naming its field and limit."""

from __future__ import annotations

from typing import Any

import pytest

from app.core.config import Settings
from app.core.errors import SpecError
from app.workflows.spec import validate_workflow
from models.catalog import CatalogEntry, load_catalog
from tests.utils.workflows import gen

CATALOG = load_catalog()


def errors(
    spec: Any, settings: Settings | None = None, counter: Any = None
) -> list[dict[str, Any]]:
    with pytest.raises(SpecError) as info:
        validate_workflow(spec, CATALOG, settings or Settings(), counter)
    return [e.as_dict() for e in info.value.errors]


def test_valid_spec_orders_steps_topologically() -> None:
    v = validate_workflow(
        {"name": "w", "steps": [gen("c", depends_on=["b"]), gen("b", depends_on=["a"]), gen("a")]},
        CATALOG,
        Settings(),
    )
    assert v.order == ["a", "b", "c"]
    assert v.dump()["steps"][0]["retry"] == {
        "max_attempts": 1,
        "backoff_s": 1.0,
        "max_backoff_s": 60.0,
    }


def test_all_problems_reported_together() -> None:
    errs = errors(
        {"name": "w", "steps": [gen("a", model="nope"), gen("a"), gen("b", depends_on=["zz"])]}
    )
    locs = {tuple(e["loc"]) for e in errs}
    assert ("steps", 0, "model") in locs
    assert ("steps", 1, "id") in locs
    assert ("steps", 2, "depends_on", 0) in locs


def test_cycle_is_named() -> None:
    errs = errors(
        {
            "name": "w",
            "steps": [
                gen("a", depends_on=["c"]),
                gen("b", depends_on=["a"]),
                gen("c", depends_on=["b"]),
            ],
        }
    )
    (cycle,) = [e for e in errs if e["type"] == "cycle"]
    assert "a → c → b → a" in cycle["msg"] or "→" in cycle["msg"]


def test_self_dependency() -> None:
    errs = errors({"name": "w", "steps": [gen("a", depends_on=["a"])]})
    assert errs[0]["loc"] == ["steps", 0, "depends_on", 0]
    assert "itself" in errs[0]["msg"]


def test_step_limits_name_the_setting() -> None:
    small = Settings(max_steps=2, max_attempts=3, max_prompt_chars=10)
    errs = errors(
        {
            "name": "w",
            "steps": [
                gen("a", retry={"max_attempts": 4}),
                gen("b"),
                gen("c", input={"prompt": "x" * 11}),
            ],
        },
        small,
    )
    msgs = " ".join(e["msg"] for e in errs)
    assert "CORRAL_MAX_STEPS" in msgs and "at most 2 steps" in msgs
    assert "CORRAL_MAX_ATTEMPTS" in msgs
    assert "CORRAL_MAX_PROMPT_CHARS" in msgs and "11 characters" in msgs


def test_retry_backoff_order() -> None:
    errs = errors({"name": "w", "steps": [gen("a", retry={"backoff_s": 5, "max_backoff_s": 1})]})
    assert errs[0]["loc"] == ["steps", 0, "retry"]
    assert "max_backoff_s (1.0) must be ≥ backoff_s (5.0)" in errs[0]["msg"]


def test_references_must_be_dependencies_and_known_fields() -> None:
    errs = errors(
        {
            "name": "w",
            "steps": [
                gen("a"),
                gen("e", kind="embed", model="tiny-embed", input={"texts": ["x"]}),
                gen("b", depends_on=["a"], input={"prompt": "{{ steps.a.output.txt }}"}),
                gen("c", depends_on=["a"], when="steps.a.bogus"),
                gen("d", depends_on=["e"], input={"prompt": "{{ steps.e.output.text }}"}),
                gen("f", input={"prompt": "{{ steps.a.output.text }}"}),
            ],
        }
    )
    by_loc = {tuple(e["loc"]): e["msg"] for e in errs}
    assert "output.txt" in by_loc[("steps", 2, "input", "prompt")]
    assert "unknown field" in by_loc[("steps", 3, "when")]
    assert "the output of a 'embed' step has" in by_loc[("steps", 4, "input", "prompt")]
    assert "add it to depends_on" in by_loc[("steps", 5, "input", "prompt")]


def test_transitive_dependency_may_be_referenced() -> None:
    validate_workflow(
        {
            "name": "w",
            "steps": [
                gen("a"),
                gen("b", depends_on=["a"]),
                gen("c", depends_on=["b"], input={"prompt": "{{ steps.a.output.text }}"}),
            ],
        },
        CATALOG,
        Settings(),
    )


def test_token_counter_refuses_only_what_cannot_fit() -> None:
    def count(entry: CatalogEntry, text: str) -> int:
        return len(text.split())

    n_ctx = CATALOG.get("tiny-chat").n_ctx
    fits = {"prompt": "w " * (n_ctx - 10), "max_tokens": 10}
    validate_workflow({"name": "w", "steps": [gen("a", input=fits)]}, CATALOG, Settings(), count)
    over = {"prompt": "w " * (n_ctx - 9), "max_tokens": 10}
    errs = errors({"name": "w", "steps": [gen("a", input=over)]}, counter=count)
    assert f"together {n_ctx + 1}" in errs[0]["msg"]
    # A templated prompt cannot be counted at submit; the worker checks it exactly.
    templated = {"prompt": "{{ steps.z.output.text }}" + " w" * n_ctx, "max_tokens": 10}
    validate_workflow(
        {"name": "w", "steps": [gen("z"), gen("a", depends_on=["z"], input=templated)]},
        CATALOG,
        Settings(),
        count,
    )


def test_sandbox_refuses_unsafe_templates() -> None:
    from jinja2.exceptions import SecurityError

    from app.workflows.templating import render

    # Unsafe attributes read as undefined (nothing leaks) or raise when used.
    assert render("{{ steps.__class__.__mro__ }}", {"steps": {}}) == ""
    with pytest.raises(SecurityError):
        render("{{ ''.__class__.__subclasses__() }}", {})


def test_conditions_evaluate_in_the_sandbox() -> None:
    from app.workflows.templating import evaluate

    ctx = {"steps": {"score": {"output": {"text": "73"}, "status": "succeeded"}}}
    assert evaluate("steps.score.output.text | int > 50", ctx)
    assert not evaluate("steps.score.output.text | int > 80", ctx)
    assert not evaluate("steps.missing.output.text", ctx)


def chat_step(**inp: Any) -> dict[str, Any]:
    messages = inp.pop("messages", [{"role": "user", "content": "hi"}])
    return {"id": "c", "kind": "chat", "model": "tiny-chat", "input": {"messages": messages, **inp}}


FN = {"name": "f", "parameters": {"type": "object", "properties": {"n": {"type": "integer"}}}}


@pytest.mark.parametrize(
    ("inp", "loc", "says"),
    [
        ({"functions": [FN], "function_call": "g"}, ("steps", 0, "input"), "not one of functions"),
        ({"function_call": "required"}, ("steps", 0, "input"), "needs functions"),
        ({"functions": [FN, FN]}, ("steps", 0, "input"), "duplicate"),
        (
            {"functions": [FN], "tools": ["recent_history"], "user_id": "u"},
            ("steps", 0, "input"),
            "not both",
        ),
        (
            {"functions": [FN], "response_format": {"type": "json_object"}},
            ("steps", 0, "input"),
            "function_call to 'none'",
        ),
        (
            {"messages": [{"role": "tool", "content": "x"}]},
            ("steps", 0, "input", "messages", 0),
            "tool_call_id",
        ),
        (
            {"messages": [{"role": "user"}]},
            ("steps", 0, "input", "messages", 0),
            "content is required",
        ),
        (
            {"response_format": {"type": "json_schema"}},
            ("steps", 0, "input", "response_format"),
            "needs json_schema",
        ),
        (
            {"functions": [{"name": "f", "parameters": {"type": "array", "uniqueItems": True}}]},
            ("steps", 0, "input", "functions", 0, "parameters", "uniqueItems"),
            "not supported",
        ),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {
                        "name": "x",
                        "schema": {"anyOf": [{"type": "string"}, {"type": "number", "minimum": 1}]},
                    },
                }
            },
            (
                "steps",
                0,
                "input",
                "response_format",
                "json_schema",
                "schema",
                "anyOf",
                1,
                "minimum",
            ),
            "not supported",
        ),
    ],
)
def test_structured_chat_inputs_are_checked(
    inp: dict[str, Any], loc: tuple[Any, ...], says: str
) -> None:
    (problem,) = errors({"name": "w", "steps": [chat_step(**inp)]})
    assert tuple(problem["loc"]) == loc and says in problem["msg"], problem


def test_tool_messages_need_no_conversation() -> None:
    calls = [{"id": "1", "function": {"name": "f", "arguments": "{}"}}]
    messages = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "tool_calls": calls},
        {"role": "tool", "tool_call_id": "1", "content": "{}"},
    ]
    validate_workflow(
        {"name": "w", "steps": [chat_step(messages=messages, functions=[FN])]}, CATALOG, Settings()
    )
    (problem,) = errors(
        {"name": "w", "steps": [chat_step(messages=messages, conversation_id="0" * 32)]}
    )
    assert "without a conversation_id" in problem["msg"]
