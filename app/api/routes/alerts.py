"""Alerts (read-only: governance's evaluation owns them) and silences over HTTP."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Response
from pydantic import BaseModel, ConfigDict, Field

from app.api.deps import AdminKeyDep, ApiKeyDep
from app.api.errors import valid_body
from app.governance import service
from app.store.tables import AlertState

router = APIRouter(tags=["governance"], dependencies=[Depends(valid_body)])


@router.get("/v1/alerts")
def list_alerts(
    _key: ApiKeyDep,
    state: AlertState | None = None,
    rule: Annotated[str | None, Query(max_length=64)] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
) -> list[dict[str, Any]]:
    """Alerts, newest first, optionally in one ``state`` or of one ``rule``."""
    return service.list_alerts(state, rule, limit)


@router.get("/v1/alerts/{alert_id}")
def get_alert(alert_id: str, _key: ApiKeyDep) -> dict[str, Any]:
    """One alert and its history: transitions, actions and notifications."""
    return service.get_alert(alert_id)


class SilenceCreate(BaseModel):
    """Mute the notifications of alerts of ``rule_id`` and/or with these labels."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    rule_id: str | None = Field(default=None, max_length=64)
    matchers: dict[str, Annotated[str, Field(max_length=200)]] = Field(
        default_factory=dict, max_length=20
    )
    ends_at: datetime | None = None
    duration_s: float | None = Field(default=None, gt=0, le=365 * 86400)
    comment: str = Field(min_length=1, max_length=1000)


@router.post("/v1/silences", status_code=201)
def create_silence(body: SilenceCreate, key: AdminKeyDep) -> dict[str, Any]:
    """Add a silence (admin): give ``ends_at`` or ``duration_s``."""
    return service.create_silence(
        rule_id=body.rule_id,
        matchers=body.matchers,
        ends_at=body.ends_at,
        duration_s=body.duration_s,
        comment=body.comment,
        created_by=key.id,
    )


@router.get("/v1/silences")
def list_silences(_key: ApiKeyDep) -> list[dict[str, Any]]:
    """The silences in force now."""
    return service.active_silences()


@router.delete("/v1/silences/{silence_id}", status_code=204)
def expire_silence(silence_id: str, _key: AdminKeyDep) -> Response:
    """End a silence now (admin)."""
    service.expire_silence(silence_id)
    return Response(status_code=204)
