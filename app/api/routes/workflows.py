"""Workflows over HTTP: submit, read (optionally waiting for the end), list, cancel.

Each route translates HTTP to :mod:`app.workflows.service` and back.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.concurrency import run_in_threadpool

from app.api.deps import ApiKeyDep, CatalogDep, FinishedDep, SettingsDep
from app.api.errors import body_problem
from app.core.errors import SpecError
from app.store.tables import WorkflowStatus
from app.workflows import events, service
from app.workflows.schemas import WorkflowAccepted, WorkflowPage, WorkflowPublic, WorkflowSummary
from app.workflows.spec import WorkflowSpec

router = APIRouter(prefix="/v1/workflows", tags=["workflows"])

_SPEC_SCHEMA = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": WorkflowSpec.model_json_schema()}},
    }
}
_WAIT_S = Annotated[
    float,
    Query(
        ge=0,
        le=events.MAX_WAIT_S,
        description="Long-poll: answer as soon as the workflow has ended, or after this many "
        "seconds with its current state.",
    ),
]


async def _read_body(request: Request, limit: int) -> Any:
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


@router.post(
    "",
    status_code=202,
    response_model=WorkflowAccepted | WorkflowPublic,
    openapi_extra=_SPEC_SCHEMA,
    responses={
        200: {
            "model": WorkflowPublic,
            "description": "With `wait_s`: the workflow ended within the wait; its final state.",
        },
        202: {
            "description": "Accepted. Without `wait_s`: its id, status and URL. With "
            "`wait_s`: it was still running when the wait ran out; its current state.",
        },
    },
)
async def submit_workflow(
    request: Request,
    response: Response,
    key: ApiKeyDep,
    settings: SettingsDep,
    catalog: CatalogDep,
    finished: FinishedDep,
    idempotency_key: Annotated[str | None, Header(max_length=255)] = None,
    wait_s: _WAIT_S = 0.0,
) -> WorkflowAccepted | WorkflowPublic:
    """Validate a workflow spec, store it, and enqueue its ready steps.

    With an ``Idempotency-Key`` header, a retried submit of the same body returns the
    workflow the first one created (``Idempotent-Replayed: true``); the same key with a
    different body is a 409. With ``wait_s`` the request also waits for the end, as
    ``GET …?wait_s=`` does: ``200`` once it has ended, ``202`` while it still runs.
    """
    raw = await _read_body(request, settings.max_body_bytes)
    submitted = await run_in_threadpool(
        lambda: service.submit(
            raw,
            catalog=catalog,
            settings=settings,
            api_key_id=key.id,
            idempotency_key=idempotency_key,
        )
    )
    response.headers["Location"] = f"/v1/workflows/{submitted.id}"
    if submitted.replayed:
        response.headers["Idempotent-Replayed"] = "true"
    if wait_s <= 0:
        url = f"/v1/workflows/{submitted.id}"
        return WorkflowAccepted(id=submitted.id, status=submitted.status, url=url)
    view = await service.wait_for_end(finished, submitted.id, key.id, wait_s)
    if view.status.terminal:
        response.status_code = 200
    return view


@router.get("/{workflow_id}", response_model=WorkflowPublic)
async def get_workflow(
    workflow_id: str, key: ApiKeyDep, finished: FinishedDep, wait_s: _WAIT_S = 0.0
) -> WorkflowPublic:
    """A workflow's status and, per step: status, attempts, output, error, timings.

    With ``wait_s``, the answer comes as soon as the workflow has ended or when ``wait_s``
    runs out, whichever is first: ``GET /v1/workflows/ID?wait_s=30`` in a loop is a
    blocking wait.
    """
    if wait_s <= 0:
        return await run_in_threadpool(service.read, workflow_id, key.id)
    return await service.wait_for_end(finished, workflow_id, key.id, wait_s)


@router.get("", response_model=WorkflowPage)
def list_workflows(
    key: ApiKeyDep,
    settings: SettingsDep,
    status: WorkflowStatus | None = None,
    limit: Annotated[int, Query(ge=1)] = 50,
    cursor: str | None = None,
) -> WorkflowPage:
    """This key's workflows, newest first, optionally of one status; paged by ``cursor``."""
    if limit > settings.max_list_limit:
        raise SpecError.single(
            ("query", "limit"),
            f"limit must be ≤ {settings.max_list_limit} (CORRAL_MAX_LIST_LIMIT), got {limit}",
            "limit",
        )
    return service.page(key.id, status=status, limit=limit, cursor=cursor)


@router.post("/{workflow_id}/cancel", response_model=WorkflowSummary)
def cancel_workflow(workflow_id: str, key: ApiKeyDep) -> WorkflowSummary:
    """Cancel a running workflow: unfinished steps become cancelled; running ones stop."""
    return service.cancel(workflow_id, key.id)
