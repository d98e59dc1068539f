"""Liveness and readiness (no API key)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

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
