"""Workflow transactions: create a run, claim a step, store a result, cancel.

Each state change is one transaction that locks the workflow's row (``SELECT … FOR
UPDATE`` on PostgreSQL; SQLite's ``BEGIN IMMEDIATE`` holds the database's write lock),
reads its steps, asks :mod:`app.workflows.rules` what follows and writes the answer. So
writers of one workflow take turns, and "send each ready step once" holds when two
parents finish at the same moment. What to send comes back in an :class:`Outcome`; the
caller sends it after the commit (:mod:`app.workflows.service`).
"""

from __future__ import annotations

import random
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from cachetools import LRUCache
from jinja2 import TemplateError
from sqlalchemy import and_, or_
from sqlalchemy.orm import defer
from sqlmodel import Session, select

from app.core.errors import ConflictError, NotFoundError
from app.store import db
from app.store.tables import StepRun, StepStatus, WorkflowRun, WorkflowStatus, new_id, utcnow
from app.workflows import rules
from app.workflows.rules import StepDef
from app.workflows.spec import ValidatedWorkflow
from app.workflows.templating import render_value


@dataclass(frozen=True, slots=True)
class Dispatch:
    """One attempt of a step to put on its model's queue once its transaction commits."""

    step_run_id: str
    model: str
    attempt: int
    countdown: float = 0.0


@dataclass(frozen=True, slots=True)
class Outcome:
    """What a transaction did: the workflow's status after it, whether it ended the
    workflow, and the steps to send after the commit."""

    workflow_id: str
    status: WorkflowStatus
    finished: bool = False
    dispatches: tuple[Dispatch, ...] = ()
    step_status: StepStatus | None = None  # the step a result was for, after it


@dataclass
class StepWork:
    """What a worker needs to run one claimed attempt of a step."""

    step_run_id: str
    workflow_id: str
    step_id: str
    kind: str
    model: str
    attempt: int
    input: dict[str, Any]
    timeout_s: float | None
    queued_ms: float
    started_at: datetime = field(default_factory=utcnow)
    input_error: str | None = None


class StepGone(NotFoundError):
    """The step run a task names does not exist."""


# Parsed step specs by workflow id: a spec never changes after submit.
_defs: LRUCache[str, dict[str, StepDef]] = LRUCache(maxsize=1024)
_specs: LRUCache[str, dict[str, dict[str, Any]]] = LRUCache(maxsize=1024)
_cache_lock = threading.Lock()


def _remember(workflow_id: str, spec: Mapping[str, Any]) -> None:
    steps = {s["id"]: s for s in spec["steps"]}
    with _cache_lock:
        _specs[workflow_id] = steps
        _defs[workflow_id] = {sid: StepDef.of(s) for sid, s in steps.items()}


def _spec_of(session: Session, workflow_id: str) -> tuple[dict[str, StepDef], dict[str, Any]]:
    """A workflow's step rules and step specs: cached, else read once."""
    with _cache_lock:
        defs, specs = _defs.get(workflow_id), _specs.get(workflow_id)
    if defs is None or specs is None:
        raw = session.exec(select(WorkflowRun.spec).where(WorkflowRun.id == workflow_id)).one()
        _remember(workflow_id, raw)
        return _spec_of(session, workflow_id)
    return defs, specs


def forget_specs() -> None:
    """Drop every cached spec (a fresh process's state; tests)."""
    with _cache_lock:
        _defs.clear()
        _specs.clear()


# ---- the locked transaction ------------------------------------------------------------


@dataclass
class _Locked:
    session: Session
    workflow: WorkflowRun
    steps: dict[str, StepRun]  # by spec id, in spec order
    defs: dict[str, StepDef]

    def state(self) -> rules.Run:
        steps = {
            sid: rules.StepState(s.status, s.attempts, s.output, s.error)
            for sid, s in self.steps.items()
        }
        w = self.workflow
        return rules.Run(w.id, w.name, w.status, steps, w.error)

    def apply(self, nxt: rules.Next, step_id: str | None = None) -> Outcome:
        """Write a transition's changes to the rows (committed when the block ends)."""
        now = utcnow()
        if "" in nxt.changed:
            self.workflow.status = nxt.run.status
            self.workflow.error = nxt.run.error
            self.workflow.finished_at = now
            self.workflow.updated_at = now
        for changed in nxt.changed - {""}:
            _write_step(self.steps[changed], nxt.run.steps[changed], now)
        dispatches = tuple(
            Dispatch(self.steps[s.step_id].id, self.steps[s.step_id].model, s.attempt, s.delay_s)
            for s in nxt.sends
        )
        status = nxt.run.steps[step_id].status if step_id else None
        return Outcome(self.workflow.id, nxt.run.status, nxt.finished, dispatches, status)


def _write_step(row: StepRun, state: rules.StepState, now: datetime) -> None:
    if state.status is not row.status:
        if state.status in rules.SENDABLE:
            row.queued_at, row.dispatched_at = now, None
        elif state.status is StepStatus.running:
            row.started_at = now
        elif state.status.terminal:
            row.finished_at = now
    row.status, row.attempts, row.error = state.status, state.attempts, state.error
    if state.output is not row.output:
        row.output = state.output
    row.updated_at = now


@contextmanager
def _locked(*, workflow_id: str | None = None, step_run_id: str | None = None) -> Iterator[_Locked]:
    """A write transaction on one workflow (by its id, or through one of its steps) that
    holds the workflow's lock and has read its steps."""
    query = (
        select(WorkflowRun)
        .options(defer(WorkflowRun.spec))  # type: ignore[arg-type]
        .with_for_update(of=WorkflowRun)
    )
    if step_run_id is not None:
        query = query.join(StepRun, StepRun.workflow_id == WorkflowRun.id).where(  # type: ignore[arg-type]
            StepRun.id == step_run_id
        )
    else:
        query = query.where(WorkflowRun.id == workflow_id)
    with db.session_scope(write=True) as session:
        workflow = session.exec(query).first()
        if workflow is None:
            if step_run_id is not None:
                raise StepGone(f"no step run {step_run_id!r}")
            raise NotFoundError(f"no workflow {workflow_id!r}")
        rows = session.exec(
            select(StepRun).where(StepRun.workflow_id == workflow.id).order_by(StepRun.position)  # type: ignore[arg-type]
        ).all()
        defs, _ = _spec_of(session, workflow.id)
        yield _Locked(session, workflow, {r.step_id: r for r in rows}, defs)


# ---- transactions -------------------------------------------------------------------------


def create(
    validated: ValidatedWorkflow,
    *,
    api_key_id: int | None = None,
    idempotency_key: str | None = None,
    request_hash: str | None = None,
) -> Outcome:
    """Write a new run and its steps in one commit, its first steps already decided."""
    spec = validated.spec
    raw = validated.dump()
    now = utcnow()
    workflow = WorkflowRun(
        id=new_id(),
        name=spec.name,
        spec=raw,
        api_key_id=api_key_id,
        idempotency_key=idempotency_key,
        request_hash=request_hash,
        created_at=now,
        updated_at=now,
    )
    steps = {
        s.id: StepRun(
            workflow_id=workflow.id,
            step_id=s.id,
            position=i,
            kind=s.kind,
            model=s.model,
            depends_on=list(s.depends_on),
            max_attempts=s.retry.max_attempts,
            updated_at=now,
        )
        for i, s in enumerate(spec.steps)
    }
    _remember(workflow.id, raw)
    with _cache_lock:
        defs = _defs[workflow.id]
    with db.session_scope(write=True) as session:
        locked = _Locked(session, workflow, steps, defs)
        outcome = locked.apply(rules.start(defs, locked.state()))
        session.add(workflow)
        session.flush()  # the run's row before its steps' (their foreign key)
        session.add_all(steps.values())
    return outcome


def claim(step_run_id: str, attempt: int) -> StepWork | None:
    """Mark ``attempt`` of a step running and return its work (its input rendered against
    the steps above it); None when this delivery is not the step's to run."""
    with _locked(step_run_id=step_run_id) as tx:
        row = next((r for r in tx.steps.values() if r.id == step_run_id), None)
        if row is None:
            raise StepGone(f"no step run {step_run_id!r}")
        run = tx.state()
        if not rules.claim(run, row.step_id, attempt):
            return None
        queued_at = row.queued_at
        tx.apply(rules.started(run, row.step_id, attempt))
        _, specs = _spec_of(tx.session, tx.workflow.id)
        step_spec = specs[row.step_id]
        work = StepWork(
            step_run_id=row.id,
            workflow_id=tx.workflow.id,
            step_id=row.step_id,
            kind=row.kind,
            model=row.model,
            attempt=attempt,
            input=step_spec["input"],
            timeout_s=step_spec.get("timeout_s"),
            queued_ms=(utcnow() - queued_at).total_seconds() * 1000 if queued_at else 0.0,
        )
        context = rules.context(tx.defs, run, row.step_id)
        context["steps"][row.step_id] = {
            "status": StepStatus.running.value,
            "output": None,
            "attempts": attempt,
            "error": None,
        }
    try:
        work.input = render_value(step_spec["input"], context)
    except (TemplateError, TypeError, ValueError, ArithmeticError) as exc:
        work.input_error = f"input template failed to render: {exc}"
    return work


def complete(step_run_id: str, attempt: int, output: dict[str, Any]) -> Outcome | None:
    """Store an attempt's output and advance; None when the attempt no longer owns its step."""
    with _locked(step_run_id=step_run_id) as tx:
        step_id = _step_id(tx, step_run_id)
        nxt = rules.succeed(tx.defs, tx.state(), step_id, attempt, output)
        return None if nxt is None else tx.apply(nxt, step_id)


def fail(step_run_id: str, attempt: int, error: str, *, retryable: bool) -> Outcome | None:
    """Record a failed attempt: a retry with backoff, or the step's and workflow's end."""
    with _locked(step_run_id=step_run_id) as tx:
        step_id = _step_id(tx, step_run_id)
        nxt = rules.fail(
            tx.defs,
            tx.state(),
            step_id,
            attempt,
            error,
            retryable=retryable,
            jitter=random.random(),
        )
        return None if nxt is None else tx.apply(nxt, step_id)


def cancel(workflow_id: str, api_key_id: int | None) -> Outcome:
    """Cancel a running workflow of ``api_key_id``: every unfinished step is cancelled."""
    with _locked(workflow_id=workflow_id) as tx:
        if tx.workflow.api_key_id != api_key_id:
            raise NotFoundError(f"no workflow {workflow_id!r}")
        nxt = rules.cancel(tx.state())
        if nxt is None:
            raise ConflictError(f"workflow {workflow_id} is already {tx.workflow.status.value}")
        return tx.apply(nxt)


def note_cancelled(step_run_id: str, attempt: int, detail: str) -> None:
    """Record on a cancelled step what the worker that was running it did."""
    with db.session_scope(write=True) as session:
        step = session.get(StepRun, step_run_id)
        if step is not None and step.status is StepStatus.cancelled and step.attempts == attempt:
            step.error = detail


def _step_id(tx: _Locked, step_run_id: str) -> str:
    for step_id, row in tx.steps.items():
        if row.id == step_run_id:
            return step_id
    raise StepGone(f"no step run {step_run_id!r}")


# ---- reads ------------------------------------------------------------------------------


def find_idempotent(api_key_id: int | None, key: str) -> WorkflowRun | None:
    """The run an earlier submit with this Idempotency-Key created, if any."""
    with db.session_scope() as session:
        return session.exec(
            select(WorkflowRun)
            .where(WorkflowRun.api_key_id == api_key_id, WorkflowRun.idempotency_key == key)
            .options(defer(WorkflowRun.spec))  # type: ignore[arg-type]
        ).first()


def read(workflow_id: str, api_key_id: int | None) -> tuple[WorkflowRun, Sequence[StepRun]]:
    """A workflow of ``api_key_id`` and its steps, in spec order."""
    with db.session_scope() as session:
        workflow = session.exec(
            select(WorkflowRun)
            .where(WorkflowRun.id == workflow_id)
            .options(defer(WorkflowRun.spec))  # type: ignore[arg-type]
        ).first()
        if workflow is None or workflow.api_key_id != api_key_id:
            raise NotFoundError(f"no workflow {workflow_id!r}")
        steps = session.exec(
            select(StepRun).where(StepRun.workflow_id == workflow_id).order_by(StepRun.position)  # type: ignore[arg-type]
        ).all()
        return workflow, steps


def page(
    api_key_id: int | None,
    *,
    status: WorkflowStatus | None,
    limit: int,
    after: tuple[datetime, str] | None,
) -> list[WorkflowRun]:
    """Up to ``limit`` + 1 workflows of ``api_key_id``, newest first, older than ``after``
    (a created_at and an id), optionally of one status."""
    query = (
        select(WorkflowRun)
        .where(WorkflowRun.api_key_id == api_key_id)
        .options(defer(WorkflowRun.spec))  # type: ignore[arg-type]
    )
    if status is not None:
        query = query.where(WorkflowRun.status == status)
    if after is not None:
        at, wid = after
        query = query.where(
            or_(
                WorkflowRun.created_at < at,  # type: ignore[arg-type]
                and_(WorkflowRun.created_at == at, WorkflowRun.id < wid),  # type: ignore[arg-type]
            )
        )
    newest = (WorkflowRun.created_at.desc(), WorkflowRun.id.desc())  # type: ignore[attr-defined]
    with db.session_scope() as session:
        return list(session.exec(query.order_by(*newest).limit(limit + 1)).all())
