"""OpenAI requests as workflows, and refusals in OpenAI's terms (no server needed)."""

from __future__ import annotations

import base64
import struct
from typing import Any

import pytest

from app.api.openai import convert
from app.api.openai.schemas import ChatRequest, CompletionRequest, EmbeddingRequest
from app.core.config import Settings
from app.core.errors import SpecError
from app.workflows.schemas import StepPublic
from app.workflows.spec import validate_workflow
from models.catalog import load_catalog

CATALOG = load_catalog()
USER = [{"role": "user", "content": "hi"}]


def refusal(model: Any, body: dict[str, Any], path: str = "/v1/chat/completions") -> dict:
    with pytest.raises(SpecError) as exc:
        convert.parse(model, body)
    status, out = convert.spec_error(exc.value, path)
    assert status == 400
    error: dict[str, Any] = out["error"]
    return error


@pytest.mark.parametrize(
    ("extra", "param", "code"),
    [
        ({"n": 3}, "n", "unsupported_parameter"),
        ({"logprobs": True}, "logprobs", "unsupported_parameter"),
        ({"audio": {"voice": "x"}}, "audio", "unsupported_parameter"),
        ({"functions": [{"name": "f"}]}, "functions", "unsupported_parameter"),
        ({"stream_options": {"include_usage": True}}, "stream_options", "unsupported_parameter"),
        ({"temperature": 3}, "temperature", "invalid_value"),
        ({"made_up": 1}, "made_up", "unrecognized_argument"),
    ],
)
def test_chat_fields_corral_does_not_serve_are_refused_by_name(
    extra: dict[str, Any], param: str, code: str
) -> None:
    error = refusal(ChatRequest, {"model": "tiny-chat", "messages": USER, **extra})
    assert (error["param"], error["code"], error["type"]) == (param, code, "invalid_request_error")


def test_ignored_fields_are_accepted() -> None:
    req = convert.parse(
        ChatRequest,
        {
            "model": "m",
            "messages": USER,
            "store": True,
            "metadata": {"a": "b"},
            "n": 1,
            "user": "u",
        },
    )
    assert req.n == 1


def test_a_chat_request_becomes_a_one_step_workflow(settings: Settings) -> None:
    req = convert.parse(
        ChatRequest,
        {
            "model": "tiny-chat",
            "messages": [
                {"role": "developer", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": t} for t in "ab"]},
            ],
            "max_completion_tokens": 9,
            "stop": "END",
            "temperature": 0,
            "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}],
            "tool_choice": {"type": "function", "function": {"name": "f"}},
            "top_k": 5,
        },
    )  # fmt: skip
    spec = convert.chat_workflow(req)
    (step,) = spec["steps"]
    assert (spec["name"], step["id"], step["kind"]) == ("chat.completions", "completion", "chat")
    inp = step["input"]
    assert inp["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "ab"},
    ]
    assert (inp["max_tokens"], inp["stop"], inp["top_k"]) == (9, ["END"], 5)
    assert inp["functions"][0]["name"] == "f" and inp["function_call"] == "f"
    validate_workflow(spec, CATALOG, settings)  # a valid spec as it stands


@pytest.mark.parametrize(
    ("loc", "whole", "param"),
    [
        (("steps", 0, "model"), "messages", "model"),
        (("steps", 0, "input"), "messages", "messages"),
        (("steps", 0, "input", "messages", 2, "content"), None, "messages[2].content"),
        (("steps", 0, "input", "functions", 1, "parameters"), None, "tools[1].parameters"),
        (("steps", 0, "input", "function_call"), None, "tool_choice"),
        (("steps", 0, "input", "texts", 3), "input", "input[3]"),
        (("steps", 0, "timeout_s"), None, "timeout_s"),
        (("body",), None, None),
    ],
)
def test_step_fields_map_back_to_the_requests(loc: tuple, whole: str | None, param: str) -> None:
    assert convert.param(loc, whole) == param


def test_spec_errors_in_openai_shape(settings: Settings) -> None:
    req = convert.parse(ChatRequest, {"model": "nope", "messages": USER})
    with pytest.raises(SpecError) as exc:
        validate_workflow(convert.chat_workflow(req), CATALOG, settings)
    status, body = convert.spec_error(exc.value, "/v1/chat/completions")
    assert status == 404
    assert body["error"]["param"] == "model" and body["error"]["code"] == "model_not_found"


def test_completion_and_embedding_requests() -> None:
    spec = convert.completion_workflow(
        convert.parse(CompletionRequest, {"model": "tiny-chat", "prompt": ["x"]})
    )
    assert spec["steps"][0]["input"]["max_tokens"] == 16  # OpenAI's default
    assert refusal(CompletionRequest, {"model": "m", "prompt": ["a", "b"]})["param"] == "prompt"
    assert (
        refusal(CompletionRequest, {"model": "m", "prompt": "a", "echo": True})["param"] == "echo"
    )
    emb = convert.parse(EmbeddingRequest, {"model": "tiny-embed", "input": "one"})
    assert convert.embedding_workflow(emb)["steps"][0]["input"]["texts"] == ["one"]
    for bad, param in [({"dimensions": 8}, "dimensions"), ({"input": [[1, 2]]}, "input")]:
        body = {"model": "tiny-embed", "input": "x", **bad}
        assert refusal(EmbeddingRequest, body, "/v1/embeddings")["param"] == param


def test_base64_embeddings_are_little_endian_float32() -> None:
    step = StepPublic.model_construct(output={"vectors": [[0.5, -1.0, 2.25]], "prompt_tokens": 3})
    out = convert.embedding_response("tiny-embed", step, "base64")
    packed = base64.b64decode(out["data"][0]["embedding"])
    assert struct.unpack("<3f", packed) == (0.5, -1.0, 2.25)
    assert out["usage"] == {"prompt_tokens": 3, "total_tokens": 3}
