"""OpenAI requests to one-step workflows, step outputs to OpenAI responses, and Corral's
errors to OpenAI's error shape.

A request becomes a workflow named after its endpoint with one step (``completion`` or
``embedding``) on the requested model; its id is the workflow's (``chatcmpl-<id>``), so
``/v1/workflows/<id>`` shows it.
"""

from __future__ import annotations

import base64
import struct
import time
from collections.abc import Sequence
from typing import Any

from pydantic import ValidationError

from app.api.openai.schemas import (
    ChatRequest,
    CompletionRequest,
    EmbeddingRequest,
    Message,
    Unsupported,
)
from app.core.errors import FieldError, SpecError
from app.workflows.schemas import StepPublic

STEP_ID = "completion"
EMBED_STEP_ID = "embedding"
PREFIX = {"chat": "chatcmpl-", "completion": "cmpl-", "embedding": "embd-"}
# A step input's field → the request's field it came from.
_RENAMED = {"functions": "tools", "function_call": "tool_choice", "texts": "input"}


# --- requests ---------------------------------------------------------------------------


def parse(model: type[ChatRequest | CompletionRequest | EmbeddingRequest], raw: Any) -> Any:
    """``raw`` as ``model``, or a SpecError naming each bad field in OpenAI's terms."""
    if not isinstance(raw, dict):
        raise SpecError.single((), "the request body must be a JSON object", "invalid_body")
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        errors = []
        for err in exc.errors(include_url=False):
            cause = (err.get("ctx") or {}).get("error")
            if isinstance(cause, Unsupported):
                errors.append(FieldError((cause.field,), str(cause), "unsupported"))
            elif err["type"] == "extra_forbidden":
                errors.append(
                    FieldError(
                        err["loc"],
                        f"Unrecognized request argument supplied: {err['loc'][-1]}",
                        "unrecognized",
                    )
                )
            else:
                errors.append(FieldError(err["loc"], err["msg"], err["type"]))
        raise SpecError(errors) from None


def _sampling(req: ChatRequest | CompletionRequest) -> dict[str, Any]:
    fields = {
        "temperature": req.temperature,
        "top_p": req.top_p,
        "seed": req.seed,
        "presence_penalty": req.presence_penalty,
        "frequency_penalty": req.frequency_penalty,
        "top_k": req.top_k,
        "repeat_penalty": req.repeat_penalty,
        "ignore_eos": req.ignore_eos,
        "stop": [req.stop] if isinstance(req.stop, str) else req.stop,
    }
    return {k: v for k, v in fields.items() if v is not None}


def _message(m: Message) -> dict[str, Any]:
    out: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role}
    text = m.text()
    if text is not None:
        out["content"] = text
    if m.name is not None:
        out["name"] = m.name
    if m.tool_calls:
        out["tool_calls"] = [c.model_dump() for c in m.tool_calls]
    if m.tool_call_id is not None:
        out["tool_call_id"] = m.tool_call_id
    return out


def _workflow(
    name: str, step_id: str, kind: str, model: str, inp: dict[str, Any], timeout_s: float | None
) -> dict[str, Any]:
    step: dict[str, Any] = {"id": step_id, "kind": kind, "model": model, "input": inp}
    if timeout_s is not None:
        step["timeout_s"] = timeout_s
    return {"name": name, "steps": [step]}


def chat_workflow(req: ChatRequest) -> dict[str, Any]:
    """The one-step workflow that answers a chat completion request (``max_tokens`` left
    out when the request gives none: see :func:`default_max_tokens`)."""
    inp: dict[str, Any] = {"messages": [_message(m) for m in req.messages], **_sampling(req)}
    if req.max_completion_tokens or req.max_tokens:
        inp["max_tokens"] = req.max_completion_tokens or req.max_tokens
    if req.response_format is not None:
        inp["response_format"] = req.response_format
    if req.tools:
        inp["functions"] = [
            {
                "name": t.function.name,
                "description": t.function.description or "",
                "parameters": t.function.parameters or {"type": "object", "properties": {}},
            }
            for t in req.tools
        ]
        choice = req.tool_choice or "auto"
        inp["function_call"] = choice if isinstance(choice, str) else choice.function.get("name")
    elif req.tool_choice not in (None, "none", "auto"):
        raise SpecError.single(("tool_choice",), "tool_choice needs tools", "tools")
    for name in ("conversation_id", "user_id"):
        if getattr(req, name) is not None:
            inp[name] = getattr(req, name)
    if req.memory is not None:
        inp["memory"] = req.memory.model_dump(exclude_unset=True)
    return _workflow("chat.completions", STEP_ID, "chat", req.model, inp, req.timeout_s)


def completion_workflow(req: CompletionRequest) -> dict[str, Any]:
    """The one-step workflow that answers a (legacy) completion request."""
    inp = {"prompt": req.prompt_text(), "max_tokens": req.max_tokens or 16, **_sampling(req)}
    return _workflow("completions", STEP_ID, "generate", req.model, inp, req.timeout_s)


def embedding_workflow(req: EmbeddingRequest) -> dict[str, Any]:
    """The one-step workflow that answers an embeddings request."""
    inp = {"texts": req.texts(), "normalize": True}
    return _workflow("embeddings", EMBED_STEP_ID, "embed", req.model, inp, req.timeout_s)


# --- responses --------------------------------------------------------------------------


def usage(output: dict[str, Any]) -> dict[str, int]:
    prompt = int(output.get("prompt_tokens") or 0)
    completion = int(output.get("completion_tokens") or 0)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def tool_calls(output: dict[str, Any]) -> list[dict[str, Any]]:
    """The step's function calls as a message's ``tool_calls``."""
    return [
        {
            "id": c["id"],
            "type": "function",
            "function": {"name": c["name"], "arguments": c["arguments"]},
        }
        for c in output.get("function_calls") or []
    ]


def chat_response(workflow_id: str, model: str, created: int, step: StepPublic) -> dict[str, Any]:
    output = step.output or {}
    calls = tool_calls(output)
    message: dict[str, Any] = {
        "role": "assistant",
        "content": None if calls else output.get("text", ""),
        "refusal": None,
    }
    if calls:
        message["tool_calls"] = calls
    return {
        "id": PREFIX["chat"] + workflow_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": message,
                "logprobs": None,
                "finish_reason": "tool_calls" if calls else output.get("finish_reason") or "stop",
            }
        ],
        "usage": usage(output),
        "system_fingerprint": None,
    }


def completion_response(
    workflow_id: str, model: str, created: int, step: StepPublic
) -> dict[str, Any]:
    output = step.output or {}
    return {
        "id": PREFIX["completion"] + workflow_id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": 0,
                "text": output.get("text", ""),
                "logprobs": None,
                "finish_reason": output.get("finish_reason") or "stop",
            }
        ],
        "usage": usage(output),
        "system_fingerprint": None,
    }


def embedding_response(model: str, step: StepPublic, encoding: str) -> dict[str, Any]:
    output = step.output or {}
    data = []
    for i, vector in enumerate(output.get("vectors") or []):
        value: Any = vector
        if encoding == "base64":
            value = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
        data.append({"object": "embedding", "index": i, "embedding": value})
    tokens = int(output.get("prompt_tokens") or 0)
    return {
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }


def now() -> int:
    return int(time.time())


# --- errors -----------------------------------------------------------------------------


# The request's field that a step's whole input came from, per endpoint.
WHOLE_INPUT = {
    "/v1/chat/completions": "messages",
    "/v1/completions": "prompt",
    "/v1/embeddings": "input",
}


def param(loc: Sequence[str | int], whole: str | None = None) -> str | None:
    """A Corral field path as the request's parameter: ``steps.0.input.messages.1.content``
    is ``messages[1].content``; the step's whole input is ``whole``."""
    parts = list(loc)
    if parts[:2] == ["steps", 0]:
        parts = parts[2:]
        if parts == ["input"]:
            return whole
        if parts[:1] == ["input"]:
            parts = parts[1:]
            if parts and isinstance(parts[0], str):
                parts[0] = _RENAMED.get(parts[0], parts[0])
    if parts[:1] == ["body"]:
        parts = parts[1:]
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or None


# FieldError types → (HTTP status, OpenAI error code)
_CODES = {
    "unknown_model": (404, "model_not_found"),
    "prompt_too_long": (400, "context_length_exceeded"),
    "body_too_large": (413, "request_too_large"),
    "unrecognized": (400, "unrecognized_argument"),
    "unsupported": (400, "unsupported_parameter"),
}


def spec_error(exc: SpecError, path: str) -> tuple[int, dict[str, Any]]:
    """A refused request to ``path`` in OpenAI's shape: the first error decides the status
    and the parameter; the message lists them all."""
    whole = WHOLE_INPUT.get(path)
    first = exc.errors[0] if exc.errors else FieldError((), str(exc), "invalid")
    status, code = _CODES.get(first.type, (400, "invalid_value"))
    messages = []
    for e in exc.errors:
        where = param(e.loc, whole)
        messages.append(f"{where}: {e.msg}" if where else e.msg)
    body = error_body("; ".join(messages), "invalid_request_error", param(first.loc, whole), code)
    return status, body


def error_body(
    message: str, type_: str, param_: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param_, "code": code}}
