"""Governance rules over HTTP. Any key reads them; changing them takes an admin key."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.concurrency import run_in_threadpool

from app.api.deps import AdminKeyDep, ApiKeyDep, SettingsDep
from app.api.errors import read_json_body
from app.governance import service
from app.governance.rules import RuleSpec

router = APIRouter(prefix="/v1/rules", tags=["governance"])

_RULE_SCHEMA = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": RuleSpec.model_json_schema()}},
    }
}


@router.get("")
def list_rules(_key: ApiKeyDep) -> list[dict[str, Any]]:
    """Every rule (the built-in ones included), webhook secrets masked."""
    return service.list_rules()


@router.post("", status_code=201, openapi_extra=_RULE_SCHEMA)
async def create_rule(request: Request, _key: AdminKeyDep, settings: SettingsDep) -> dict[str, Any]:
    """Add a rule (admin). A bad rule is a 422 naming each bad field; nothing is stored."""
    raw = await read_json_body(request, settings.max_body_bytes)
    return await run_in_threadpool(service.create_rule, raw)


@router.get("/{rule_id}")
def get_rule(rule_id: str, _key: ApiKeyDep) -> dict[str, Any]:
    return service.get_rule(rule_id)


@router.put("/{rule_id}", openapi_extra=_RULE_SCHEMA)
async def replace_rule(
    rule_id: str, request: Request, _key: AdminKeyDep, settings: SettingsDep
) -> dict[str, Any]:
    """Replace a rule's body (admin); a masked secret (``********``) keeps the stored one."""
    raw = await read_json_body(request, settings.max_body_bytes)
    return await run_in_threadpool(service.replace_rule, rule_id, raw)


@router.delete("/{rule_id}", status_code=204)
def delete_rule(rule_id: str, _key: AdminKeyDep) -> Response:
    """Delete a rule (admin); its open alerts end at the next evaluation."""
    service.delete_rule(rule_id)
    return Response(status_code=204)
