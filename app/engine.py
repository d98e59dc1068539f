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
from typing import Any, Protocol

from jinja2 import TemplateError
from sqlalchemy import and_, or_, update
from sqlalchemy import select as sa_select
from sqlalchemy.orm import defer
from sqlmodel import Session, col, select

from app import db, notify
from app.errors import ConflictError, NotFoundError
from app.spec import ValidatedWorkflow
from app.tables import StepRun, StepStatus, WorkflowRun, WorkflowStatus, utcnow
from app.templating import evaluate, render_value

log = logging.getLogger(__name__)

SENDABLE = (StepStatus.queued, StepStatus.retrying, StepStatus.waiting_for_pool)


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
    # One statement finds the workflow (by id, or through the step a task names) and locks
    # its row: FOR UPDATE OF workflow_run on PostgreSQL; on SQLite the write transaction's
    # BEGIN IMMEDIATE already holds the database's write lock. The spec column is read only
    # when this process has not parsed that workflow's spec yet (see _spec_steps).
    deferred = defer(WorkflowRun.spec)  # type: ignore[arg-type]
    with db.session_scope(write=True) as session:
        step_id: str | None = None
        workflow: WorkflowRun | None
        if workflow_id is None:
            found = session.exec(
                select(WorkflowRun, StepRun.step_id)
                .options(deferred)
                .join(StepRun, col(StepRun.workflow_id) == col(WorkflowRun.id))
                .where(StepRun.id == step_run_id)
                .with_for_update(of=WorkflowRun)
            ).first()
            if found is None:
                raise _StepGone(f"no step run {step_run_id!r}")
            workflow, step_id = found
        else:
            workflow = session.exec(
                select(WorkflowRun)
                .options(deferred)
                .where(WorkflowRun.id == workflow_id)
                .with_for_update()
            ).first()
            if workflow is None:
                raise NotFoundError(f"no workflow {workflow_id!r}")
        tx = _Tx(session, workflow, step_id=step_id)
        was_terminal = workflow.status.terminal
        yield tx
    if tx.dispatches and dispatcher is not None:
        dispatcher.send(tx.dispatches)
    if tx.workflow.status.terminal and not was_terminal:
        notify.publish_finished(tx.workflow.id)  # wakes long-polling readers (after the commit)


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


@dataclass(frozen=True)
class _Spec:
    """A workflow's parsed spec: its name and its step specs by id."""

    name: str
    steps: dict[str, dict[str, Any]]


_SPECS: OrderedDict[str, _Spec] = OrderedDict()  # workflow id: parsed spec (an LRU)
_SPECS_MAX = 256
_specs_lock = threading.Lock()


def _cached_spec(workflow_id: str) -> _Spec | None:
    with _specs_lock:
        spec = _SPECS.get(workflow_id)
        if spec is not None:
            _SPECS.move_to_end(workflow_id)
        return spec


def _remember_spec(workflow_id: str, raw: dict[str, Any]) -> _Spec:
    spec = _Spec(str(raw.get("name", "")), {step["id"]: step for step in raw["steps"]})
    with _specs_lock:
        _SPECS[workflow_id] = spec
        while len(_SPECS) > _SPECS_MAX:
            _SPECS.popitem(last=False)
    return spec


def _spec_steps(tx: _Tx) -> dict[str, dict[str, Any]]:
    """The workflow's step specs by id. A spec never changes after submit, so each process
    parses it once (an LRU of recent workflows) instead of in every transaction."""
    wid = tx.workflow.id
    spec = _cached_spec(wid) or _remember_spec(wid, tx.workflow.spec)  # loads it if deferred
    return spec.steps


def _step_spec(tx: _Tx, step_id: str) -> dict[str, Any]:
    step = _spec_steps(tx).get(step_id)
    if step is None:
        raise NotFoundError(f"step {step_id!r} is not in workflow {tx.workflow.id}")
    return dict(step)


def _ancestors(specs: Mapping[str, Mapping[str, Any]], step_id: str) -> set[str]:
    """Every step ``step_id`` depends on, transitively (what its templates may read)."""
    seen: set[str] = set()
    todo = [step_id]
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
            if s.status is StepStatus.pending or s.status in SENDABLE:
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


# A delivery may claim a step that is ready for exactly this attempt, or (a redelivery after
# a worker died mid-step: acks_late) one already running this attempt; never a step of a
# workflow that has ended.
def _claimable(attempt: int) -> Any:
    live_workflow = (
        select(WorkflowRun.id)
        .where(
            WorkflowRun.id == StepRun.workflow_id,
            WorkflowRun.status == WorkflowStatus.running,
        )
        .exists()
    )
    return and_(
        or_(
            and_(
                col(StepRun.status).in_(SENDABLE),
                col(StepRun.attempts) == attempt - 1,
            ),
            and_(
                col(StepRun.status) == StepStatus.running,
                col(StepRun.attempts) == attempt,
            ),
        ),
        live_workflow,
    )


def _claim(step_run_id: str, attempt: int) -> StepWork | None:
    # A claim changes only its own step's row, so it is one conditional UPDATE: no workflow
    # lock. A writer that holds the lock (a cancel, a failing sibling) and overwrites the
    # row afterwards wins, and the worker then finds its result refused.
    now = utcnow()
    with db.session_scope(write=True) as session:
        claimed = session.execute(
            update(StepRun)
            .where(col(StepRun.id) == step_run_id, _claimable(attempt))
            .values(status=StepStatus.running, attempts=attempt, started_at=now, updated_at=now)
            .returning(
                col(StepRun.workflow_id),
                col(StepRun.step_id),
                col(StepRun.kind),
                col(StepRun.model),
                col(StepRun.queued_at),
                col(StepRun.error),
            )
            .execution_options(synchronize_session=False)
        ).first()
        if claimed is None:
            _log_stale(session, step_run_id, attempt)
            return None
        workflow_id, step_id, kind, model, queued_at, error = claimed
        spec = _cached_spec(workflow_id)
        if spec is None:
            raw = session.exec(select(WorkflowRun.spec).where(WorkflowRun.id == workflow_id)).one()
            spec = _remember_spec(workflow_id, dict(raw))
        # The steps its templates may read are finished: their rows no longer change.
        ancestors = _ancestors(spec.steps, step_id)
        rows = (
            session.execute(
                sa_select(
                    col(StepRun.step_id),
                    col(StepRun.status),
                    col(StepRun.output),
                    col(StepRun.attempts),
                    col(StepRun.error),
                ).where(
                    col(StepRun.workflow_id) == workflow_id,
                    col(StepRun.step_id).in_(ancestors),
                )
            ).all()
            if ancestors
            else []
        )
    step_spec = spec.steps[step_id]
    context_steps = {
        sid: {"status": st.value, "output": out, "attempts": n, "error": err}
        for sid, st, out, n, err in rows
    }
    context_steps[step_id] = {
        "status": StepStatus.running.value,
        "output": None,
        "attempts": attempt,
        "error": error,
    }
    context = {"workflow": {"id": workflow_id, "name": spec.name}, "steps": context_steps}
    work = StepWork(
        step_run_id=step_run_id,
        workflow_id=workflow_id,
        step_id=step_id,
        kind=kind,
        model=model,
        attempt=attempt,
        input=step_spec["input"],
        timeout_s=step_spec.get("timeout_s"),
        queued_ms=((now - queued_at).total_seconds() * 1000) if queued_at else 0.0,
    )
    # Rendered after the commit: what it reads no longer changes.
    try:
        work.input = render_value(step_spec["input"], context)
    except (TemplateError, TypeError, ValueError) as exc:
        work.input_error = f"input template failed to render: {exc}"
    return work


def _log_stale(session: Session, step_run_id: str, attempt: int) -> None:
    found = session.exec(
        select(StepRun.status, StepRun.attempts).where(StepRun.id == step_run_id)
    ).first()
    if found is None:
        raise _StepGone(f"no step run {step_run_id!r}")
    log.info(
        "dropping stale delivery of step %s attempt %s (%s, attempt %s)",
        step_run_id,
        attempt,
        found[0],
        found[1],
    )


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
