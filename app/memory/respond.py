"""Answering a conversation: a one-step chat workflow, submitted through the service."""

from __future__ import annotations

from typing import Any

from app.core.config import Settings
from app.core.errors import SpecError
from app.memory.schemas import Conversation, MessageAppended, RespondOptions
from app.memory.service import Memory
from app.workflows import service
from app.workflows.schemas import WorkflowPublic
from app.workflows.spec import SamplingParams, validate_workflow
from app.workflows.tokens import count_tokens
from models.catalog import Catalog


def reply_spec(conv: Conversation, upto: int, opts: RespondOptions, model: str) -> dict[str, Any]:
    """The workflow that answers message ``upto`` of ``conv`` on ``model``."""
    sampling = opts.model_dump(include=set(SamplingParams.model_fields))
    memory = opts.memory.model_dump(exclude_defaults=True) | {"upto": upto}
    step_input: dict[str, Any] = {
        "conversation_id": conv.id,
        **sampling,
        "memory": memory,
    }
    if opts.tools:
        step_input |= {
            "tools": list(opts.tools),
            "tool_choice": opts.tool_choice,
            "max_tool_rounds": opts.max_tool_rounds,
        }
    return {
        "name": f"conversation {conv.id}",
        "steps": [{"id": "reply", "kind": "chat", "model": model, "input": step_input}],
    }


def check(
    conv: Conversation, opts: RespondOptions, model: str, catalog: Catalog, settings: Settings
) -> None:
    """Raise the ``SpecError`` the reply workflow would get (located in the request body),
    before anything is appended."""
    try:
        validate_workflow(
            reply_spec(conv, conv.message_count + 1, opts, model), catalog, settings, count_tokens
        )
    except SpecError as exc:
        step_input = ("steps", 0, "input")
        for error in exc.errors:
            if error.loc[:3] == step_input:
                error.loc = ("body", "respond", *error.loc[3:])
        raise


def start(
    conv: Conversation,
    upto: int,
    opts: RespondOptions,
    model: str,
    *,
    api_key_id: int | None,
    catalog: Catalog,
    settings: Settings,
) -> str:
    """Validate and submit the reply workflow; returns its id."""
    validated = validate_workflow(
        reply_spec(conv, upto, opts, model), catalog, settings, count_tokens
    )
    return service.submit_validated(validated, api_key_id=api_key_id).id


def finish(
    mem: Memory, tenant: str, view: WorkflowPublic, result: MessageAppended
) -> MessageAppended:
    """Fill in the reply workflow's status, output and reply message, as ``view`` has them."""
    if not view.status.terminal:
        result.status = "running"
        return result
    step = view.steps[0] if view.steps else None
    output, error = (step.output, step.error) if step is not None else (None, None)
    result.status, result.output, result.error = view.status.value, output, error
    reply_seq = ((output or {}).get("memory") or {}).get("reply_seq")
    if reply_seq:
        found = mem.conversations.messages(tenant, result.message.conversation_id, [reply_seq])
        result.reply = found[0] if found else None
    return result
