"""The workflow engine: create runs, claim and finish steps, advance, cancel.

Every state change runs in :func:`_locked`, one transaction that first locks the workflow
row, so writers of one workflow take turns; ready steps are marked ``queued`` inside it and
sent to their model's queue only after the commit (send after commit). Claims and results
are conditional on (status, attempt), so a step delivered twice records one result and
advances the workflow once.
"""

from __future__ import annotations

import logging
import random
import threading
from collections import OrderedDict
from collections.abc import Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Protocol

from jinja2 import TemplateError
from sqlalchemy import update
from sqlalchemy.orm import defer
from sqlmodel import Session, select

from app import db, notify
from app.errors import ConflictError, NotFoundError
from app.spec import ValidatedWorkflow
from app.tables import StepRun, StepStatus, WorkflowRun, WorkflowStatus, utcnow
from app.templating import evaluate, render_value

log = logging.getLogger(__name__)

_SENDABLE = (StepStatus.queued, StepStatus.retrying, StepStatus.waiting_for_pool)


@dataclass(frozen=True)
class Dispatch:
    """A step to put on its model's queue once the transaction that readied it commits."""

    step_run_id: str
    model: str
    attempt: int
    countdown: float = 0.0


class Dispatcher(Protocol):
    """Sends dispatches to the broker (Celery in production and in the tests)."""

    def send(self, dispatches: Sequence[Dispatch]) -> None: ...


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
    input_error: str | None = None


@dataclass
class _Tx:
    session: Session
    workflow: WorkflowRun
    dispatches: list[Dispatch] = field(default_factory=list)
    step_id: str | None = None  # the spec id of the step _locked was given, if any

    def steps(self, only: Collection[str] | None = None) -> dict[str, StepRun]:
        """The workflow's step rows (``only`` those step ids), in spec order."""
        query = select(StepRun).where(StepRun.workflow_id == self.workflow.id)
        if only is not None:
            query = query.where(StepRun.step_id.in_(only))  # type: ignore[attr-defined]
        # Timestamps the engine only ever writes are not read back (less to parse per row).
        rows = self.session.exec(
            query.options(*_WRITE_ONLY).order_by(StepRun.position)  # type: ignore[arg-type]
        ).all()
        return {r.step_id: r for r in rows}


_WRITE_ONLY = [
    defer(StepRun.dispatched_at),  # type: ignore[arg-type]
    defer(StepRun.started_at),  # type: ignore[arg-type]
    defer(StepRun.finished_at),  # type: ignore[arg-type]
    defer(StepRun.updated_at),  # type: ignore[arg-type]
]


class _StepGone(NotFoundError):
    """The step run a task names does not exist (any more)."""


@contextmanager
def _locked(
    workflow_id: str | None, dispatcher: Dispatcher | None, *, step_run_id: str | None = None
) -> Iterator[_Tx]:
    # Given a step instead of a workflow, find the step's workflow in this same transaction
    # (workflow_id never changes, so reading it before the lock is safe).
    step_id = None
    with db.session_scope(write=True) as session:
        if workflow_id is None:
            found = session.exec(
                select(StepRun.workflow_id, StepRun.step_id).where(StepRun.id == step_run_id)
            ).first()
            if found is None:
                raise _StepGone(f"no step run {step_run_id!r}")
            workflow_id, step_id = found
        db.lock_workflow(session, workflow_id)
        # The spec never changes: when this process has it parsed already, skip the column.
        cached = [defer(WorkflowRun.spec)] if workflow_id in _SPECS else []  # type: ignore[arg-type]
        workflow = session.get(WorkflowRun, workflow_id, options=cached)
        if workflow is None:
            raise NotFoundError(f"no workflow {workflow_id!r}")
        tx = _Tx(session, workflow, step_id=step_id)
        was_terminal = workflow.status.terminal
        yield tx
    if tx.dispatches and dispatcher is not None:
        dispatcher.send(tx.dispatches)
    if tx.workflow.status.terminal and not was_terminal:
        notify.publish_finished(workflow_id)  # wakes long-polling readers (after the commit)


def create_workflow(
    validated: ValidatedWorkflow,
    dispatcher: Dispatcher,
    *,
    api_key_id: int | None = None,
    idempotency_key: str | None = None,
    request_hash: str | None = None,
) -> WorkflowRun:
    """Write a run and its steps, commit, then enqueue the steps that are ready."""
    spec = validated.spec
    dispatches: list[Dispatch] = []
    with db.session_scope(write=True) as session:
        run = WorkflowRun(
            name=spec.name,
            spec=validated.dump(),
            api_key_id=api_key_id,
            idempotency_key=idempotency_key,
            request_hash=request_hash,
        )
        session.add(run)
        session.flush()  # the run's row first: steps reference it
        steps = {}
        for position, step in enumerate(spec.steps):
            steps[step.id] = row = StepRun(
                workflow_id=run.id,
                step_id=step.id,
                position=position,
                kind=step.kind,
                model=step.model,
                depends_on=list(step.depends_on),
                max_attempts=step.retry.max_attempts,
            )
            session.add(row)
        tx = _Tx(session, run)
        _settle(tx, steps)
        session.flush()
        dispatches = tx.dispatches
    if dispatches:
        dispatcher.send(dispatches)
    return run


def find_idempotent(session: Session, api_key_id: int | None, key: str) -> WorkflowRun | None:
    """The run an earlier submit with this Idempotency-Key created, if any."""
    return session.exec(
        select(WorkflowRun).where(
            WorkflowRun.api_key_id == api_key_id, WorkflowRun.idempotency_key == key
        )
    ).first()


def _context(tx: _Tx, steps: dict[str, StepRun]) -> dict[str, Any]:
    return {
        "workflow": {"id": tx.workflow.id, "name": tx.workflow.name},
        "steps": {
            sid: {
                "status": s.status.value,
                "output": s.output,
                "attempts": s.attempts,
                "error": s.error,
            }
            for sid, s in steps.items()
        },
    }


_SPECS: OrderedDict[str, dict[str, dict[str, Any]]] = OrderedDict()  # workflow id: steps
_SPECS_MAX = 256
_specs_lock = threading.Lock()


def _spec_steps(tx: _Tx) -> dict[str, dict[str, Any]]:
    """The workflow's step specs by id. A spec never changes after submit, so each process
    parses it once (an LRU of recent workflows) instead of in every transaction."""
    wid = tx.workflow.id
    with _specs_lock:
        steps = _SPECS.get(wid)
        if steps is not None:
            _SPECS.move_to_end(wid)
            return steps
    steps = {step["id"]: step for step in tx.workflow.spec["steps"]}  # loads it if deferred
    with _specs_lock:
        _SPECS[wid] = steps
        while len(_SPECS) > _SPECS_MAX:
            _SPECS.popitem(last=False)
    return steps


def _step_spec(tx: _Tx, step_id: str) -> dict[str, Any]:
    step = _spec_steps(tx).get(step_id)
    if step is None:
        raise NotFoundError(f"step {step_id!r} is not in workflow {tx.workflow.id}")
    return dict(step)


def _with_ancestors(tx: _Tx, step_id: str) -> set[str]:
    """``step_id`` and every step it depends on, transitively (what its templates may read)."""
    specs = _spec_steps(tx)
    seen, todo = {step_id}, [step_id]
    while todo:
        for dep in specs.get(todo.pop(), {}).get("depends_on") or ():
            if dep not in seen:
                seen.add(dep)
                todo.append(dep)
    return seen


def _settle(tx: _Tx, steps: dict[str, StepRun]) -> None:
    """Decide every pending step whose dependencies are done; then the workflow's status."""
    now = utcnow()
    changed = tx.workflow.status is WorkflowStatus.running
    while changed:
        changed = False
        for step in steps.values():
            if step.status is not StepStatus.pending:
                continue
            deps = [steps[d] for d in step.depends_on]
            if not all(d.status.terminal for d in deps):
                continue
            changed = True
            step.updated_at = now
            if any(d.status in (StepStatus.failed, StepStatus.cancelled) for d in deps):
                step.status, step.finished_at = StepStatus.cancelled, now
                step.error = "cancelled: a dependency did not succeed"
                continue
            if deps and all(d.status is StepStatus.skipped for d in deps):
                step.status, step.finished_at = StepStatus.skipped, now
                step.error = "skipped: every dependency was skipped"
                continue
            when = _step_spec(tx, step.step_id).get("when")
            if when:
                try:
                    go = evaluate(when, _context(tx, steps))
                except (TemplateError, TypeError, ValueError, ArithmeticError) as exc:
                    step.status, step.finished_at = StepStatus.failed, now
                    step.error = f"condition {when!r} failed to evaluate: {exc}"
                    continue
                if not go:
                    step.status, step.finished_at = StepStatus.skipped, now
                    step.error = f"skipped: condition {when!r} is false"
                    continue
            step.status, step.queued_at, step.dispatched_at = StepStatus.queued, now, None
            tx.dispatches.append(Dispatch(step.id, step.model, step.attempts + 1))
    _finish_workflow(tx, steps)


def _finish_workflow(tx: _Tx, steps: dict[str, StepRun]) -> None:
    run = tx.workflow
    if run.status.terminal:
        return
    now = utcnow()
    failed = [s for s in steps.values() if s.status is StepStatus.failed]
    if failed:
        run.status, run.finished_at, run.updated_at = WorkflowStatus.failed, now, now
        run.error = f"step {failed[0].step_id!r} failed: {failed[0].error}"
        # Nothing new starts; steps already running finish and record their result.
        for s in steps.values():
            if s.status is StepStatus.pending or s.status in _SENDABLE:
                s.status, s.finished_at, s.updated_at = StepStatus.cancelled, now, now
                s.error = f"cancelled: workflow failed at step {failed[0].step_id!r}"
        tx.dispatches.clear()
    elif all(s.status.terminal for s in steps.values()):
        run.status, run.finished_at, run.updated_at = WorkflowStatus.succeeded, now, now


def claim_step(step_run_id: str, attempt: int) -> StepWork | None:
    """Mark one attempt of a step running; None when this delivery is stale or a duplicate."""
    try:
        return _claim(step_run_id, attempt)
    except _StepGone:
        return None


def _claim(step_run_id: str, attempt: int) -> StepWork | None:
    with _locked(None, None, step_run_id=step_run_id) as tx:
        assert tx.step_id is not None
        # One query: the step itself and the steps its input templates may read.
        steps = tx.steps(only=_with_ancestors(tx, tx.step_id))
        step = steps[tx.step_id]
        fresh = step.status in _SENDABLE and step.attempts == attempt - 1
        redelivered = step.status is StepStatus.running and step.attempts == attempt
        if tx.workflow.status.terminal or not (fresh or redelivered):
            log.info(
                "dropping stale delivery of step %s attempt %s (%s)",
                step_run_id,
                attempt,
                step.status,
            )
            return None
        now = utcnow()
        step.status, step.attempts, step.started_at, step.updated_at = (
            StepStatus.running,
            attempt,
            now,
            now,
        )
        spec = _step_spec(tx, step.step_id)
        queued_ms = ((now - step.queued_at).total_seconds() * 1000) if step.queued_at else 0.0
        work = StepWork(
            step_run_id=step.id,
            workflow_id=step.workflow_id,
            step_id=step.step_id,
            kind=step.kind,
            model=step.model,
            attempt=attempt,
            input=spec["input"],
            timeout_s=spec.get("timeout_s"),
            queued_ms=queued_ms,
        )
        context = _context(tx, steps)
    # Rendered after the commit, outside the lock: what it reads no longer changes.
    try:
        work.input = render_value(spec["input"], context)
    except (TemplateError, TypeError, ValueError) as exc:
        work.input_error = f"input template failed to render: {exc}"
    return work


def complete_step(
    step_run_id: str, attempt: int, output: dict[str, Any], dispatcher: Dispatcher
) -> bool:
    """Store a step's output and advance; False when this attempt no longer owns the step."""
    with _locked(None, dispatcher, step_run_id=step_run_id) as tx:
        steps = tx.steps()
        step = next(s for s in steps.values() if s.id == step_run_id)
        if step.status is not StepStatus.running or step.attempts != attempt:
            return False
        now = utcnow()
        step.status, step.output, step.error = StepStatus.succeeded, output, None
        step.finished_at = step.updated_at = now
        _settle(tx, steps)
        return True


def fail_step(
    step_run_id: str, attempt: int, error: str, *, retryable: bool, dispatcher: Dispatcher
) -> StepStatus | None:
    """Record a failed attempt: retry with backoff if allowed, else fail the workflow."""
    with _locked(None, dispatcher, step_run_id=step_run_id) as tx:
        steps = tx.steps()
        step = next(s for s in steps.values() if s.id == step_run_id)
        if step.status is not StepStatus.running or step.attempts != attempt:
            return None
        now = utcnow()
        step.error, step.updated_at = error, now
        if retryable and attempt < step.max_attempts and not tx.workflow.status.terminal:
            retry = _step_spec(tx, step.step_id).get("retry") or {}
            delay = backoff_delay(
                attempt, float(retry.get("backoff_s", 1.0)), float(retry.get("max_backoff_s", 60.0))
            )
            step.status, step.queued_at, step.dispatched_at = StepStatus.retrying, now, None
            tx.dispatches.append(Dispatch(step.id, step.model, attempt + 1, delay))
        else:
            step.status, step.finished_at = StepStatus.failed, now
            _settle(tx, steps)
        return step.status


def backoff_delay(attempt: int, base_s: float, cap_s: float) -> float:
    """Exponential backoff with equal jitter: between half and all of min(cap, base·2^(n-1))."""
    ceiling = min(cap_s, base_s * (2 ** (attempt - 1)))
    return float(ceiling / 2 + random.uniform(0, ceiling / 2))


def cancel_workflow(workflow_id: str) -> WorkflowRun:
    """Cancel a run: every step not yet finished becomes ``cancelled``."""
    with _locked(workflow_id, None) as tx:
        run = tx.workflow
        if run.status.terminal:
            raise ConflictError(f"workflow {workflow_id} is already {run.status.value}")
        now = utcnow()
        run.status, run.finished_at, run.updated_at = WorkflowStatus.cancelled, now, now
        run.error = "cancelled by request"
        for step in tx.steps().values():
            if not step.status.terminal:
                step.status, step.finished_at, step.updated_at = StepStatus.cancelled, now, now
                step.error = "cancelled by request"
        return run


def note_cancelled(step_run_id: str, attempt: int, detail: str) -> None:
    """Record on a cancelled step what the worker that was running it did."""
    with db.session_scope(write=True) as session:
        step = session.get(StepRun, step_run_id)
        if step is not None and step.status is StepStatus.cancelled and step.attempts == attempt:
            step.error = detail


def mark_dispatched(
    step_run_ids: Sequence[str],
    no_pool: Sequence[str] = (),
    *,
    attempts: Mapping[str, int] | None = None,
) -> None:
    """Record that these steps' tasks reached the broker (the reconciler resends the rest).

    Those in ``no_pool`` wait on a queue no worker consumes yet: ``waiting_for_pool``
    until a pool for their model claims them. With ``attempts`` (step run id: the attempt
    sent), a row is marked only while that send is still its latest (``attempts`` one
    less), so a late mark never covers a retry that has not reached the broker.
    """
    by_attempt: dict[int | None, list[str]] = {}
    for sid in step_run_ids:
        by_attempt.setdefault(attempts.get(sid) if attempts else None, []).append(sid)
    with db.session_scope(write=True) as session:
        # Set-based UPDATEs: no rows are loaded (this runs once per send, on the hot path).
        now = utcnow()
        for attempt, ids in by_attempt.items():
            query = update(StepRun).where(StepRun.id.in_(ids))  # type: ignore[attr-defined]
            if attempt is not None:
                query = query.where(StepRun.attempts == attempt - 1)  # type: ignore[arg-type]
            session.exec(
                query.values(dispatched_at=now).execution_options(synchronize_session=False)
            )
        if no_pool:
            session.exec(
                update(StepRun)
                .where(
                    StepRun.id.in_(no_pool),  # type: ignore[attr-defined]
                    StepRun.status == StepStatus.queued,  # type: ignore[arg-type]
                )
                .values(status=StepStatus.waiting_for_pool)
                .execution_options(synchronize_session=False)
            )


def undispatched(older_than_s: float, limit: int = 500) -> list[Dispatch]:
    """Steps marked ready that never reached the broker (a crash or outage after commit)."""
    cutoff = utcnow() - timedelta(seconds=older_than_s)
    with db.session_scope() as session:
        rows = session.exec(
            select(StepRun)
            .where(
                StepRun.status.in_(_SENDABLE),  # type: ignore[attr-defined]
                StepRun.dispatched_at.is_(None),  # type: ignore[union-attr]
                StepRun.queued_at < cutoff,  # type: ignore[operator]
            )
            .limit(limit)
        ).all()
        return [Dispatch(r.id, r.model, r.attempts + 1) for r in rows]
