"""The workflow engine: create runs, finish steps, advance, cancel (a worker takes its
step in :mod:`app.claims`).

Every state change runs in :func:`_locked`, one transaction that first locks the workflow
row, so writers of one workflow take turns; ready steps are marked ``queued`` inside it and
sent to their model's queue only after the commit (send after commit). Claims and results
are conditional on (status, attempt), so a step delivered twice records one result and
advances the workflow once.
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from collections.abc import Awaitable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any, Protocol, runtime_checkable

from jinja2 import TemplateError
from sqlalchemy import Connection
from sqlalchemy.exc import DBAPIError
from sqlmodel import Session, select

from app import claims, notify, prepared, rows, specs
from app.store import db
from app.core.errors import ConflictError, NotFoundError
from app.rows import SENDABLE, StepState, WorkflowState
from app.workflows.schemas import WorkflowPublic
from app.workflows.spec import ValidatedWorkflow
from app.store.tables import StepRun, StepStatus, WorkflowRun, WorkflowStatus, new_id, utcnow
from app.workflows.templating import evaluate

log = logging.getLogger(__name__)

__all__ = ["SENDABLE", "Dispatch", "Dispatcher"]


@dataclass(frozen=True)
class Dispatch:
    """A step to put on its model's queue once the transaction that readied it commits."""

    step_run_id: str
    model: str
    attempt: int
    countdown: float = 0.0
    # The work its message carries so that the worker need not read it (app.claims.carry).
    work: str | None = field(default=None, compare=False, repr=False)


class Dispatcher(Protocol):
    """Sends dispatches to the broker (Celery in production and in the tests)."""

    def send(self, dispatches: Sequence[Dispatch]) -> None: ...


@runtime_checkable
class AsyncDispatcher(Protocol):
    """A dispatcher that can also send from an event loop without blocking it."""

    def send(self, dispatches: Sequence[Dispatch]) -> None: ...

    async def send_async(
        self, dispatches: Sequence[Dispatch], committed: Awaitable[object] | None = None
    ) -> None:
        """:meth:`send`, awaited. ``committed``: the commit of the steps' rows, under way
        (a submit that sends before it, :attr:`Created.send_early`), awaited after the
        push and before anything is written about the steps; its error is raised."""


@dataclass
class _Tx:
    """One engine transaction on a workflow: its row, its steps as read, what to send."""

    conn: Connection | None  # None while a run is settled in memory (plan, as seen)
    workflow: WorkflowState
    dispatches: list[Dispatch] = field(default_factory=list)
    step_id: str | None = None  # the spec id of the step _locked was given, if any
    rows: dict[str, StepState] | None = None  # by spec id, in spec order, once read
    persisted: bool = True  # False while create_workflow settles rows not yet inserted

    def steps(self) -> dict[str, StepState]:
        """The workflow's steps (their status columns only), as read with its lock."""
        assert self.rows is not None
        return self.rows

    @property
    def db(self) -> Connection:
        """The transaction's connection (a run already written has one, unless its result
        is settled in memory against what the worker saw: that settle needs no read)."""
        if self.conn is None:
            assert self.persisted, "a run being created is settled without reads"
            raise _NeedsRead(self.workflow.id)
        return self.conn

    def commit(self, *, view: bool = False) -> notify.Carried | None:
        """Write what the block changed and commit (on PostgreSQL, one round trip); with
        ``view``, on a database server, read the workflow's view in the same script."""
        writes = rows.writes(self.workflow, (self.rows or {}).values())
        return _script(self.db, self.workflow.id, writes, view=view, commit=True)


def _script(
    conn: Connection,
    workflow_id: str,
    statements: list[prepared.Statement],
    *,
    view: bool,
    commit: bool = False,
) -> notify.Carried | None:
    """Run a script that writes ``workflow_id``; with ``view``, on a database server, it
    reads the workflow's view (:data:`app.rows.VIEW`) last, in the same transaction, and
    returns it as a finish notice carries it (SQLite's reads are calls in the API's
    process: no round trip to save)."""
    if not view or conn.dialect.name != "postgresql":
        prepared.script(conn, statements, commit=commit)
        return None
    viewed = [*statements, (rows.VIEW, {"workflow_id": workflow_id})]
    found = prepared.script(conn, viewed, commit=commit)[-1]
    if not found:
        return None
    return notify.Carried(found[0].api_key_id, WorkflowPublic.of_view(found).model_dump_json())


class StepGone(NotFoundError):
    """The step run a task names does not exist: any more, or not yet (a carried step whose
    submit has not committed, :func:`app.claims.submitted`)."""


class _NeedsRead(Exception):
    """A settle in memory (:func:`_complete_as_seen`) needed a read: a condition's inputs,
    a failed step's error. The result takes the locked path instead."""


@contextmanager
def _locked(
    workflow_id: str | None, dispatcher: Dispatcher | None, *, step_run_id: str | None = None
) -> Iterator[_Tx]:
    # One statement finds the workflow (by id, or through the step a task names) and locks
    # its row: FOR UPDATE OF workflow_run on PostgreSQL; on SQLite the write transaction's
    # BEGIN IMMEDIATE already holds the database's write lock. A second reads its steps,
    # after the lock (on PostgreSQL each statement of a script reads a fresh snapshot: what
    # the lock waited for is seen). Both go to a database server in one round trip, with
    # the BEGIN; what the block changed goes in a second, with the COMMIT. Sends and the
    # "finished" notice go out after the commit.
    with db.connection_scope(write=True, explicit=True) as conn:
        step_id: str | None = None
        if workflow_id is None:
            params = {"step_run_id": step_run_id}
            lock, found = prepared.script(
                conn, [(rows.LOCK_BY_STEP, params), (rows.STEPS_BY_STEP, params)], begin=True
            )
            if not lock:
                raise StepGone(f"no step run {step_run_id!r}")
            wid, name, status, step_id = lock[0]
        else:
            params = {"workflow_id": workflow_id}
            lock, found = prepared.script(
                conn, [(rows.LOCK_BY_ID, params), (rows.STEPS, params)], begin=True
            )
            if not lock:
                raise NotFoundError(f"no workflow {workflow_id!r}")
            wid, name, status = lock[0]
        tx = _Tx(conn, WorkflowState(wid, name, status), step_id=step_id)
        tx.rows = {r.step_id: StepState(*r) for r in found}
        was_terminal = status.terminal
        yield tx
        carried = tx.commit(view=tx.workflow.status.terminal and not was_terminal)
    _committed(tx, was_terminal, dispatcher, carried)


def _committed(
    tx: _Tx, was_terminal: bool, dispatcher: Dispatcher | None, carried: notify.Carried | None
) -> None:
    """What goes out after a transaction's commit: its sends, and the "finished" notice
    (with the view the transaction read, if it read one)."""
    if tx.dispatches and dispatcher is not None:
        dispatcher.send(tx.dispatches)
    if tx.workflow.status.terminal and not was_terminal:
        # Wakes long-polling readers (after the commit).
        notify.publish_finished(tx.workflow.id, carried)


@dataclass(frozen=True, slots=True)
class Created:
    """A workflow just written: its id and its first status (``running``, or already
    ended when every step was skipped at once). Not the ORM row: building a ``WorkflowRun``
    costs about 50 µs, a tenth of the engine's whole submit on SQLite."""

    id: str
    status: WorkflowStatus
    dispatches: tuple[Dispatch, ...] = ()  # what the caller sends (no dispatcher given)

    @property
    def send_early(self) -> bool:
        """Whether the caller may send before its commit has returned: its one step
        carries its work (a database server), so its worker reads nothing before the
        model, and the submit's statements begin with :data:`app.rows.SUBMIT_LOCK`, which
        the worker's first write waits on (:func:`app.claims.submitted`)."""
        return len(self.dispatches) == 1 and self.dispatches[0].work is not None


def create_workflow(
    validated: ValidatedWorkflow,
    dispatcher: Dispatcher | None,
    *,
    api_key_id: int | None = None,
    idempotency_key: str | None = None,
    request_hash: str | None = None,
    workflow_id: str | None = None,
) -> Created:
    """Write a run and its steps, commit, then enqueue the steps that are ready.

    ``workflow_id`` chooses the run's id (a caller that waits for the end registers for
    its notice before anything can finish); by default a new one. Without a
    ``dispatcher`` nothing is sent or announced here: the caller sends the returned
    ``dispatches`` and announces a run that ended at once (the API's event loop does,
    without blocking).
    """
    created, statements = plan_workflow(
        validated,
        api_key_id=api_key_id,
        idempotency_key=idempotency_key,
        request_hash=request_hash,
        workflow_id=workflow_id,
    )
    with db.connection_scope(write=True, explicit=True) as conn:
        # Without BEGIN and COMMIT, one script is one transaction: all of it or nothing.
        prepared.script(conn, statements)
    if dispatcher is None:
        return created
    if created.dispatches:
        dispatcher.send(list(created.dispatches))
    if created.status.terminal:  # every step skipped at once
        notify.publish_finished(created.id)
    return Created(created.id, created.status)


def plan_workflow(
    validated: ValidatedWorkflow,
    *,
    api_key_id: int | None = None,
    idempotency_key: str | None = None,
    request_hash: str | None = None,
    workflow_id: str | None = None,
) -> tuple[Created, list[prepared.Statement]]:
    """A new run, settled in memory: what it is once written (with the steps to send
    after the commit) and the statements that write it (:func:`app.prepared.script`).

    The steps are settled before they are written, so each row is inserted in its first
    state (``queued`` or ``pending``): one INSERT for the run, one for its steps. Nothing
    here touches the database; :func:`create_workflow` runs the statements in the thread
    that calls it, the API's event loop awaits them on PostgreSQL (:mod:`app.loopdb`).
    """
    spec = validated.spec
    now = utcnow()
    run: dict[str, Any] = {
        "id": workflow_id or new_id(),
        "name": spec.name,
        "status": WorkflowStatus.running,
        "spec": validated.dump(),
        "api_key_id": api_key_id,
        "idempotency_key": idempotency_key,
        "request_hash": request_hash,
        "error": None,
        "created_at": now,
        "updated_at": now,
        "finished_at": None,
    }
    specs.remember(run["id"], run["spec"])
    states = {
        s.id: StepState(new_id(), s.id, s.model, StepStatus.pending, 0, s.retry.max_attempts)
        for s in spec.steps
    }
    tx = _Tx(None, WorkflowState(run["id"], spec.name, WorkflowStatus.running))
    tx.rows, tx.persisted = states, False
    _settle(tx, states)
    run.update(tx.workflow.changed)
    new_steps = [
        {
            "id": state.id,
            "workflow_id": run["id"],
            "step_id": step.id,
            "position": position,
            "kind": step.kind,
            "model": step.model,
            "status": StepStatus.pending,
            "depends_on": list(step.depends_on),
            "attempts": 0,
            "max_attempts": state.max_attempts,
            "output": None,
            "error": None,
            "queued_at": None,
            "dispatched_at": None,
            "started_at": None,
            "finished_at": None,
            "updated_at": now,
            **state.changed,
        }
        for position, (step, state) in enumerate(zip(spec.steps, states.values(), strict=True))
    ]
    dispatches = tx.dispatches
    statements = rows.inserts(run, new_steps)
    # A step that nothing else in the workflow runs beside carries its work to a worker
    # that would read it from a database server (SQLite's read is a call in its process).
    if len(dispatches) == 1 and not db.reads_in_process():
        step = next(s for s in states.values() if s.id == dispatches[0].step_run_id)
        queued_at = step.changed["queued_at"]
        work = claims.carry(run["id"], run["spec"], step, states.values(), queued_at)
        dispatches = [replace(dispatches[0], work=work)]
        if work is not None:  # it may be sent before the commit: see Created.send_early
            statements.insert(0, (rows.SUBMIT_LOCK, {"workflow_id": run["id"]}))
    return Created(run["id"], run["status"], tuple(dispatches)), statements


def find_idempotent(session: Session, api_key_id: int | None, key: str) -> WorkflowRun | None:
    """The run an earlier submit with this Idempotency-Key created, if any."""
    return session.exec(
        select(WorkflowRun).where(
            WorkflowRun.api_key_id == api_key_id, WorkflowRun.idempotency_key == key
        )
    ).first()


_KNOWN = frozenset({"output", "error"})  # what a condition reads of a step, besides its status


def _context(tx: _Tx, steps: dict[str, StepState], step_id: str) -> dict[str, Any]:
    """What a condition of ``step_id`` may read: the workflow and the steps above it.

    Columns this transaction changed come from memory (a result's output and error); the
    rest (earlier outputs) are read, for those steps only.
    """
    ancestors = specs.ancestors(specs.spec_of(tx.conn, tx.workflow.id).steps, step_id)
    found: dict[str, dict[str, Any]] = {}
    unknown = [a for a in sorted(ancestors) if not steps[a].changed.keys() >= _KNOWN]
    if unknown and tx.persisted:
        params = {"workflow_id": tx.workflow.id, "step_ids": unknown}
        for sid, status, output, attempts, error in tx.db.execute(rows.CONTEXT, params):
            found[sid] = {"status": status, "output": output, "attempts": attempts, "error": error}
    context: dict[str, dict[str, Any]] = {}
    for sid in ancestors:
        state = steps[sid]
        entry = found.get(sid, {"output": None, "error": None})
        entry.update(
            {k: state.changed[k] for k in ("output", "error") if k in state.changed},
            status=state.status.value,
            attempts=state.attempts,
        )
        context[sid] = entry
    return {"workflow": {"id": tx.workflow.id, "name": tx.workflow.name}, "steps": context}


def _settle(tx: _Tx, steps: dict[str, StepState]) -> None:
    """Decide every pending step whose dependencies are done; then the workflow's status."""
    now = utcnow()
    step_specs = specs.spec_of(tx.conn, tx.workflow.id).steps
    changed = tx.workflow.status is WorkflowStatus.running
    while changed:
        changed = False
        for step in steps.values():
            if step.status is not StepStatus.pending:
                continue
            spec = step_specs[step.step_id]
            deps = [steps[d] for d in spec.get("depends_on") or ()]
            if not all(d.status.terminal for d in deps):
                continue
            changed = True
            if any(d.status in (StepStatus.failed, StepStatus.cancelled) for d in deps):
                step.set(status=StepStatus.cancelled, finished_at=now, updated_at=now)
                step.set(error="cancelled: a dependency did not succeed")
                continue
            if deps and all(d.status is StepStatus.skipped for d in deps):
                step.set(status=StepStatus.skipped, finished_at=now, updated_at=now)
                step.set(error="skipped: every dependency was skipped")
                continue
            when = spec.get("when")
            if when:
                try:
                    go = evaluate(when, _context(tx, steps, step.step_id))
                except (TemplateError, TypeError, ValueError, ArithmeticError) as exc:
                    step.set(status=StepStatus.failed, finished_at=now, updated_at=now)
                    step.set(error=f"condition {when!r} failed to evaluate: {exc}")
                    continue
                if not go:
                    step.set(status=StepStatus.skipped, finished_at=now, updated_at=now)
                    step.set(error=f"skipped: condition {when!r} is false")
                    continue
            step.set(status=StepStatus.queued, queued_at=now, dispatched_at=None, updated_at=now)
            tx.dispatches.append(Dispatch(step.id, step.model, step.attempts + 1))
    _finish_workflow(tx, steps)


def _finish_workflow(tx: _Tx, steps: dict[str, StepState]) -> None:
    run = tx.workflow
    if run.status.terminal:
        return
    now = utcnow()
    failed = [s for s in steps.values() if s.status is StepStatus.failed]
    if failed:
        error = failed[0].changed.get("error") or _error_of(tx, failed[0])
        run.set(status=WorkflowStatus.failed, finished_at=now, updated_at=now)
        run.set(error=f"step {failed[0].step_id!r} failed: {error}")
        # Nothing new starts; steps already running finish and record their result.
        for s in steps.values():
            if s.status is StepStatus.pending or s.status in SENDABLE:
                s.set(status=StepStatus.cancelled, finished_at=now, updated_at=now)
                s.set(error=f"cancelled: workflow failed at step {failed[0].step_id!r}")
        tx.dispatches.clear()
    elif all(s.status.terminal for s in steps.values()):
        run.set(status=WorkflowStatus.succeeded, finished_at=now, updated_at=now)


def _error_of(tx: _Tx, step: StepState) -> str | None:
    if not tx.persisted:
        return None
    params = {"workflow_id": tx.workflow.id, "step_ids": [step.step_id]}
    found = tx.db.execute(rows.CONTEXT, params).first()
    return found.error if found is not None else None


def _owns(tx: _Tx, step: StepState, attempt: int, started_at: datetime | None) -> bool:
    """Whether this attempt's result may be stored: the step is running this attempt, or
    (a claim left for later, see :func:`app.claims.open_step`) still ready for exactly
    this attempt in a running workflow, which the result then claims, as of
    ``started_at``."""
    if step.status is StepStatus.running:
        return step.attempts == attempt
    if (
        step.status in SENDABLE
        and step.attempts == attempt - 1
        and tx.workflow.status is WorkflowStatus.running
    ):
        step.set(status=StepStatus.running, attempts=attempt, started_at=started_at or utcnow())
        return True
    return False


def complete_step(
    step_run_id: str,
    attempt: int,
    output: dict[str, Any],
    dispatcher: Dispatcher,
    *,
    started_at: datetime | None = None,
    seen: rows.Seen | None = None,
) -> bool:
    """Store a step's output and advance; False when this attempt no longer owns the step.
    ``started_at``: when the worker started it, for a step it never marked running.
    ``seen``: the workflow's states as the worker read them (PostgreSQL), to store the
    result in one round trip while they still hold (:func:`_complete_as_seen`)."""
    if seen is not None:
        stored = _complete_as_seen(seen, attempt, output, dispatcher, started_at)
        if stored is not None:
            return stored
    with _locked(None, dispatcher, step_run_id=step_run_id) as tx:
        return _succeed(tx, attempt, output, started_at)


def _succeed(tx: _Tx, attempt: int, output: dict[str, Any], started_at: datetime | None) -> bool:
    steps = tx.steps()
    step = steps[str(tx.step_id)]
    if not _owns(tx, step, attempt, started_at):
        return False
    now = utcnow()
    step.set(status=StepStatus.succeeded, output=output, error=None)
    step.set(finished_at=now, updated_at=now)
    _settle(tx, steps)
    return True


# In this process: results stored in one round trip against what their worker saw, and
# those whose states had changed by then (then stored by the locked path).
SEEN_RESULTS: Counter[str] = Counter()


def _complete_as_seen(
    seen: rows.Seen,
    attempt: int,
    output: dict[str, Any],
    dispatcher: Dispatcher,
    started_at: datetime | None,
) -> bool | None:
    """Store a result in one round trip to the database server; None when the locked path
    must decide instead.

    The locked path makes two: the lock and the read of the steps, then the writes and
    the ``COMMIT``. Here the steps are the ones the worker read when it took the step
    (:class:`app.rows.Seen`), settled in memory as the locked path would settle them, and
    one script locks the workflow, checks that its states are still those
    (:data:`app.rows.UNCHANGED`, which fails the script otherwise) and writes. A script
    without ``BEGIN`` is one implicit transaction, so a failed check writes nothing; the
    locked path then reads and settles again. A settle that needs a read (a condition's
    inputs) takes the locked path before anything is sent.
    """
    workflow, steps = seen.states()
    tx = _Tx(None, workflow, step_id=seen.step_id, rows=steps)
    try:
        if not _succeed(tx, attempt, output, started_at):
            return None  # not this attempt's by what was seen: the locked path decides
    except (_NeedsRead, specs.NotCached):  # NotCached: the spec left this process's cache
        return None
    check = {"workflow_id": workflow.id, "seen": seen.text()}
    lock = (rows.LOCK_BY_ID, {"workflow_id": workflow.id})
    statements = [lock, (rows.UNCHANGED, check), *rows.writes(tx.workflow, steps.values())]
    try:
        with db.connection_scope(write=True, explicit=True) as conn:
            carried = _script(conn, workflow.id, statements, view=tx.workflow.status.terminal)
    except DBAPIError as exc:
        if rows.STATES_CHANGED not in str(exc.orig):
            raise
        SEEN_RESULTS["changed"] += 1
        log.debug("workflow %s changed since its step was taken: %s", workflow.id, exc.orig)
        return None
    SEEN_RESULTS["stored"] += 1
    _committed(tx, False, dispatcher, carried)
    return True


def fail_step(
    step_run_id: str,
    attempt: int,
    error: str,
    *,
    retryable: bool,
    dispatcher: Dispatcher,
    started_at: datetime | None = None,
) -> StepStatus | None:
    """Record a failed attempt: retry with backoff if allowed, else fail the workflow."""
    with _locked(None, dispatcher, step_run_id=step_run_id) as tx:
        steps = tx.steps()
        step = steps[str(tx.step_id)]
        if not _owns(tx, step, attempt, started_at):
            return None
        now = utcnow()
        step.set(error=error, updated_at=now)
        if retryable and attempt < step.max_attempts and not tx.workflow.status.terminal:
            retry = specs.spec_of(tx.conn, tx.workflow.id).steps[step.step_id].get("retry") or {}
            delay = backoff_delay(
                attempt, float(retry.get("backoff_s", 1.0)), float(retry.get("max_backoff_s", 60.0))
            )
            step.set(status=StepStatus.retrying, queued_at=now, dispatched_at=None)
            tx.dispatches.append(Dispatch(step.id, step.model, attempt + 1, delay))
        else:
            step.set(status=StepStatus.failed, finished_at=now)
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
        run.set(status=WorkflowStatus.cancelled, finished_at=now, updated_at=now)
        run.set(error="cancelled by request")
        for step in tx.steps().values():
            if not step.status.terminal:
                step.set(status=StepStatus.cancelled, finished_at=now, updated_at=now)
                step.set(error="cancelled by request")
    with db.session_scope() as session:
        cancelled = session.get(WorkflowRun, workflow_id)
        if cancelled is None:  # deleted in between: report what was committed
            raise NotFoundError(f"no workflow {workflow_id!r}")
        return cancelled


def note_cancelled(step_run_id: str, attempt: int, detail: str, *, claimed: bool = True) -> None:
    """Record on a cancelled step what the worker that was running it did (``claimed``:
    whether that worker had marked it running, which counted its attempt)."""
    counted = attempt if claimed else attempt - 1
    with db.session_scope(write=True) as session:
        step = session.get(StepRun, step_run_id)
        if step is not None and step.status is StepStatus.cancelled and step.attempts == counted:
            step.error = detail
            step.attempts = attempt
