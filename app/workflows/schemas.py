"""Public shapes of API responses."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Self

from pydantic import BaseModel, Field

from app.store.tables import StepStatus, WorkflowStatus
from app.workflows.spec import Priority


class StepPublic(BaseModel):
    """A step's state as clients see it."""

    id: str
    kind: str
    model: str
    status: StepStatus
    depends_on: list[str]
    attempts: int
    max_attempts: int
    output: dict[str, Any] | None
    error: str | None
    routed_to: str | None = None
    waiting_reason: str | None = Field(
        default=None,
        description="why no pool can start for a waiting step's model now (the host "
        "agents' reason: the bytes it needs, the largest room)",
    )
    queued_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None
    duration_ms: float | None

    @classmethod
    def of(cls, row: Any) -> StepPublic:
        """From a step's row (a table object or a result row: its columns as attributes)."""
        finished, started = row.finished_at, row.started_at
        return cls(
            id=row.step_id,
            kind=row.kind,
            model=row.model,
            status=row.status,
            depends_on=row.depends_on,
            attempts=row.attempts,
            max_attempts=row.max_attempts,
            output=row.output,
            error=row.error,
            routed_to=row.routed_to,
            queued_at=row.queued_at,
            started_at=started,
            finished_at=finished,
            duration_ms=(finished - started).total_seconds() * 1000
            if finished and started
            else None,
        )


class WorkflowSummary(BaseModel):
    """A workflow without its steps (for lists)."""

    id: str
    name: str
    status: WorkflowStatus
    error: str | None
    created_at: datetime
    finished_at: datetime | None

    @classmethod
    def of(cls, row: Any, **extra: Any) -> Self:
        """From a workflow's row (a table object or a result row); ``extra`` fills a
        subclass's fields (a view's steps)."""
        return cls(
            id=row.id,
            name=row.name,
            status=row.status,
            error=row.error,
            created_at=row.created_at,
            finished_at=row.finished_at,
            **extra,
        )


class WorkflowPublic(WorkflowSummary):
    """A workflow with every step's state."""

    priority: Priority = "normal"
    steps: list[StepPublic]


class WorkflowAccepted(BaseModel):
    """The answer to a submit."""

    id: str
    status: WorkflowStatus
    url: str


class WorkflowPage(BaseModel):
    """One page of workflows, newest first; pass ``next_cursor`` to get the next."""

    items: list[WorkflowSummary]
    next_cursor: str | None


class ModelPublic(BaseModel):
    """A catalog model, whether its file is here, and its live pools."""

    name: str
    kind: str
    description: str
    n_ctx: int
    context_length: int
    file: str
    present: bool
    size_bytes: int | None
    workers: int
    queue: str
