"""The one place Corral's errors become HTTP responses; and the check that keeps out of
request bodies what a store could not hold, or could not give back."""

from __future__ import annotations

import json
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from app.api.openai import convert
from app.core.errors import (
    AuthError,
    ConflictError,
    CorralError,
    ForbiddenError,
    ModelError,
    NotFoundError,
    ServiceUnavailable,
    SpecError,
    UnknownModelError,
)

_STATUS: list[tuple[type[CorralError], int]] = [
    (SpecError, 422),
    (AuthError, 401),
    (ForbiddenError, 403),
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


async def _handle(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, CorralError)
    status = status_for(exc)
    body: dict[str, object]
    if openai_route(request.url.path):
        status, body = _openai(exc, status, request.url.path)
    elif isinstance(exc, SpecError):
        body = {"detail": [e.as_dict() for e in exc.errors]}
    else:
        body = {"detail": str(exc)}
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse(body, status_code=status, headers=headers)


def openai_route(path: str) -> bool:
    """Whether ``path`` is one of the OpenAI-compatible routes (their errors take
    OpenAI's shape)."""
    return path in _OPENAI_PATHS or path.startswith("/v1/models")


_OPENAI_PATHS = {"/v1/chat/completions", "/v1/completions", "/v1/embeddings"}


def _openai(exc: CorralError, status: int, path: str) -> tuple[int, dict[str, object]]:
    if isinstance(exc, SpecError):
        return convert.spec_error(exc, path)
    if isinstance(exc, AuthError):
        return 401, convert.error_body(str(exc), "invalid_request_error", None, "invalid_api_key")
    if isinstance(exc, UnknownModelError):
        return 404, convert.error_body(
            str(exc), "invalid_request_error", "model", "model_not_found"
        )
    if isinstance(exc, ServiceUnavailable):
        return 503, convert.error_body(str(exc), "server_error", None, "service_unavailable")
    type_ = "invalid_request_error" if status < 500 else "server_error"
    return status, convert.error_body(str(exc), type_, None, None)


# How deep arrays and objects may nest in a request body. Far more than any real
# metadata needs; far less than where encoding a stored value again would fail.
MAX_JSON_DEPTH = 64

# A JSON \u escape of a UTF-16 surrogate (half of a pair, or a lone one) or of NUL, and
# the code points they can leave in a decoded str that no store takes back: a surrogate
# that is not half of a pair, and NUL (PostgreSQL's text refuses it).
_SUSPECT_ESCAPE = re.compile(rb"\\u(?:[dD][89a-fA-F][0-9a-fA-F]{2}|0000)")
_SURROGATE = re.compile("[\ud800-\udfff]")

Loc = tuple[str | int, ...]

_NUL_MESSAGE = "text may not contain U+0000 (NUL): no store Corral writes to can hold it"


def body_problem(data: object) -> tuple[Loc, str, str] | None:
    """The first thing in a parsed JSON body that Corral cannot store and give back, as
    (its field, what is wrong, a type): text with NUL or a lone UTF-16 surrogate, or
    arrays and objects nested deeper than MAX_JSON_DEPTH. Iterative: any nesting JSON
    allowed."""
    stack: list[tuple[Loc, object, int]] = [(("body",), data, 0)]
    while stack:
        loc, value, depth = stack.pop()
        if isinstance(value, str):
            if "\x00" in value:
                return (loc, _NUL_MESSAGE, "nul")
            match = _SURROGATE.search(value)
            if match:
                return (
                    loc,
                    f"text must be valid Unicode: {match.group()!r} at index {match.start()} "
                    "is a lone UTF-16 surrogate, not a character (a character above U+FFFF is "
                    "escaped as a pair, \\ud83d\\ude00)",
                    "unicode",
                )
        elif isinstance(value, dict | list):
            if depth == MAX_JSON_DEPTH:
                return (
                    loc[:2],
                    f"arrays and objects may nest at most {MAX_JSON_DEPTH} levels deep; this "
                    "value nests deeper",
                    "depth",
                )
            items = value.items() if isinstance(value, dict) else enumerate(value)
            for key, item in reversed(list(items)):
                stack.append(((*loc, key), item, depth + 1))
                if isinstance(key, str):
                    stack.append((loc, key, depth))
    return None


async def read_json_body(request: Request, limit: int) -> Any:
    """The request's JSON body, refused past ``limit`` bytes before it is all read."""
    too_big = SpecError.single(
        ("body",),
        f"request body is over the limit of {limit} bytes (CORRAL_MAX_BODY_BYTES)",
        "body_too_large",
    )
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise too_big
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_big
        chunks.append(chunk)
    try:
        raw = json.loads(b"".join(chunks) or b"null")
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise SpecError.single(("body",), f"body is not valid JSON: {exc}", "json_invalid") from exc
    problem = body_problem(raw)
    if problem is not None:
        raise SpecError.single(*problem)
    return raw


async def valid_body(request: Request) -> None:
    """Refuse (422, naming the field and the limit) a JSON body that :func:`body_problem`
    finds something in: stored, it could not be sent back, so every later read of it would
    fail. A route dependency: FastAPI has already read the body (it is cached); it is
    parsed again only when it holds a surrogate or NUL escape or more brackets than the depth
    limit, the only bodies that can have a problem."""
    body = await request.body()
    brackets = body.count(b"{") + body.count(b"[")
    if brackets <= MAX_JSON_DEPTH and not _SUSPECT_ESCAPE.search(body):
        return
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        return  # not JSON FastAPI would take: the route's own validation says so
    problem = body_problem(data)
    if problem is not None:
        raise SpecError.single(*problem)


async def valid_params(request: Request) -> None:
    """Refuse (422) a path or query parameter holding NUL: no store can look it up. An
    app-wide dependency, so every route's parameters are covered."""
    for name, value in request.path_params.items():
        if isinstance(value, str) and "\x00" in value:
            raise SpecError.single(("path", name), _NUL_MESSAGE, "nul")
    for name, value in request.query_params.multi_items():
        if "\x00" in value or "\x00" in name:
            raise SpecError.single(("query", name), _NUL_MESSAGE, "nul")


def install(app: FastAPI) -> None:
    """Register the handler for every CorralError."""
    app.add_exception_handler(CorralError, _handle)
