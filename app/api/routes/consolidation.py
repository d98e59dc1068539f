"""Memory consolidation over HTTP: start a run now (admin), and the runs so far."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, ConfigDict, Field

from app.api.deps import AdminKeyDep, ApiKeyDep
from app.api.errors import valid_body
from app.memory import consolidate
from app.memory.keys import USER_ID_PATTERN, tenant_of

router = APIRouter(prefix="/v1/memory", tags=["memory"], dependencies=[Depends(valid_body)])


class ConsolidateRequest(BaseModel):
    """What a manual run takes (every field optional: the settings' values otherwise)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    idle_s: float | None = Field(
        default=None, ge=0, le=365 * 86400, description="default: CORRAL_CONSOLIDATE_IDLE_S"
    )
    user_id: str | None = Field(
        default=None, pattern=USER_ID_PATTERN, description="only this user (of this key)"
    )
    max_items: int | None = Field(
        default=None, ge=1, le=100_000, description="default: CORRAL_CONSOLIDATE_MAX_ITEMS"
    )
    model: str | None = Field(
        default=None, max_length=128, description="default: CORRAL_CONSOLIDATE_MODEL"
    )


@router.post("/consolidate", status_code=202)
async def consolidate_now(
    key: AdminKeyDep, body: ConsolidateRequest | None = None
) -> dict[str, Any]:
    """Start a consolidation run now, whatever the window (admin). Its conversations are
    consolidated in the background; read the run at ``/v1/memory/consolidations/{id}``."""
    body = body or ConsolidateRequest()
    run = await run_in_threadpool(
        consolidate.start,
        "manual",
        requested_by=key.id,
        idle_s=body.idle_s,
        tenant=tenant_of(key.id) if body.user_id else None,
        user_id=body.user_id,
        max_items=body.max_items,
        model=body.model,
    )
    assert run is not None  # a manual run is always recorded
    return run


@router.get("/consolidations")
def list_consolidations(
    _key: ApiKeyDep, limit: Annotated[int, Query(ge=1, le=500)] = 50
) -> list[dict[str, Any]]:
    """Consolidation runs, newest first: started, finished, conversations, facts, errors."""
    return consolidate.list_runs(limit)


@router.get("/consolidations/{run_id}")
def get_consolidation(run_id: str, _key: ApiKeyDep) -> dict[str, Any]:
    """One consolidation run; a running one's counters are live."""
    return consolidate.get_run(run_id)
