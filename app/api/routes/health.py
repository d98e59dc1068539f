"""Liveness and readiness (no API key), and the system health view (an API key)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from app.api.deps import ApiKeyDep
from app.core.errors import ServiceUnavailable
from app.core.redis import ping
from app.store import db

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz() -> dict[str, str]:
    """The API process is up."""
    return {"status": "ok"}


@router.get("/readyz", response_model=None)
def readyz() -> JSONResponse:
    """Redis and the database both answer."""
    checks: dict[str, str] = {}
    for name, probe in (("redis", ping), ("database", db.ping)):
        try:
            probe()
            checks[name] = "ok"
        except ServiceUnavailable as exc:
            checks[name] = str(exc)
    ready = all(v == "ok" for v in checks.values())
    return JSONResponse(
        {"status": "ok" if ready else "unavailable", "checks": checks},
        status_code=200 if ready else 503,
    )


@router.get("/v1/health")
def system_health(_key: ApiKeyDep) -> dict[str, Any]:
    """Overall status and each component's: API, database, Redis, beat's last evaluation,
    each model's pools and queue, GPUs, firing alerts."""
    from app.governance.health import health

    view = health()
    view["components"] = {"api": {"status": "ok"}, **view["components"]}
    return view
