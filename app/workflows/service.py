"""The one way in: submit, read, cancel and wait for workflows; a worker's claim and result.

Every door calls these: the HTTP routes, the CLI, conversation replies, summaries, and
the worker pools. Each write commits first and sends after (send after commit)::

    submit:   validate (spec) → engine.create (rules.start, one commit) → dispatch.send
    claim:    engine.claim (one statement) → streams.note_change
    result:   engine.complete / fail (rules, one commit) → dispatch.send → note_change
              → publish_finished
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import anyio
from redis.exceptions import RedisError
from sqlalchemy.exc import IntegrityError

from app.core.config import Settings
from app.core.errors import ConflictError, SpecError
from app.scheduler import live, pools
from app.store.tables import StepStatus, WorkflowStatus
from app.workflows import dispatch, engine, events, streams
from app.workflows.engine import Outcome, StepWork
from app.workflows.events import FinishedListener
from app.workflows.schemas import StepPublic, WorkflowPage, WorkflowPublic, WorkflowSummary
from app.workflows.spec import ValidatedWorkflow, validate_workflow
from app.workflows.tokens import count_tokens
from models.catalog import Catalog

__all__ = [
    "StepWork",
    "Submitted",
    "cancel",
    "claim_step",
    "complete_step",
    "fail_step",
    "page",
    "read",
    "submit",
    "submit_validated",
    "validate",
    "wait_for_end",
]


@dataclass(frozen=True, slots=True)
class Submitted:
    """A submitted workflow: its id, its status, and whether the submit was a replay."""

    id: str
    status: WorkflowStatus
    replayed: bool = False


def validate(raw: Any, catalog: Catalog, settings: Settings) -> ValidatedWorkflow:
    """Check a raw spec against the catalog, the limits and the live pools' contexts."""
    contexts = live.pool_contexts(max_age_s=live.VIEW_MAX_AGE_S)
    return validate_workflow(raw, catalog, settings, count_tokens, contexts)


def submit(
    raw: Any,
    *,
    catalog: Catalog,
    settings: Settings,
    api_key_id: int | None,
    idempotency_key: str | None = None,
) -> Submitted:
    """Validate a raw spec, store it and send its first steps.

    With ``idempotency_key``, a submit that repeats an earlier one (same key and body)
    returns the workflow the first created (``replayed``); the same key with another
    body is a :class:`ConflictError`. Raises :class:`SpecError` for a bad spec: nothing
    is written then.
    """
    request_hash = None
    if idempotency_key:
        request_hash = hashlib.sha256(json.dumps(raw, sort_keys=True).encode()).hexdigest()
        earlier = _replay(api_key_id, idempotency_key, request_hash)
        if earlier is not None:
            return earlier
    validated = validate(raw, catalog, settings)
    try:
        return submit_validated(
            validated,
            api_key_id=api_key_id,
            idempotency_key=idempotency_key,
            request_hash=request_hash,
        )
    except IntegrityError:  # a concurrent submit with the same key won the race
        earlier = _replay(api_key_id, idempotency_key, request_hash) if idempotency_key else None
        if earlier is None:
            raise
        return earlier


def submit_validated(
    validated: ValidatedWorkflow,
    *,
    api_key_id: int | None,
    idempotency_key: str | None = None,
    request_hash: str | None = None,
) -> Submitted:
    """Store a validated workflow and send its first steps (after the commit)."""
    outcome = engine.create(
        validated,
        api_key_id=api_key_id,
        idempotency_key=idempotency_key,
        request_hash=request_hash,
    )
    _after_commit(outcome)
    return Submitted(outcome.workflow_id, outcome.status)


def _replay(api_key_id: int | None, key: str, request_hash: str | None) -> Submitted | None:
    earlier = engine.find_idempotent(api_key_id, key)
    if earlier is None:
        return None
    if earlier.request_hash != request_hash:
        raise ConflictError(
            "Idempotency-Key was already used for a different request body "
            f"(workflow {earlier.id}); use a new key"
        )
    return Submitted(earlier.id, earlier.status, replayed=True)


def read(workflow_id: str, api_key_id: int | None) -> WorkflowPublic:
    """A workflow of ``api_key_id`` with every step's state (:class:`NotFoundError` if none)."""
    workflow, steps = engine.read(workflow_id, api_key_id)
    public = [StepPublic.of(s) for s in steps]
    _explain_waiting(public)
    return WorkflowPublic.of(workflow, priority=engine.priority_of(workflow_id), steps=public)


_WAITING = (StepStatus.queued, StepStatus.waiting_for_pool)


def _explain_waiting(steps: list[StepPublic]) -> None:
    """Give each waiting step whose model no agent can start now the agents' reason."""
    if not any(s.status in _WAITING for s in steps):
        return
    try:
        reasons = pools.waiting()
    except (RedisError, OSError):  # the reason is a courtesy: the read goes on without it
        return
    for step in steps:
        if step.status in _WAITING and step.model in reasons:
            step.waiting_reason = pools.waiting_reason(reasons[step.model])


def spec(workflow_id: str, api_key_id: int | None) -> dict[str, Any]:
    """The spec a workflow of ``api_key_id`` was submitted with, as validated (a re-run
    submits it again)."""
    return engine.spec(workflow_id, api_key_id)


def cancel(workflow_id: str, api_key_id: int | None) -> WorkflowSummary:
    """Cancel a running workflow: unfinished steps are cancelled, running ones told to stop."""
    outcome = engine.cancel(workflow_id, api_key_id)
    events.request_cancel(workflow_id)
    _after_commit(outcome)
    workflow, _ = engine.read(workflow_id, api_key_id)
    return WorkflowSummary.of(workflow)


def page(
    api_key_id: int | None,
    *,
    status: WorkflowStatus | None,
    limit: int,
    cursor: str | None,
    name: str | None = None,
) -> WorkflowPage:
    """One page of a key's workflows, newest first (optionally of one status and name);
    ``cursor`` from the page before."""
    after = _decode_cursor(cursor) if cursor else None
    runs = engine.page(api_key_id, status=status, limit=limit, after=after, name=name)
    next_cursor = None
    if len(runs) > limit:
        last = runs[limit - 1]
        next_cursor = base64.urlsafe_b64encode(
            f"{last.created_at.isoformat()}|{last.id}".encode()
        ).decode()
    return WorkflowPage(
        items=[WorkflowSummary.of(r) for r in runs[:limit]], next_cursor=next_cursor
    )


def _decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        stamp, _, wid = base64.urlsafe_b64decode(cursor.encode()).decode().partition("|")
        return datetime.fromisoformat(stamp), wid
    except (ValueError, binascii.Error, UnicodeDecodeError) as exc:
        raise SpecError.single(("query", "cursor"), "invalid cursor", "cursor") from exc


async def wait_for_end(
    listener: FinishedListener, workflow_id: str, api_key_id: int | None, timeout_s: float
) -> WorkflowPublic:
    """The workflow's state as soon as it has ended, or after ``timeout_s`` as it is then.

    Woken by the finish notice (:mod:`app.workflows.events`); without one it reads again
    every :data:`events.RECHECK_S`, so a lost notice costs latency, never the answer.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        async with listener.watch(workflow_id) as event:
            view = await anyio.to_thread.run_sync(read, workflow_id, api_key_id)
            remaining = deadline - time.monotonic()
            if view.status.terminal or remaining <= 0:
                return view
            await listener.wait(event, min(remaining, events.RECHECK_S))


# ---- the worker's side ---------------------------------------------------------------


def claim_step(step_run_id: str, attempt: int) -> StepWork | None:
    """Start ``attempt`` of a step if it is the step's to run; its work, else None."""
    work = engine.claim(step_run_id, attempt)
    if work is not None:
        streams.note_change(work.workflow_id)
    return work


def complete_step(step_run_id: str, attempt: int, output: dict[str, Any]) -> bool:
    """Store a step's output and send what it readied; False when the attempt no longer
    owns its step (cancelled, or a duplicate delivery)."""
    outcome = engine.complete(step_run_id, attempt, output)
    if outcome is None:
        return False
    _after_commit(outcome)
    return True


def fail_step(step_run_id: str, attempt: int, error: str, *, retryable: bool) -> StepStatus | None:
    """Record a failed attempt (retried, or the step failed); the step's status after it,
    or None when the attempt no longer owns its step."""
    outcome = engine.fail(step_run_id, attempt, error, retryable=retryable)
    if outcome is None:
        return None
    _after_commit(outcome)
    return outcome.step_status


def _after_commit(outcome: Outcome) -> None:
    dispatch.send(outcome.dispatches)
    streams.note_change(outcome.workflow_id, ended=outcome.finished)
    if outcome.finished:
        events.publish_finished(outcome.workflow_id)
