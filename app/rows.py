"""The engine's rows: what a transaction reads of a workflow, what it changed, and the SQL.

The engine's hot paths (claim a step, store a result, advance) run a few statements each,
many times a second. They use SQLAlchemy Core on the transaction's connection with
statements built once here, not the ORM: no identity map, no unit of work, no per-call
expression building, and a settle reads each step's status columns only (no JSON). A
:class:`StepState` records the columns a transaction set, and :func:`writes` gives the
statements that write them: one ``UPDATE`` per distinct set of columns, a parameter set per
row, run by :func:`app.prepared.script` (on PostgreSQL, with the ``COMMIT``, in one round
trip).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, cast

from sqlalchemy import (
    Integer,
    Table,
    Text,
    and_,
    bindparam,
    case,
    func,
    insert,
    literal_column,
    or_,
    select,
    update,
)
from sqlalchemy import cast as sql_cast
from sqlalchemy.dialects.postgresql import aggregate_order_by
from sqlalchemy.sql import Executable
from sqlalchemy.sql.elements import BindParameter, ColumnElement

from app.prepared import Statement
from app.store.tables import StepRun, StepStatus, WorkflowRun, WorkflowStatus

SENDABLE = (StepStatus.queued, StepStatus.retrying, StepStatus.waiting_for_pool)
# What :data:`UNCHANGED`'s error says (``invalid input syntax for type integer: "…"``).
STATES_CHANGED = "corral: the states a result was settled against changed: "

STEP = cast(Table, getattr(StepRun, "__table__"))  # noqa: B009 (SQLModel does not type it)
WORKFLOW = cast(Table, getattr(WorkflowRun, "__table__"))  # noqa: B009
_s, _w = STEP.c, WORKFLOW.c


@dataclass(slots=True)
class WorkflowState:
    """A workflow row inside a transaction: its identity, status and what changed."""

    id: str
    name: str
    status: WorkflowStatus
    changed: dict[str, Any] = field(default_factory=dict)

    def set(self, **values: Any) -> None:
        self.changed.update(values)
        if "status" in values:
            self.status = values["status"]


@dataclass(slots=True)
class StepState:
    """A step row inside a transaction: the columns settling reads, and what changed."""

    id: str
    step_id: str
    model: str
    status: StepStatus
    attempts: int
    max_attempts: int
    changed: dict[str, Any] = field(default_factory=dict)

    def set(self, **values: Any) -> None:
        self.changed.update(values)
        if "status" in values:
            self.status = values["status"]
        if "attempts" in values:
            self.attempts = values["attempts"]


# ---- reads --------------------------------------------------------------------------

LOCK_BY_STEP = (
    select(_w.id, _w.name, _w.status, _s.step_id)
    .select_from(WORKFLOW.join(STEP, _s.workflow_id == _w.id))
    .where(_s.id == bindparam("step_run_id"))
    .with_for_update(of=WORKFLOW)
)
LOCK_BY_ID = (
    select(_w.id, _w.name, _w.status).where(_w.id == bindparam("workflow_id")).with_for_update()
)
STEPS = (
    select(_s.id, _s.step_id, _s.model, _s.status, _s.attempts, _s.max_attempts)
    .where(_s.workflow_id == bindparam("workflow_id"))
    .order_by(_s.position)
)
# The same, found through one of its steps: read after the workflow's lock in one script.
STEPS_BY_STEP = (
    select(_s.id, _s.step_id, _s.model, _s.status, _s.attempts, _s.max_attempts)
    .where(
        _s.workflow_id
        == select(STEP.c.workflow_id).where(STEP.c.id == bindparam("step_run_id")).scalar_subquery()
    )
    .order_by(_s.position)
)
SPEC = select(_w.spec).where(_w.id == bindparam("workflow_id"))
# What templates and conditions may read of earlier steps.
CONTEXT = select(_s.step_id, _s.status, _s.output, _s.attempts, _s.error).where(
    _s.workflow_id == bindparam("workflow_id"),
    _s.step_id.in_(bindparam("step_ids", expanding=True)),
)
STALE = select(_s.status, _s.attempts).where(_s.id == bindparam("step_run_id"))
# A status read (GET /v1/workflows/{id}): every column clients see, never the spec; the
# workflow's columns on every row, one row per step. One statement: one consistent
# snapshot (and, on a database server, one round trip) without a transaction around it.
VIEW = (
    select(
        _w.id,
        _w.name,
        _w.status,
        _w.error,
        _w.created_at,
        _w.finished_at,
        _w.api_key_id,
        _s.step_id,
        _s.kind,
        _s.model,
        _s.status.label("step_status"),
        _s.depends_on,
        _s.attempts,
        _s.max_attempts,
        _s.output,
        _s.error.label("step_error"),
        _s.queued_at,
        _s.started_at,
        _s.finished_at.label("step_finished_at"),
    )
    .select_from(WORKFLOW.outerjoin(STEP, _s.workflow_id == _w.id))
    .where(_w.id == bindparam("workflow_id"))
    .order_by(_s.position)
)

# ---- a workflow's states as a worker saw them ---------------------------------------


@dataclass(frozen=True, slots=True)
class Seen:
    """A workflow's states as a worker read them when it took a step, with no lock: what
    the step's result settles against in memory (:func:`app.engine.complete_step`), and
    then checks, under the workflow's lock and in the same round trip as its writes, with
    :data:`UNCHANGED`. Read on PostgreSQL only, for a step that no other step of its
    workflow runs beside (a chain's next step, a one-step workflow)."""

    workflow: tuple[str, str, WorkflowStatus]  # id, name, status
    step_id: str  # the spec id of the step taken
    steps: tuple[tuple[Any, ...], ...]  # StepState's columns, in step order

    @classmethod
    def of(
        cls, workflow_id: str, name: str, step_id: str, steps: Sequence[Sequence[Sequence[Any]]]
    ) -> Seen | None:
        """The states of a running workflow, from :data:`STEPS_BY_STEP`'s rows (none
        where they were not read: SQLite); None when another step of the workflow is
        queued or running beside ``step_id`` (its result would change the states before
        this one's is stored)."""
        if not steps:
            return None
        found = tuple(tuple(s) for s in steps[0])
        if any(s[1] != step_id and (s[3] in SENDABLE or s[3] == StepStatus.running) for s in found):
            return None
        return cls((workflow_id, name, WorkflowStatus.running), step_id, found)

    def states(self) -> tuple[WorkflowState, dict[str, StepState]]:
        """Fresh in-memory states to settle (each call its own copies)."""
        steps = {
            s[1]: StepState(s[0], s[1], s[2], StepStatus(s[3]), s[4], s[5]) for s in self.steps
        }
        return WorkflowState(*self.workflow), steps

    def running(self, attempt: int) -> Seen:
        """The same states after this worker marked its step running for ``attempt``."""
        steps = tuple(
            (s[0], s[1], s[2], StepStatus.running, attempt, s[5]) if s[1] == self.step_id else s
            for s in self.steps
        )
        return Seen(self.workflow, self.step_id, steps)

    def text(self) -> str:
        """The states as :data:`UNCHANGED` writes them on the server."""
        steps = ",".join(f"{s[0]}:{StepStatus(s[3]).value}:{s[4]}" for s in self.steps)
        return f"{WorkflowStatus(self.workflow[2]).value}|{steps}"


_WID: BindParameter[str] = bindparam("workflow_id")
# The workflow's status and its steps' (id, status, attempts) in step order, as text.
_STATES = func.concat_ws(
    "|",
    select(_w.status).where(_w.id == _WID).scalar_subquery(),
    select(
        func.string_agg(
            func.concat_ws(":", _s.id, _s.status, _s.attempts),
            aggregate_order_by(literal_column("','"), _s.position),
        )
    )
    .where(_s.workflow_id == _WID)
    .scalar_subquery(),
)
# PostgreSQL only. Run after the workflow's lock, in the script that writes a result
# settled against :class:`Seen`: an error when the states are no longer ``seen``, which
# rolls the whole script back (one implicit transaction). SQL has no RAISE outside a
# function, so the error is a cast of text to integer; the text holds the states found
# (data, so the planner cannot fold the cast and fail a script whose states match).
UNCHANGED = select(
    sql_cast(
        case(
            (bindparam("seen") == _STATES, literal_column("'1'")),
            else_=func.concat(literal_column(f"'{STATES_CHANGED}'"), _STATES),
        ),
        Integer,
    )
)

# ---- the claim ----------------------------------------------------------------------

# A delivery may run a step that is ready for exactly this attempt, or (a redelivery after
# a worker died mid-step: acks_late) one already running this attempt; never a step of a
# workflow that has ended.
_RUNNABLE = (
    _s.id == bindparam("step_run_id"),
    or_(
        # Not ``in_(SENDABLE)``: an IN list is re-rendered into the SQL at every
        # execution (SQLAlchemy's "post-compile" step); these are plain binds.
        and_(or_(*(_s.status == s for s in SENDABLE)), _s.attempts == bindparam("previous")),
        and_(_s.status == StepStatus.running, _s.attempts == bindparam("attempt")),
    ),
    select(_w.id).where(_w.id == _s.workflow_id, _w.status == WorkflowStatus.running).exists(),
)
# What a worker needs of the step, with the workflow's spec as JSON text (parsed only by a
# process that has not seen this workflow yet): one statement for the whole claim.
_WORK = (
    _s.workflow_id,
    _s.step_id,
    _s.kind,
    _s.model,
    _s.queued_at,
    _s.error,
    select(sql_cast(_w.spec, Text)).where(_w.id == _s.workflow_id).scalar_subquery(),
)
_RUNNING = {
    "status": StepStatus.running,
    "attempts": bindparam("attempt"),
    "started_at": bindparam("now"),
    "updated_at": bindparam("now"),
}
# The claim written before the model is called: the step is ``running`` from the start.
CLAIM = update(STEP).where(*_RUNNABLE).values(_RUNNING).returning(*_WORK)
# The claim left for later (``CORRAL_CLAIM_AFTER_S``): the same conditions, read only. A
# step that ends sooner is stored by its result, which accepts a runnable step unclaimed.
OPEN = select(*_WORK).where(*_RUNNABLE)
# The late claim, once the step has run that long: ``now`` is when it started.
MARK_RUNNING = (
    update(STEP)
    .where(*_RUNNABLE)
    .values({**_RUNNING, "updated_at": bindparam("updated_at")})
    .returning(_s.id)
)


# A submit sent before its commit (PostgreSQL): the submit's transaction holds a lock named
# after its workflow, taken by its first statement and released by its COMMIT (or its
# rollback); a worker whose carried step finds no workflow waits on the same lock, then
# looks again (:func:`app.claims.submitted`). A transaction-level advisory lock, in a
# class of its own (the first key) so that it meets no other user of advisory locks.
SUBMIT_LOCK_CLASS = 0x436F7272  # "Corr"
_CLASS: ColumnElement[int] = literal_column(str(SUBMIT_LOCK_CLASS))
_KEY: ColumnElement[int] = func.hashtext(bindparam("workflow_id"))
SUBMIT_LOCK = select(func.pg_advisory_xact_lock(_CLASS, _KEY))
SUBMIT_WAIT = select(func.pg_advisory_xact_lock_shared(_CLASS, _KEY))
EXISTS = select(_w.id).where(_w.id == bindparam("workflow_id"))


def claim_params(step_run_id: str, attempt: int, now: datetime) -> dict[str, Any]:
    return {"step_run_id": step_run_id, "attempt": attempt, "previous": attempt - 1, "now": now}


# ---- writes -------------------------------------------------------------------------

_updates: dict[tuple[str, frozenset[str]], Executable] = {}


def _update_for(table: Table, columns: frozenset[str]) -> Executable:
    """``UPDATE table SET <columns> WHERE id = :_id``, built once per set of columns."""
    key = (table.name, columns)
    stmt = _updates.get(key)
    if stmt is None:
        stmt = _updates[key] = (
            update(table)
            .where(table.c.id == bindparam("_id"))
            .values({c: bindparam(f"_{c}", type_=table.c[c].type) for c in sorted(columns)})
        )
    return stmt


def _updates_of(table: Table, changes: list[tuple[str, dict[str, Any]]]) -> list[Statement]:
    groups: dict[frozenset[str], list[dict[str, Any]]] = {}
    for row_id, changed in changes:
        params = {f"_{k}": v for k, v in changed.items()}
        params["_id"] = row_id
        groups.setdefault(frozenset(changed), []).append(params)
    return [(_update_for(table, columns), many) for columns, many in groups.items()]


def writes(workflow: WorkflowState | None, steps: Iterable[StepState] = ()) -> list[Statement]:
    """The statements that write every change recorded on ``workflow`` and ``steps``
    (one ``UPDATE`` per distinct set of columns, a parameter set per row), which are
    then forgotten."""
    steps = list(steps)
    out = _updates_of(STEP, [(s.id, s.changed) for s in steps if s.changed])
    for s in steps:
        s.changed = {}
    if workflow is not None and workflow.changed:
        out += _updates_of(WORKFLOW, [(workflow.id, workflow.changed)])
        workflow.changed = {}
    return out


def inserts(workflow: Mapping[str, Any], steps: list[dict[str, Any]]) -> list[Statement]:
    """The statements that insert a new run and its steps (one statement each)."""
    return [(_INSERT_WORKFLOW, dict(workflow)), (_INSERT_STEP, steps)]


# Built once: a statement built per call costs its cache key each time (~20 µs here).
_INSERT_WORKFLOW, _INSERT_STEP = insert(WORKFLOW), insert(STEP)
