"""Workflow transactions: create a run, claim a step, store a result, cancel.

Each state change but a claim is one transaction that locks the workflow's row (``SELECT
… FOR UPDATE`` on PostgreSQL; SQLite's ``BEGIN IMMEDIATE`` holds the database's write
lock), reads its steps, asks :mod:`app.workflows.rules` what follows and writes the
answer. So writers of one workflow take turns, and "send each ready step once" holds when
two parents finish at the same moment. A claim is one conditional ``UPDATE`` of its own
step (rules.claim's condition; on PostgreSQL it share-locks the workflow's row, so it
takes turns with those transactions but not with other claims). What to send comes back
in an :class:`Outcome`; the caller sends it after the commit (:mod:`app.workflows.service`).
The statements are :mod:`app.store.queries`'.
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
from sqlalchemy import Connection, Row

from app.core.errors import ConflictError, NotFoundError
from app.store import db, queries
from app.store.tables import StepStatus, WorkflowStatus, new_id, utcnow
from app.workflows import rules
from app.workflows.names import celery_priority
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
    priority: int = 0  # Celery priority: 0 normal, names.LOW_PRIORITY for a low workflow


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


@dataclass(frozen=True, slots=True)
class _Spec:
    """What the engine keeps of a workflow's spec: it never changes after submit."""

    name: str
    defs: dict[str, StepDef]
    steps: dict[str, dict[str, Any]]  # each step's spec (JSON form), by id
    reads_outputs: bool  # a condition may read step outputs
    priority: str = "normal"  # specs stored before priorities existed have none

    @classmethod
    def of(cls, name: str, spec: Mapping[str, Any]) -> _Spec:
        steps = {s["id"]: s for s in spec["steps"]}
        defs = {sid: StepDef.of(s) for sid, s in steps.items()}
        reads = any(d.when for d in defs.values())
        return cls(name, defs, steps, reads, spec.get("priority", "normal"))


# Specs by workflow id, so a process reads each workflow's spec at most once.
_specs: LRUCache[str, _Spec] = LRUCache(maxsize=1024)
_cache_lock = threading.Lock()


def _spec_of(conn: Connection, workflow_id: str) -> _Spec:
    """A workflow's spec: cached, else read once."""
    with _cache_lock:
        spec = _specs.get(workflow_id)
    if spec is None:
        name, raw = conn.execute(queries.READ_SPEC, {"wid": workflow_id}).one()
        spec = _Spec.of(name, raw)
        with _cache_lock:
            _specs[workflow_id] = spec
    return spec


def forget_specs() -> None:
    """Drop every cached spec (a fresh process's state; tests)."""
    with _cache_lock:
        _specs.clear()


# ---- the locked transaction ------------------------------------------------------------


@dataclass
class _Locked:
    """A workflow inside a transaction that holds its lock: its state as the rules see it,
    and what the writes need (step run ids and models by spec id)."""

    conn: Connection
    run: rules.Run
    api_key_id: int | None
    ids: dict[str, str]
    models: dict[str, str]
    spec: _Spec

    def apply(self, nxt: rules.Next, step_id: str | None = None) -> Outcome:
        """Write a transition's changes (committed when the transaction ends)."""
        now = utcnow()
        if "" in nxt.changed:
            self.conn.execute(
                queries.UPDATE_WORKFLOW,
                {
                    "wid": self.run.id,
                    "status": nxt.run.status,
                    "error": nxt.run.error,
                    "finished_at": now,
                    "updated_at": now,
                },
            )
        queries.write_steps(
            self.conn,
            (
                _step_change(self.ids[sid], self.run.steps[sid], nxt.run.steps[sid], now)
                for sid in nxt.changed - {""}
            ),
        )
        return _outcome(nxt, self.ids, self.models, step_id, self.spec.priority)


def _step_change(
    step_run_id: str, old: rules.StepState, new: rules.StepState, now: datetime
) -> dict[str, Any]:
    """The columns a step's row changes from ``old`` to ``new`` (its timestamps too)."""
    values: dict[str, Any] = {
        "sid": step_run_id,
        "status": new.status,
        "attempts": new.attempts,
        "error": new.error,
        "updated_at": now,
    }
    if new.status is not old.status:
        if new.status in rules.SENDABLE:
            values["queued_at"], values["dispatched_at"] = now, None
        elif new.status is StepStatus.running:
            values["started_at"] = now
        elif new.status.terminal:
            values["finished_at"] = now
    if new.output is not old.output:
        values["output"] = new.output
    return values


def _outcome(
    nxt: rules.Next,
    ids: Mapping[str, str],
    models: Mapping[str, str],
    step_id: str | None,
    priority: str,
) -> Outcome:
    pri = celery_priority(priority)
    dispatches = tuple(
        Dispatch(ids[s.step_id], models[s.step_id], s.attempt, s.delay_s, pri) for s in nxt.sends
    )
    status = nxt.run.steps[step_id].status if step_id else None
    return Outcome(nxt.run.id, nxt.run.status, nxt.finished, dispatches, status)


@contextmanager
def _locked(*, workflow_id: str | None = None, step_run_id: str | None = None) -> Iterator[_Locked]:
    """A write transaction on one workflow (by its id, or through one of its steps) that
    holds the workflow's lock and has read its steps."""
    with db.connection_scope(write=True) as conn:
        if step_run_id is not None:
            found = conn.execute(queries.LOCK_WORKFLOW_OF_STEP, {"sid": step_run_id}).first()
            if found is None:
                raise StepGone(f"no step run {step_run_id!r}")
        else:
            found = conn.execute(queries.LOCK_WORKFLOW, {"wid": workflow_id}).first()
            if found is None:
                raise NotFoundError(f"no workflow {workflow_id!r}")
        spec = _spec_of(conn, found.id)
        with_outputs = spec.reads_outputs
        query = queries.STEP_STATES_WITH_OUTPUTS if with_outputs else queries.STEP_STATES
        rows = conn.execute(query, {"wid": found.id}).all()
        steps = {
            r.step_id: rules.StepState(
                r.status, r.attempts, r.output if with_outputs else None, r.error
            )
            for r in rows
        }
        run = rules.Run(found.id, found.name, found.status, steps, found.error)
        ids = {r.step_id: r.id for r in rows}
        models = {r.step_id: r.model for r in rows}
        yield _Locked(conn, run, found.api_key_id, ids, models, spec)


# ---- transactions -------------------------------------------------------------------------


def create(
    validated: ValidatedWorkflow,
    *,
    api_key_id: int | None = None,
    idempotency_key: str | None = None,
    request_hash: str | None = None,
) -> Outcome:
    """Write a new run and its steps in one commit, its first steps already decided."""
    spec, raw = validated.spec, validated.dump()
    workflow_id, now = new_id(), utcnow()
    cached = _Spec.of(spec.name, raw)
    with _cache_lock:
        _specs[workflow_id] = cached
    fresh = {s.id: rules.StepState() for s in spec.steps}
    nxt = rules.start(cached.defs, rules.Run(workflow_id, spec.name, WorkflowStatus.running, fresh))
    ids = {s.id: new_id() for s in spec.steps}
    models = {s.id: s.model for s in spec.steps}
    ended = nxt.run.status.terminal
    steps = []
    for i, s in enumerate(spec.steps):
        state = nxt.run.steps[s.id]
        row = _step_change(ids[s.id], fresh[s.id], state, now)
        row["id"] = row.pop("sid")
        row.setdefault("queued_at", None)
        row.setdefault("finished_at", None)
        steps.append(
            {
                **row,
                "workflow_id": workflow_id,
                "step_id": s.id,
                "position": i,
                "kind": s.kind,
                "model": s.model,
                "depends_on": list(s.depends_on),
                "max_attempts": s.retry.max_attempts,
                "output": None,
                "dispatched_at": None,
                "started_at": None,
            }
        )
    with db.connection_scope(write=True) as conn:
        conn.execute(
            queries.INSERT_WORKFLOW,
            {
                "id": workflow_id,
                "name": spec.name,
                "status": nxt.run.status,
                "spec": raw,
                "api_key_id": api_key_id,
                "idempotency_key": idempotency_key,
                "request_hash": request_hash,
                "error": nxt.run.error,
                "created_at": now,
                "updated_at": now,
                "finished_at": now if ended else None,
            },
        )
        conn.execute(queries.INSERT_STEPS, steps)
    return _outcome(nxt, ids, models, None, cached.priority)


def claim(step_run_id: str, attempt: int) -> StepWork | None:
    """Mark ``attempt`` of a step running and return its work (its input rendered against
    the steps above it); None when this delivery is not the step's to run."""
    now = utcnow()
    # One statement: it commits on its own. What it reads after never changes again.
    with db.autocommit_scope(write=True) as conn:
        row = conn.execute(
            queries.CLAIM, {"sid": step_run_id, "attempt": attempt, "now": now}
        ).first()
        if row is None:
            if conn.execute(queries.STEP_EXISTS, {"sid": step_run_id}).first() is None:
                raise StepGone(f"no step run {step_run_id!r}")
            return None
        spec = _spec_of(conn, row.workflow_id)
        above = rules.ancestors(spec.defs, row.step_id)
        ended = (
            conn.execute(queries.ANCESTORS, {"wid": row.workflow_id, "ids": above}).all()
            if above
            else []
        )
    step_spec = spec.steps[row.step_id]
    work = StepWork(
        step_run_id=row.id,
        workflow_id=row.workflow_id,
        step_id=row.step_id,
        kind=row.kind,
        model=row.model,
        attempt=attempt,
        input=step_spec["input"],
        timeout_s=step_spec.get("timeout_s"),
        queued_ms=(now - row.queued_at).total_seconds() * 1000 if row.queued_at else 0.0,
        started_at=now,
    )
    states = {r.step_id: rules.StepState(r.status, r.attempts, r.output, r.error) for r in ended}
    run = rules.Run(row.workflow_id, spec.name, WorkflowStatus.running, states)
    context = rules.context(spec.defs, run, row.step_id)
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
        nxt = rules.succeed(tx.spec.defs, tx.run, step_id, attempt, output)
        return None if nxt is None else tx.apply(nxt, step_id)


def fail(step_run_id: str, attempt: int, error: str, *, retryable: bool) -> Outcome | None:
    """Record a failed attempt: a retry with backoff, or the step's and workflow's end."""
    with _locked(step_run_id=step_run_id) as tx:
        step_id = _step_id(tx, step_run_id)
        nxt = rules.fail(
            tx.spec.defs,
            tx.run,
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
        if tx.api_key_id != api_key_id:
            raise NotFoundError(f"no workflow {workflow_id!r}")
        nxt = rules.cancel(tx.run)
        if nxt is None:
            raise ConflictError(f"workflow {workflow_id} is already {tx.run.status.value}")
        return tx.apply(nxt)


def note_cancelled(step_run_id: str, attempt: int, detail: str) -> None:
    """Record on a cancelled step what the worker that was running it did."""
    with db.autocommit_scope(write=True) as conn:
        conn.execute(
            queries.NOTE_CANCELLED, {"sid": step_run_id, "attempt": attempt, "error": detail}
        )


def _step_id(tx: _Locked, step_run_id: str) -> str:
    for step_id, sid in tx.ids.items():
        if sid == step_run_id:
            return step_id
    raise StepGone(f"no step run {step_run_id!r}")


# ---- reads ------------------------------------------------------------------------------


def find_idempotent(api_key_id: int | None, key: str) -> Row[Any] | None:
    """The run an earlier submit with this Idempotency-Key created, if any."""
    with db.autocommit_scope() as conn:
        return conn.execute(queries.IDEMPOTENT, {"key_id": api_key_id, "key": key}).first()


def read(workflow_id: str, api_key_id: int | None) -> tuple[Row[Any], Sequence[Row[Any]]]:
    """A workflow of ``api_key_id`` (without its spec) and its steps, in spec order."""
    with db.autocommit_scope() as conn:  # the steps are read after the workflow's row
        workflow, steps = queries.read_run(conn, workflow_id)
    if workflow is None or workflow.api_key_id != api_key_id:
        raise NotFoundError(f"no workflow {workflow_id!r}")
    return workflow, steps


def priority_of(workflow_id: str) -> str:
    """A workflow's priority (``normal`` or ``low``), from the spec cache or read once."""
    with _cache_lock:
        cached = _specs.get(workflow_id)
    if cached is None:
        with db.autocommit_scope() as conn:
            cached = _spec_of(conn, workflow_id)
    return cached.priority


def spec(workflow_id: str, api_key_id: int | None) -> dict[str, Any]:
    """The stored spec of a workflow of ``api_key_id`` (:class:`NotFoundError` if none)."""
    read(workflow_id, api_key_id)
    with db.autocommit_scope() as conn:
        _name, raw = conn.execute(queries.READ_SPEC, {"wid": workflow_id}).one()
    return dict(raw)


def page(
    api_key_id: int | None,
    *,
    status: WorkflowStatus | None,
    limit: int,
    after: tuple[datetime, str] | None,
    name: str | None = None,
) -> list[Row[Any]]:
    """Up to ``limit`` + 1 workflows of ``api_key_id``, newest first, older than ``after``
    (a created_at and an id), optionally of one status and one name."""
    with db.autocommit_scope() as conn:
        query = queries.page_query(api_key_id, status, after, name).limit(limit + 1)
        return list(conn.execute(query).all())
