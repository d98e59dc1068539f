"""Workflows: submit, read, list, cancel."""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import json
import logging
import time
from collections import Counter
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from pydantic import ValidationError
from sqlalchemy import and_, or_
from sqlalchemy.exc import IntegrityError
from sqlmodel import select

from app import engine, inline, loopdb, notify, prepared, rows
from app.store import db
from app.scheduler import live
from app.api.deps import (
    ApiKeyDep,
    FinishedDep,
    SessionDep,
    SettingsDep,
    Submission,
    SubmissionDep,
)
from app.core.errors import ConflictError, NotFoundError, SpecError
from app.notify import FinishedListener
from app.workflows.schemas import (
    WorkflowAccepted,
    WorkflowPage,
    WorkflowPublic,
    WorkflowSummary,
)
from app.workflows.spec import ValidatedWorkflow, WorkflowSpec, validate_workflow
from app.store.tables import ApiKey, WorkflowRun, WorkflowStatus, new_id
from app.workflows.tokens import count_tokens

log = logging.getLogger(__name__)

router = APIRouter(prefix="/v1/workflows", tags=["workflows"])

_SPEC_SCHEMA = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": WorkflowSpec.model_json_schema()}},
    }
}


async def _read_body(request: Request, limit: int) -> tuple[Any, int]:
    """The request's JSON body, parsed, and its size in bytes."""
    declared = request.headers.get("content-length")
    too_big = SpecError.single(
        ("body",),
        f"request body is over the limit of {limit} bytes (CORRAL_MAX_BODY_BYTES)",
        "body_too_large",
    )
    if declared and declared.isdigit() and int(declared) > limit:
        raise too_big
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_big
        chunks.append(chunk)
    try:
        return json.loads(b"".join(chunks) or b"null"), size
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SpecError.single(("body",), f"body is not valid JSON: {exc}", "json_invalid") from exc


def _summary(run: WorkflowRun | engine.Created) -> WorkflowAccepted:
    return WorkflowAccepted(id=run.id, status=run.status, url=f"/v1/workflows/{run.id}")


_WAIT_S = Annotated[
    float,
    Query(
        ge=0,
        le=notify.MAX_WAIT_S,
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
    platform: SubmissionDep,
    idempotency_key: Annotated[str | None, Header(max_length=255)] = None,
    wait_s: _WAIT_S = 0.0,
) -> WorkflowAccepted | WorkflowPublic:
    """Validate a workflow spec, store it, and enqueue its ready steps.

    With an ``Idempotency-Key`` header, a retried submit of the same body returns the
    workflow the first one created (``Idempotent-Replayed: true``); the same key with a
    different body is a 409.

    With ``wait_s``, the same request also waits for the end (as ``GET …?wait_s=`` does)
    and answers with the workflow's state: ``200`` once it has ended, ``202`` if it is
    still running when the wait runs out. One request instead of a submit and a read.
    """
    raw, size = await _read_body(request, platform.settings.max_body_bytes)
    if wait_s <= 0:
        return await _accept(raw, size, response, key, platform, idempotency_key)
    deadline = time.monotonic() + wait_s
    workflow_id = new_id()
    # Registered for the finish notice before the steps are sent: a workflow that ends
    # before this request's next line runs is still noticed, with no read in between.
    finished = platform.finished
    view = None
    async with finished.watch(workflow_id) as event:
        accepted = await _accept(raw, size, response, key, platform, idempotency_key, workflow_id)
        running = accepted.id == workflow_id and accepted.status is WorkflowStatus.running
        remaining = min(deadline - time.monotonic(), notify.RECHECK_S)
        if running and await finished.wait(event, remaining):
            view = _carried_view(finished, key.id, workflow_id)
    if view is None:
        view = await _await_end(finished, key.id, accepted.id, deadline)
    if view.status.terminal:
        response.status_code = 200
    return view


# A submit whose body is larger than this runs in the thread pool: counting a long
# prompt's tokens is CPU that the loop's other requests would wait behind.
INLINE_BODY_MAX = 16 * 1024
# Submits by where they ran: on the event loop (inline) or in the thread pool (/metrics).
SUBMIT_PATHS: Counter[str] = Counter()


async def _accept(
    raw: Any,
    size: int,
    response: Response,
    key: ApiKey,
    platform: Submission,
    idempotency_key: str | None,
    workflow_id: str | None = None,
) -> WorkflowAccepted:
    """Validate, store and send a submit: on the event loop when none of it has to wait
    (:mod:`app.inline`), else in the thread pool, which keeps serving meanwhile.

    On SQLite a submit is calls into this process and one message to Redis; on the loop
    it saves the two thread hand-offs of the pool, more than the work itself on a small
    host. It runs there when the dispatcher can send without blocking, the body is small,
    there is no ``Idempotency-Key`` (its lookup and race handling stay in the pool), and
    nothing inside finds a reason to wait: a vocabulary not loaded or the live-pool view
    due for a refresh (the whole submit goes to the pool), SQLite's write lock held (the
    validated workflow goes to the pool, to wait for it there). Each is found before
    anything is written.

    On PostgreSQL the same submit is validated on the loop and its one-round-trip write
    is awaited there, on the loop's own connections (:mod:`app.loopdb`;
    ``CORRAL_DATABASE_LOOP=false`` sends it to the thread pool instead).
    """
    sender = platform.async_dispatcher
    validated, loop_db = None, None
    if sender and not idempotency_key and size <= INLINE_BODY_MAX:
        loop_db = loopdb.for_loop()  # PostgreSQL: the loop's own connections
        if loop_db is not None or db.reads_in_process():
            with contextlib.suppress(inline.WouldBlock), inline.active():
                validated = _validate(raw, platform)
    if sender is None or validated is None:  # all of it in the thread pool
        SUBMIT_PATHS["thread_pool"] += 1
        return await run_in_threadpool(
            _submit, raw, response, key, platform, idempotency_key, workflow_id
        )
    sent = False
    if loop_db is not None:  # written on a database server, awaited on the loop
        run, statements = engine.plan_workflow(
            validated, api_key_id=key.id, workflow_id=workflow_id
        )
        if run.send_early:
            await _write_and_send(loop_db, statements, sender, run)
            sent = True
        else:
            await loop_db.script(statements)
    else:
        try:
            with inline.active():
                run = _create(validated, key, None, workflow_id)
        except inline.WouldBlock:  # SQLite's write lock is taken: wait for it in the pool
            SUBMIT_PATHS["thread_pool"] += 1
            run = await run_in_threadpool(_create, validated, key, platform.dispatcher, workflow_id)
            response.headers["Location"] = f"/v1/workflows/{run.id}"
            return _summary(run)
    SUBMIT_PATHS["event_loop"] += 1
    if not sent:
        await sender.send_async(run.dispatches)
    if run.status.terminal:  # every step skipped at once: wake its waiters
        await run_in_threadpool(notify.publish_finished, run.id)
    response.headers["Location"] = f"/v1/workflows/{run.id}"
    return _summary(run)


async def _write_and_send(
    loop_db: loopdb.LoopDatabase,
    statements: list[prepared.Statement],
    sender: engine.AsyncDispatcher,
    run: engine.Created,
) -> None:
    """Write a new workflow whose one step carries its work (:attr:`engine.Created.send_early`)
    and send that step while the commit is under way: its worker reads nothing before the
    model, so the model starts a round trip and a flush to disk sooner. The client still
    hears of the workflow only once it is committed. The statements go out first and
    their first takes the submit's lock, which the worker's first write waits on; a write
    that still finds no workflow looks again, and a submit that fails leaves a step that
    runs and is dropped (:func:`app.claims.wait_submitted`)."""
    written = asyncio.ensure_future(loop_db.script(statements))
    await asyncio.sleep(0)  # the statements leave before the message
    await sender.send_async(run.dispatches, committed=written)


def _validate(raw: Any, platform: Submission) -> ValidatedWorkflow:
    contexts = live.pool_contexts(max_age_s=live.VIEW_MAX_AGE_S)
    return validate_workflow(raw, platform.catalog, platform.settings, count_tokens, contexts)


def _create(
    validated: ValidatedWorkflow,
    key: ApiKey,
    dispatcher: engine.Dispatcher | None,
    workflow_id: str | None,
    idempotency_key: str | None = None,
    request_hash: str | None = None,
) -> engine.Created:
    """Store a validated workflow; without a ``dispatcher`` the caller sends its steps."""
    return engine.create_workflow(
        validated,
        dispatcher,
        api_key_id=key.id,
        idempotency_key=idempotency_key,
        request_hash=request_hash,
        workflow_id=workflow_id,
    )


def _submit(
    raw: Any,
    response: Response,
    key: ApiKey,
    platform: Submission,
    idempotency_key: str | None,
    workflow_id: str | None = None,
) -> WorkflowAccepted:
    request_hash = None
    if idempotency_key:  # what a replay of the key is compared with
        request_hash = hashlib.sha256(json.dumps(raw, sort_keys=True).encode()).hexdigest()
        with db.session_scope() as session:
            earlier = engine.find_idempotent(session, key.id, idempotency_key)
        if earlier is not None:
            return _replay(earlier, request_hash, response)
    validated = _validate(raw, platform)
    try:
        run = _create(
            validated, key, platform.dispatcher, workflow_id, idempotency_key, request_hash
        )
    except IntegrityError:
        # A concurrent submit with the same Idempotency-Key won the race.
        if not idempotency_key or request_hash is None:
            raise
        with db.session_scope() as session:
            earlier = engine.find_idempotent(session, key.id, idempotency_key)
        if earlier is None:
            raise
        return _replay(earlier, request_hash, response)
    response.headers["Location"] = f"/v1/workflows/{run.id}"
    return _summary(run)


def _replay(run: WorkflowRun, request_hash: str, response: Response) -> WorkflowAccepted:
    if run.request_hash != request_hash:
        raise ConflictError(
            "Idempotency-Key was already used for a different request body "
            f"(workflow {run.id}); use a new key"
        )
    response.headers["Idempotent-Replayed"] = "true"
    response.headers["Location"] = f"/v1/workflows/{run.id}"
    return _summary(run)


def _owned(session: SessionDep, key: ApiKeyDep, workflow_id: str) -> WorkflowRun:
    run = session.get(WorkflowRun, workflow_id)
    if run is None or run.api_key_id != key.id:
        raise NotFoundError(f"no workflow {workflow_id!r}")
    return run


async def _view(key_id: int | None, workflow_id: str) -> WorkflowPublic:
    """A workflow's current view, read on the event loop: an in-process SQLite call
    (:func:`app.store.db.reads_in_process`), or awaited on the loop's own PostgreSQL
    connections (:mod:`app.loopdb`); in the thread pool when those are off."""
    if db.reads_in_process():
        return _fresh_view(key_id, workflow_id, on_loop=True)
    loop_db = loopdb.for_loop()
    if loop_db is None:
        return await run_in_threadpool(_fresh_view, key_id, workflow_id)
    (found,) = await loop_db.script([(rows.VIEW, {"workflow_id": workflow_id})])
    return _view_of(found, key_id, workflow_id)


def _fresh_view(key_id: int | None, workflow_id: str, *, on_loop: bool = False) -> WorkflowPublic:
    """A workflow and its steps as its owner sees them (Core reads: no spec, no ORM)."""
    params = {"workflow_id": workflow_id}
    with db.read_scope() if on_loop else db.connection_scope(autocommit=True) as conn:
        found = prepared.execute(conn, rows.VIEW, params)  # the workflow's columns on each row
    return _view_of(found, key_id, workflow_id)


def _view_of(found: prepared.Rows, key_id: int | None, workflow_id: str) -> WorkflowPublic:
    if not found or found[0].api_key_id != key_id:
        raise NotFoundError(f"no workflow {workflow_id!r}")
    return WorkflowPublic.of_view(found)


@router.get("/{workflow_id}", response_model=WorkflowPublic)
async def get_workflow(
    workflow_id: str,
    key: ApiKeyDep,
    finished: FinishedDep,
    wait_s: _WAIT_S = 0.0,
) -> WorkflowPublic:
    """A workflow's status and, per step: status, attempts, output, error, timings.

    With ``wait_s``, the answer comes as soon as the workflow leaves ``running`` (woken by
    the engine's finish notification) or when ``wait_s`` runs out, whichever is first;
    e.g. ``GET /v1/workflows/ID?wait_s=30`` in a loop is a blocking wait.
    """
    if wait_s <= 0:
        return await _view(key.id, workflow_id)
    return await _await_end(finished, key.id, workflow_id, time.monotonic() + wait_s)


async def _await_end(
    finished: FinishedListener, key_id: int | None, workflow_id: str, deadline: float
) -> WorkflowPublic:
    """The workflow's view as soon as it is no longer running, or at ``deadline``."""
    # Each read has a session of its own: no pooled connection is held while waiting.
    while True:
        async with finished.watch(workflow_id) as event:
            view = await _view(key_id, workflow_id)
            remaining = deadline - time.monotonic()
            if view.status is not WorkflowStatus.running or remaining <= 0:
                return view
            if await finished.wait(event, min(remaining, notify.RECHECK_S)):
                carried = _carried_view(finished, key_id, workflow_id)
                if carried is not None:
                    return carried


def _carried_view(
    finished: FinishedListener, key_id: int | None, workflow_id: str
) -> WorkflowPublic | None:
    """The view the finish notice of ``workflow_id`` carried (:class:`app.notify.Carried`),
    if it did and the workflow is this key's: the answer without a read of the database.
    None: read it."""
    carried = finished.carried(workflow_id)
    if carried is None or carried.api_key_id != key_id:
        return None
    try:
        return WorkflowPublic.model_validate_json(carried.view)
    except ValidationError:
        log.warning("a finish notice for %s carried a view that does not parse", workflow_id)
        return None


def _decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        stamp, _, wid = base64.urlsafe_b64decode(cursor.encode()).decode().partition("|")
        return datetime.fromisoformat(stamp), wid
    except (ValueError, binascii.Error, UnicodeDecodeError) as exc:
        raise SpecError.single(("query", "cursor"), "invalid cursor", "cursor") from exc


@router.get("", response_model=WorkflowPage)
def list_workflows(
    key: ApiKeyDep,
    session: SessionDep,
    settings: SettingsDep,
    status: WorkflowStatus | None = None,
    limit: Annotated[int, Query(ge=1)] = 50,
    cursor: str | None = None,
) -> WorkflowPage:
    """This key's workflows, newest first, optionally of one status; paged by cursor."""
    if limit > settings.max_list_limit:
        raise SpecError.single(
            ("query", "limit"),
            f"limit must be ≤ {settings.max_list_limit} (CORRAL_MAX_LIST_LIMIT), got {limit}",
            "limit",
        )
    query = select(WorkflowRun).where(WorkflowRun.api_key_id == key.id)
    if status is not None:
        query = query.where(WorkflowRun.status == status)
    if cursor:
        at, wid = _decode_cursor(cursor)
        query = query.where(
            or_(
                WorkflowRun.created_at < at,  # type: ignore[arg-type]
                and_(WorkflowRun.created_at == at, WorkflowRun.id < wid),  # type: ignore[arg-type]
            )
        )
    rows = session.exec(
        query.order_by(WorkflowRun.created_at.desc(), WorkflowRun.id.desc()).limit(limit + 1)  # type: ignore[attr-defined]
    ).all()
    next_cursor = None
    if len(rows) > limit:
        last = rows[limit - 1]
        next_cursor = base64.urlsafe_b64encode(
            f"{last.created_at.isoformat()}|{last.id}".encode()
        ).decode()
    return WorkflowPage(
        items=[WorkflowSummary.of(r) for r in rows[:limit]], next_cursor=next_cursor
    )


@router.post("/{workflow_id}/cancel", response_model=WorkflowSummary)
def cancel_workflow(workflow_id: str, key: ApiKeyDep, session: SessionDep) -> WorkflowSummary:
    """Cancel a running workflow: unfinished steps become cancelled; running ones stop."""
    _owned(session, key, workflow_id)
    session.commit()
    run = engine.cancel_workflow(workflow_id)
    live.request_cancel(workflow_id)
    return WorkflowSummary.of(run)
