"""Workflows over HTTP: submit, read (optionally waiting for the end), list, cancel.

Each route translates HTTP to :mod:`app.workflows.service` and back.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Annotated

from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse

from app.api.deps import ApiKeyDep, CatalogDep, FinishedDep, SettingsDep, StreamsDep
from app.api.errors import read_json_body
from app.api.openai import relay
from app.core.errors import SpecError
from app.store.tables import WorkflowStatus
from app.workflows import events, service
from app.workflows.schemas import WorkflowAccepted, WorkflowPage, WorkflowPublic, WorkflowSummary
from app.workflows.spec import WorkflowSpec
from app.workflows.streams import Delta

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
    raw = await read_json_body(request, settings.max_body_bytes)
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


@router.get(
    "/{workflow_id}/events",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/event-stream": {}}}},
)
async def workflow_events(
    workflow_id: str, key: ApiKeyDep, streams: StreamsDep
) -> StreamingResponse:
    """A workflow as Server-Sent Events, from its start to its end: ``step`` (a step's
    status and attempts, first as they are, then on each change), ``delta`` (text a step
    generated, as the model decodes it) and, last, ``workflow`` (its final status). A
    reader that connects late, or again, gets every delta from the first."""
    view = await run_in_threadpool(service.read, workflow_id, key.id)  # 404 before streaming

    async def events() -> AsyncIterator[bytes]:
        seen: dict[str, tuple[str, int]] = {}

        def changed(view: WorkflowPublic) -> Iterator[bytes]:
            for step in view.steps:
                state = (str(step.status), step.attempts)
                if seen.get(step.id) != state:
                    seen[step.id] = state
                    yield relay.sse(
                        {
                            "step_id": step.id,
                            "status": step.status,
                            "attempts": step.attempts,
                            "error": step.error,
                        },
                        "step",
                    )

        for event in changed(view):
            yield event
        step_ids = [s.id for s in view.steps]
        async for item in relay.follow(streams, workflow_id, step_ids, key.id, every_change=True):
            if isinstance(item, Delta):
                data = {"step_id": item.step_id, "attempt": item.attempt, "text": item.text}
                yield relay.sse(data, "delta")
                continue
            for event in changed(item):
                yield event
            if item.status.terminal:
                yield relay.sse(
                    {"id": item.id, "status": item.status, "error": item.error}, "workflow"
                )

    return StreamingResponse(events(), media_type="text/event-stream")


@router.get("", response_model=WorkflowPage)
def list_workflows(
    key: ApiKeyDep,
    settings: SettingsDep,
    status: WorkflowStatus | None = None,
    limit: Annotated[int, Query(ge=1)] = 50,
    cursor: str | None = None,
    name: Annotated[str | None, Query(max_length=200)] = None,
) -> WorkflowPage:
    """This key's workflows, newest first, optionally of one status and one name; paged by
    ``cursor``."""
    if limit > settings.max_list_limit:
        raise SpecError.single(
            ("query", "limit"),
            f"limit must be ≤ {settings.max_list_limit} (CORRAL_MAX_LIST_LIMIT), got {limit}",
            "limit",
        )
    return service.page(key.id, status=status, limit=limit, cursor=cursor, name=name)


@router.post("/{workflow_id}/cancel", response_model=WorkflowSummary)
def cancel_workflow(workflow_id: str, key: ApiKeyDep) -> WorkflowSummary:
    """Cancel a running workflow: unfinished steps become cancelled; running ones stop."""
    return service.cancel(workflow_id, key.id)
