"""The one place Corral's errors become HTTP responses."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from app.core.errors import (
    AuthError,
    ConflictError,
    CorralError,
    ModelError,
    NotFoundError,
    ServiceUnavailable,
    SpecError,
    UnknownModelError,
)

_STATUS: list[tuple[type[CorralError], int]] = [
    (SpecError, 422),
    (AuthError, 401),
    (NotFoundError, 404),
    (UnknownModelError, 404),
    (ConflictError, 409),
    (ServiceUnavailable, 503),
    (ModelError, 422),
]


def status_for(exc: CorralError) -> int:
    for cls, status in _STATUS:
        if isinstance(exc, cls):
            return status
    return 500


async def _handle(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, CorralError)
    status = status_for(exc)
    if isinstance(exc, SpecError):
        body: dict[str, object] = {"detail": [e.as_dict() for e in exc.errors]}
    else:
        body = {"detail": str(exc)}
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse(body, status_code=status, headers=headers)


def install(app: FastAPI) -> None:
    """Register the handler for every CorralError."""
    app.add_exception_handler(CorralError, _handle)
