"""SQLModel tables: workflow runs, step runs, API keys and governance (rules, alerts, their
history, silences, beat's evaluation tick). The database is the source of truth."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import JSON, BigInteger, Column, DateTime, Index, UniqueConstraint, false
from sqlalchemy import Enum as SAEnum
from sqlalchemy.types import TypeDecorator
from sqlmodel import Field, SQLModel


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_id() -> str:
    return uuid.uuid4().hex


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware timestamp that reads back aware on SQLite too."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("naive datetime given; Corral stores aware UTC timestamps")
        return value.astimezone(UTC) if value is not None else None

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value


def _status_column(enum: type[StrEnum], default: StrEnum, *, index: bool = False) -> Any:
    # VARCHAR, not a native enum type: a new status needs no ALTER TYPE migration.
    column: Column[Any] = Column(
        SAEnum(
            enum,
            native_enum=False,
            create_constraint=False,
            length=16,
            values_callable=lambda e: [m.value for m in e],
        ),
        nullable=False,
        index=index,
    )
    return Field(default=default, sa_column=column)


def _ts(nullable: bool = True) -> Any:
    return Field(default=None, sa_column=Column(UTCDateTime(), nullable=nullable))


class WorkflowStatus(StrEnum):
    """Where a workflow run is. The engine owns every transition but cancel (the API's).

    ::

        running ──(engine: every step succeeded or skipped)──> succeeded
        running ──(engine: a step failed for good)─────────────> failed
        running ──(API: POST /v1/workflows/{id}/cancel)────────> cancelled

    A run is created ``running`` in the same commit that writes its steps.
    """

    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"

    @property
    def terminal(self) -> bool:
        return self is not WorkflowStatus.running


class StepStatus(StrEnum):
    """Where a step run is, and who moves it.

    ::

        pending ──(engine: dependencies done, condition true)──────> queued
        queued  ──(dispatcher: no live pool for the model)──────────> waiting_for_pool
        waiting_for_pool ──(worker of a new pool: claims the task)──> running
        pending ──(engine: condition false / dependencies skipped)──> skipped
        queued  ──(worker: claims the task)─────────────────────────> running
        running ──(worker: output stored)───────────────────────────> succeeded
        running ──(worker: error, attempts left)────────────────────> retrying
        retrying ─(worker: claims the delayed task)─────────────────> running
        running ──(worker: error, no attempts left or not retryable)> failed
        pending|queued|waiting_for_pool|retrying|running
                ──(engine: the workflow failed; API: cancel)────────> cancelled

    ``succeeded``, ``failed``, ``skipped`` and ``cancelled`` are terminal. A worker's
    claim and its result are both conditional on (status, attempt), so a task delivered
    twice never records two results nor advances the workflow twice.
    """

    pending = "pending"
    queued = "queued"
    waiting_for_pool = "waiting_for_pool"
    running = "running"
    retrying = "retrying"
    succeeded = "succeeded"
    failed = "failed"
    skipped = "skipped"
    cancelled = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in _TERMINAL_STEP


_TERMINAL_STEP = frozenset(
    {StepStatus.succeeded, StepStatus.failed, StepStatus.skipped, StepStatus.cancelled}
)


class WorkflowRun(SQLModel, table=True):
    """One submitted workflow: its spec as validated, and its overall status."""

    __tablename__ = "workflow_run"
    __table_args__ = (
        UniqueConstraint("api_key_id", "idempotency_key", name="uq_workflow_run_idempotency"),
        Index("ix_workflow_run_created", "created_at", "id"),
    )

    id: str = Field(default_factory=new_id, primary_key=True, max_length=32)
    name: str = Field(max_length=200)
    status: WorkflowStatus = _status_column(WorkflowStatus, WorkflowStatus.running, index=True)
    spec: dict[str, Any] = Field(sa_column=Column(JSON, nullable=False))
    api_key_id: int | None = Field(default=None, foreign_key="api_key.id", index=True)
    idempotency_key: str | None = Field(default=None, max_length=255)
    request_hash: str | None = Field(default=None, max_length=64)
    error: str | None = None
    created_at: datetime = Field(
        default_factory=utcnow, sa_column=Column(UTCDateTime(), nullable=False)
    )
    updated_at: datetime = Field(
        default_factory=utcnow, sa_column=Column(UTCDateTime(), nullable=False)
    )
    finished_at: datetime | None = _ts()


class StepRun(SQLModel, table=True):
    """One step of one workflow run: status, attempts, output or error, and timings."""

    __tablename__ = "step_run"
    __table_args__ = (
        UniqueConstraint("workflow_id", "step_id", name="uq_step_run_workflow_step"),
        Index("ix_step_run_status_queued", "status", "queued_at"),
    )

    id: str = Field(default_factory=new_id, primary_key=True, max_length=32)
    workflow_id: str = Field(foreign_key="workflow_run.id", index=True, max_length=32)
    step_id: str = Field(max_length=64)
    position: int
    kind: str = Field(max_length=16)
    model: str = Field(max_length=128)
    status: StepStatus = _status_column(StepStatus, StepStatus.pending)
    depends_on: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    attempts: int = 0
    max_attempts: int = 1
    output: dict[str, Any] | None = Field(
        default=None, sa_column=Column(JSON(none_as_null=True), nullable=True)
    )
    error: str | None = None
    # The fallback model a governance route sent its last routed attempt to (None: its own).
    routed_to: str | None = Field(default=None, max_length=128)
    queued_at: datetime | None = _ts()
    dispatched_at: datetime | None = _ts()
    started_at: datetime | None = _ts()
    finished_at: datetime | None = _ts()
    updated_at: datetime = Field(
        default_factory=utcnow, sa_column=Column(UTCDateTime(), nullable=False)
    )


class ApiKey(SQLModel, table=True):
    """An API key: only its prefix (for lookup) and its SHA-256 hash are stored."""

    __tablename__ = "api_key"

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(max_length=100)
    prefix: str = Field(max_length=16, unique=True)
    key_hash: str = Field(max_length=64)
    # An admin key may change the installation's governance: rules and silences.
    admin: bool = Field(default=False, sa_column_kwargs={"server_default": false()})
    created_at: datetime = Field(
        default_factory=utcnow, sa_column=Column(UTCDateTime(), nullable=False)
    )
    last_used_at: datetime | None = _ts()
    revoked_at: datetime | None = _ts()


class AlertState(StrEnum):
    """Where an alert is. Governance's evaluation (beat) owns every transition.

    ::

        (condition true, no open alert) ──────────────> pending   (a new alert)
        pending ──(condition true for the rule's ``for``)──> firing
        pending ──(condition false before that)────────> inactive
        firing ──(condition false)──────────────────────> resolved

    ``inactive`` and ``resolved`` are terminal: when the condition holds again a new
    alert starts, with its own history. A rule with ``for: 0`` fires on its first
    evaluation (pending and firing in one step, both recorded).
    """

    pending = "pending"
    firing = "firing"
    inactive = "inactive"
    resolved = "resolved"

    @property
    def open(self) -> bool:
        return self in (AlertState.pending, AlertState.firing)


class GovernanceRule(SQLModel, table=True):
    """A governance rule as validated (``body``); built-in rules are deleted as tombstones
    so that they are not seeded again."""

    __tablename__ = "governance_rule"

    id: str = Field(primary_key=True, max_length=64)
    name: str = Field(max_length=200)
    enabled: bool = True
    builtin: bool = False
    body: dict[str, Any] = Field(sa_column=Column(JSON, nullable=False))
    created_at: datetime = Field(
        default_factory=utcnow, sa_column=Column(UTCDateTime(), nullable=False)
    )
    updated_at: datetime = Field(
        default_factory=utcnow, sa_column=Column(UTCDateTime(), nullable=False)
    )
    deleted_at: datetime | None = _ts()


class Alert(SQLModel, table=True):
    """One alert instance: a rule's condition holding for one label set, from pending until
    it resolves (or turns inactive)."""

    __tablename__ = "alert"
    __table_args__ = (Index("ix_alert_rule_fingerprint_state", "rule_id", "fingerprint", "state"),)

    id: str = Field(default_factory=new_id, primary_key=True, max_length=32)
    rule_id: str = Field(max_length=64)
    fingerprint: str = Field(max_length=64)
    labels: dict[str, str] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    severity: str = Field(max_length=16)
    state: AlertState = _status_column(AlertState, AlertState.pending, index=True)
    value: float | None = None
    started_at: datetime = Field(
        default_factory=utcnow, sa_column=Column(UTCDateTime(), nullable=False)
    )
    fired_at: datetime | None = _ts()
    ended_at: datetime | None = _ts()
    last_eval_at: datetime | None = _ts()
    last_notified_at: datetime | None = _ts()
    notifications: int = 0


class GovernanceEvent(SQLModel, table=True):
    """The governance history: every alert transition, action and notification, with its
    outcome."""

    __tablename__ = "governance_event"

    id: int | None = Field(default=None, primary_key=True)
    at: datetime = Field(default_factory=utcnow, sa_column=Column(UTCDateTime(), nullable=False))
    rule_id: str = Field(max_length=64, index=True)
    alert_id: str | None = Field(default=None, max_length=32, index=True)
    kind: str = Field(max_length=16)  # transition | action | notification
    from_state: str | None = Field(default=None, max_length=16)
    to_state: str | None = Field(default=None, max_length=16)
    action: str | None = Field(default=None, max_length=32)
    outcome: str | None = Field(default=None, max_length=16)
    detail: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))


class Silence(SQLModel, table=True):
    """Mutes the notifications of matching alerts (a rule, labels, or both) until a time;
    alerts are still evaluated and recorded."""

    __tablename__ = "silence"

    id: str = Field(default_factory=new_id, primary_key=True, max_length=32)
    rule_id: str | None = Field(default=None, max_length=64)
    matchers: dict[str, str] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    comment: str = Field(max_length=1000)
    starts_at: datetime = Field(
        default_factory=utcnow, sa_column=Column(UTCDateTime(), nullable=False)
    )
    ends_at: datetime = Field(sa_column=Column(UTCDateTime(), nullable=False, index=True))
    created_by: int | None = Field(default=None, foreign_key="api_key.id")
    created_at: datetime = Field(
        default_factory=utcnow, sa_column=Column(UTCDateTime(), nullable=False)
    )


class GovernanceTick(SQLModel, table=True):
    """One row: the last evaluation tick claimed (``tick`` = time // interval), so that two
    beats evaluate each tick once; ``at`` is beat's last evaluation."""

    __tablename__ = "governance_tick"

    id: int = Field(default=1, primary_key=True)
    tick: int = Field(default=0, sa_type=BigInteger)
    at: datetime = Field(default_factory=utcnow, sa_column=Column(UTCDateTime(), nullable=False))


class ConsolidationRun(SQLModel, table=True):
    """One consolidation run (beat's or a manual one): what it planned, and, once its
    batches ended, what they learnt (counted in Redis with each commit, copied here)."""

    __tablename__ = "consolidation_run"

    id: str = Field(default_factory=new_id, primary_key=True, max_length=32)
    trigger: str = Field(max_length=16)  # beat | manual
    requested_by: int | None = Field(default=None, foreign_key="api_key.id")
    status: str = Field(default="running", max_length=16, index=True)
    model: str | None = Field(default=None, max_length=128)
    started_at: datetime = Field(
        default_factory=utcnow, sa_column=Column(UTCDateTime(), nullable=False, index=True)
    )
    finished_at: datetime | None = _ts()
    candidates: int = 0
    planned: int = 0
    conversations: int = 0
    facts: int = 0
    merged: int = 0
    block_edits: int = 0
    block_skipped: int = 0
    errors: list[dict[str, Any]] = Field(
        default_factory=list, sa_column=Column(JSON, nullable=False)
    )
    workflow_ids: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    options: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
