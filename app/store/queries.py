"""The workflow engine's statements, in SQLAlchemy Core, built once.

The engine's transactions run on a :class:`~sqlalchemy.Connection` with these statements:
no ORM unit of work or identity map on the hot path, and each statement object is built
at import, so SQLAlchemy's compiled cache finds it by its memoized key and psycopg
prepares it on a connection that runs it often. Rows come back as
:class:`~sqlalchemy.Row`, whose columns read as attributes (``row.status``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from functools import cache
from typing import Any, cast

from sqlalchemy import (
    Connection,
    Row,
    Select,
    Table,
    Update,
    and_,
    bindparam,
    case,
    exists,
    insert,
    or_,
    select,
    update,
)
from sqlalchemy.sql.elements import BindParameter

from app.store.tables import StepRun, StepStatus, WorkflowRun, WorkflowStatus

STEP = cast(Table, getattr(StepRun, "__table__"))  # noqa: B009 (SQLModel does not type it)
WORKFLOW = cast(Table, getattr(WorkflowRun, "__table__"))  # noqa: B009
_s, _w = STEP.c, WORKFLOW.c

SENDABLE = (StepStatus.queued, StepStatus.retrying, StepStatus.waiting_for_pool)

# ---- reads ------------------------------------------------------------------------------

# A workflow without its spec (the one column that can be large).
_WORKFLOW_COLUMNS = [c for c in WORKFLOW.c if c.name != "spec"]
_workflow = select(*_WORKFLOW_COLUMNS)
_steps = select(STEP).where(_s.workflow_id == bindparam("wid")).order_by(_s.position)

READ_WORKFLOW = _workflow.where(_w.id == bindparam("wid"))
READ_SPEC = select(_w.name, _w.spec).where(_w.id == bindparam("wid"))

# The workflow's row, locked for the transaction (PostgreSQL; SQLite's write transaction
# holds the database's lock from BEGIN IMMEDIATE).
LOCK_WORKFLOW = READ_WORKFLOW.with_for_update()
LOCK_WORKFLOW_OF_STEP = _workflow.where(
    _w.id == select(_s.workflow_id).where(_s.id == bindparam("sid")).scalar_subquery()
).with_for_update()

# What the rules need of each step, in spec order; outputs only when a condition reads them.
_STATE = (_s.id, _s.step_id, _s.model, _s.status, _s.attempts, _s.error)
STEP_STATES = select(*_STATE).where(_s.workflow_id == bindparam("wid")).order_by(_s.position)
STEP_STATES_WITH_OUTPUTS = (
    select(*_STATE, _s.output).where(_s.workflow_id == bindparam("wid")).order_by(_s.position)
)
# Ended steps a template reads (their states never change again).
ANCESTORS = select(_s.step_id, _s.status, _s.attempts, _s.output, _s.error).where(
    _s.workflow_id == bindparam("wid"), _s.step_id.in_(bindparam("ids", expanding=True))
)
STEP_EXISTS = select(_s.id).where(_s.id == bindparam("sid"))


def read_run(conn: Connection, workflow_id: str) -> tuple[Row[Any] | None, Sequence[Row[Any]]]:
    """A workflow's row (without its spec) and its steps' rows, in spec order."""
    run = conn.execute(READ_WORKFLOW, {"wid": workflow_id}).first()
    if run is None:
        return None, ()
    return run, conn.execute(_steps, {"wid": workflow_id}).all()


# ---- the claim --------------------------------------------------------------------------

# A delivery of attempt :attempt starts its step when the step is ready for exactly that
# attempt, or is running it (delivered again after its worker died), in a running workflow:
# rules.claim's condition, as one conditional UPDATE. On PostgreSQL the workflow's row is
# share-locked, so a claim and a transaction holding the workflow's lock take turns (claims
# of one workflow do not wait for each other).
_attempt: BindParameter[int] = bindparam("attempt")
_running_workflow = (
    select(_w.id)
    .where(_w.id == _s.workflow_id, _w.status == WorkflowStatus.running)
    .with_for_update(read=True)
)
CLAIM = (
    update(STEP)
    .where(
        _s.id == bindparam("sid"),
        or_(
            and_(_s.status.in_(SENDABLE), _s.attempts == _attempt - 1),
            and_(_s.status == StepStatus.running, _s.attempts == _attempt),
        ),
        exists(_running_workflow),
    )
    .values(
        status=StepStatus.running,
        attempts=_attempt,
        error=None,
        started_at=case((_s.status == StepStatus.running, _s.started_at), else_=bindparam("now")),
        updated_at=bindparam("now"),
    )
    .returning(_s.id, _s.workflow_id, _s.step_id, _s.kind, _s.model, _s.queued_at)
)

# ---- writes -----------------------------------------------------------------------------

INSERT_WORKFLOW = insert(WORKFLOW)
INSERT_STEPS = insert(STEP)
UPDATE_WORKFLOW = update(WORKFLOW).where(_w.id == bindparam("wid"))


@cache
def update_steps(columns: frozenset[str]) -> Update:
    """``UPDATE step_run SET <columns> WHERE id = :sid``, one statement per column set
    (run with one parameter set per row: psycopg pipelines an executemany)."""
    return (
        update(STEP)
        .where(_s.id == bindparam("sid"))
        .values({c: bindparam(c) for c in sorted(columns)})
    )


def write_steps(conn: Connection, changes: Iterable[Mapping[str, Any]]) -> None:
    """Write each change (``sid`` and the columns to set), grouped by the columns they set."""
    groups: dict[frozenset[str], list[Mapping[str, Any]]] = {}
    for change in changes:
        groups.setdefault(frozenset(change) - {"sid"}, []).append(change)
    for columns, params in groups.items():
        conn.execute(update_steps(columns), params)


def page_query(
    api_key_id: int | None,
    status: WorkflowStatus | None,
    after: tuple[Any, str] | None,
    name: str | None = None,
) -> Select[Any]:
    """Workflows of a key, newest first, older than ``after`` (created_at, id), optionally
    of one status and one name."""
    query = _workflow.where(_w.api_key_id == api_key_id)
    if status is not None:
        query = query.where(_w.status == status)
    if name is not None:
        query = query.where(_w.name == name)
    if after is not None:
        at, wid = after
        query = query.where(or_(_w.created_at < at, and_(_w.created_at == at, _w.id < wid)))
    return query.order_by(_w.created_at.desc(), _w.id.desc())


IDEMPOTENT = _workflow.where(
    _w.api_key_id.is_not_distinct_from(bindparam("key_id")),
    _w.idempotency_key == bindparam("key"),
)
NOTE_CANCELLED = (
    update(STEP)
    .where(
        _s.id == bindparam("sid"),
        _s.status == StepStatus.cancelled,
        _s.attempts == bindparam("attempt"),
    )
    .values(error=bindparam("error"))
)
