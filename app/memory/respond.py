"""Answering a conversation from the API: a one-step chat workflow, optionally awaited."""

from __future__ import annotations

import time
from typing import Any

from sqlmodel import select

from app import engine
from app.store import db
from app.core.config import Settings
from app.engine import Dispatcher
from app.core.errors import SpecError
from app.memory.schemas import Conversation, MessageAppended, RespondOptions
from app.memory.service import Memory
from app.workflows.spec import SamplingParams, validate_workflow
from app.store.tables import StepRun, WorkflowRun
from app.workflows.tokens import count_tokens
from models.catalog import Catalog

POLL_S = 0.05


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
    dispatcher: Dispatcher,
) -> str:
    """Validate and submit the reply workflow; returns its id."""
    validated = validate_workflow(
        reply_spec(conv, upto, opts, model), catalog, settings, count_tokens
    )
    return engine.create_workflow(validated, dispatcher, api_key_id=api_key_id).id


def wait(
    mem: Memory, tenant: str, workflow_id: str, timeout_s: float, result: MessageAppended
) -> MessageAppended:
    """Wait for the reply workflow; fill in its status, output and reply message."""
    deadline = time.monotonic() + timeout_s
    while True:
        with db.session_scope() as session:
            run = session.get(WorkflowRun, workflow_id)
            step = session.exec(select(StepRun).where(StepRun.workflow_id == workflow_id)).first()
            status = run.status if run is not None else None
            output, error = (step.output, step.error) if step is not None else (None, None)
        if status is not None and status.terminal:
            break
        if time.monotonic() > deadline:
            result.status = "running"
            return result
        time.sleep(POLL_S)
    result.status, result.output, result.error = status.value, output, error
    reply_seq = ((output or {}).get("memory") or {}).get("reply_seq")
    if reply_seq:
        found = mem.conversations.messages(tenant, result.message.conversation_id, [reply_seq])
        result.reply = found[0] if found else None
    return result
