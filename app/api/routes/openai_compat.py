"""The OpenAI-compatible API: models, chat completions, completions, embeddings.

Each request is a one-step workflow (:mod:`app.api.openai.convert`), submitted like any
other, so it waits for a pool, is listed in ``/v1/workflows`` and can be cancelled there;
its answer is read back in OpenAI's shape, whole or streamed as Server-Sent Events. A
client that disconnects before the answer cancels its workflow. Errors take OpenAI's
shape (``app.api.errors``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import anyio
from fastapi import APIRouter, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.types import Receive, Scope, Send

from app.api.deps import ApiKeyDep, CatalogDep, SettingsDep, StreamsDep
from app.api.errors import read_json_body
from app.api.openai import convert, relay
from app.api.openai.schemas import ChatRequest, CompletionRequest, EmbeddingRequest
from app.core.config import Settings
from app.core.errors import NotFoundError, UnknownModelError
from app.scheduler import live
from app.store.tables import StepStatus
from app.workflows import service
from app.workflows.schemas import StepPublic, WorkflowPublic
from app.workflows.streams import Delta
from app.workflows.templating import has_template, template_strings
from app.workflows.tokens import count_tokens
from models.catalog import Catalog, CatalogEntry

router = APIRouter(prefix="/v1", tags=["openai"])
WORKFLOW_HEADER = "X-Corral-Workflow-Id"


# --- models -----------------------------------------------------------------------------


def _model(entry: CatalogEntry, settings: Settings, catalog: Catalog) -> dict[str, Any]:
    path = catalog.path_for(entry, settings.models_path)
    created = int(path.stat().st_mtime) if path.is_file() else 0
    return {"id": entry.name, "object": "model", "created": created, "owned_by": "corral"}


@router.get("/models")
def list_models(_key: ApiKeyDep, catalog: CatalogDep, settings: SettingsDep) -> dict[str, Any]:
    """The catalog's models in OpenAI's list shape (``/v1/catalog`` has Corral's view)."""
    return {"object": "list", "data": [_model(e, settings, catalog) for e in catalog.entries]}


@router.get("/models/{model_id:path}")
def get_model(
    model_id: str, _key: ApiKeyDep, catalog: CatalogDep, settings: SettingsDep
) -> dict[str, Any]:
    """One catalog model in OpenAI's shape."""
    try:
        return _model(catalog.get(model_id), settings, catalog)
    except UnknownModelError as exc:
        raise NotFoundError(f"The model '{model_id}' does not exist") from exc


# --- submitting -------------------------------------------------------------------------


def _with_room(spec: dict[str, Any], catalog: Catalog) -> dict[str, Any]:
    """``spec`` whose chat step, when the request does not cap its reply, may take what
    the model's context leaves after the step's text (counted as submit counts it)."""
    inp = spec["steps"][0]["input"]
    if "max_tokens" in inp:
        return spec
    try:
        entry = catalog.get(spec["steps"][0]["model"])
    except UnknownModelError:
        return spec  # the submit refuses the model by name
    n_ctx = live.pool_contexts(max_age_s=live.VIEW_MAX_AGE_S).get(entry.name, entry.n_ctx)
    texts = [text for _path, text in template_strings(inp) if not has_template(text)]
    used = sum(count_tokens(entry, text) or 0 for text in texts)
    inp["max_tokens"] = max(1, n_ctx - used - 1)
    return spec


async def _submit(
    spec: Callable[[], dict[str, Any]], settings: Settings, catalog: Catalog, key_id: int | None
) -> str:
    def run() -> str:
        return service.submit(spec(), catalog=catalog, settings=settings, api_key_id=key_id).id

    return await run_in_threadpool(run)


def _failure(step: StepPublic) -> JSONResponse:
    """A step that did not succeed, as an OpenAI error."""
    error = step.error or f"the step ended {step.status}"
    if step.status == StepStatus.cancelled:
        status, code = 409, "cancelled"
    elif "timeout_s" in error:
        status, code = 408, "timeout"
    elif "does not fit" in error or "tokens; model" in error:
        status, code = 400, "context_length_exceeded"
    else:
        status, code = 500, "step_failed"
    kind = "server_error" if status >= 500 else "invalid_request_error"
    return JSONResponse(convert.error_body(error, kind, None, code), status_code=status)


async def _answer(
    request: Request,
    streams: StreamsDep,
    workflow_id: str,
    key_id: int | None,
    respond: Callable[[StepPublic], dict[str, Any]],
) -> Response:
    """Wait for the one step's end (cancelling it if the client leaves) and answer."""
    try:
        view = await relay.cancel_on_disconnect(
            request,
            lambda: relay.wait_for_end(streams, workflow_id, [], key_id),
            workflow_id,
            key_id,
        )
    except relay.ClientGone:
        return Response(status_code=499)  # nobody reads it
    step = view.steps[0]
    headers = {WORKFLOW_HEADER: workflow_id}
    if step.status != StepStatus.succeeded:
        failed = _failure(step)
        failed.headers[WORKFLOW_HEADER] = workflow_id
        return failed
    return JSONResponse(respond(step), headers=headers)


# --- streaming --------------------------------------------------------------------------


class RelayResponse(StreamingResponse):
    """A stream of events that cancels its workflow when the client leaves before the end."""

    def __init__(
        self,
        events: AsyncIterator[bytes],
        on_abandon: Callable[[], Awaitable[None]],
        headers: dict[str, str],
    ) -> None:
        self.ended = False
        self._on_abandon = on_abandon

        async def tracked() -> AsyncIterator[bytes]:
            async for event in events:
                yield event
            self.ended = True

        super().__init__(tracked(), media_type="text/event-stream", headers=headers)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            if not self.ended:
                with anyio.CancelScope(shield=True):
                    await self._on_abandon()


def _stream(
    streams: StreamsDep,
    workflow_id: str,
    key_id: int | None,
    chunk: Callable[[dict[str, Any]], dict[str, Any]],
    hold: bool,
    include_usage: bool,
) -> RelayResponse:
    """Relay the step's text as chunks, then its end (finish reason, calls, usage)."""

    async def events() -> AsyncIterator[bytes]:
        yield relay.sse(chunk({"role": "assistant", "content": ""}))
        sent = ""
        async for event in relay.follow(streams, workflow_id, [convert.STEP_ID], key_id):
            if isinstance(event, Delta):
                if not hold and event.text:
                    sent += event.text
                    yield relay.sse(chunk({"content": event.text}))
            elif event.status.terminal:
                async for end in _ending(event, sent, chunk, hold, include_usage):
                    yield end
        yield b"data: [DONE]\n\n"

    async def abandon() -> None:
        await relay.cancel_quietly(workflow_id, key_id)

    return RelayResponse(events(), abandon, {WORKFLOW_HEADER: workflow_id})


async def _ending(
    view: WorkflowPublic,
    sent: str,
    chunk: Callable[..., dict[str, Any]],
    hold: bool,
    include_usage: bool,
) -> AsyncIterator[bytes]:
    step = view.steps[0]
    if step.status != StepStatus.succeeded:
        failed = _failure(step)
        yield b"data: " + failed.body + b"\n\n"
        return
    output = step.output or {}
    calls = convert.tool_calls(output)
    if calls:
        indexed = [{"index": i, **c} for i, c in enumerate(calls)]
        yield relay.sse(chunk({"tool_calls": indexed}))
    else:
        rest = output.get("text", "") if hold else relay.missing_text(sent, output.get("text", ""))
        if rest:
            yield relay.sse(chunk({"content": rest}))
    reason = "tool_calls" if calls else output.get("finish_reason") or "stop"
    yield relay.sse(chunk({}, finish_reason=reason))
    if include_usage:
        yield relay.sse(chunk(None, usage=convert.usage(output)))


def _chunker(
    kind: str, workflow_id: str, model: str, include_usage: bool
) -> Callable[..., dict[str, Any]]:
    created = convert.now()

    def chunk(
        delta: dict[str, Any] | None, finish_reason: str | None = None, usage: Any = None
    ) -> dict[str, Any]:
        if kind == "chat":
            choices = [
                {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            ]
            body = {"id": convert.PREFIX["chat"] + workflow_id, "object": "chat.completion.chunk"}
        else:
            text = (delta or {}).get("content", "")
            choices = [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}]
            body = {"id": convert.PREFIX["completion"] + workflow_id, "object": "text_completion"}
        out: dict[str, Any] = {**body, "created": created, "model": model}
        out["system_fingerprint"] = None
        out["choices"] = [] if delta is None else choices
        if include_usage:
            out["usage"] = usage
        return out

    return chunk


# --- the endpoints ----------------------------------------------------------------------


async def _reply(
    request: Request,
    streams: StreamsDep,
    key_id: int | None,
    workflow_id: str,
    req: ChatRequest | CompletionRequest,
    kind: str,
    hold: bool = False,
) -> Response:
    """A completion's answer: streamed as SSE chunks, or whole once the step has ended."""
    if req.stream:
        usage = bool(req.stream_options and req.stream_options.include_usage)
        chunk = _chunker(kind, workflow_id, req.model, usage)
        return _stream(streams, workflow_id, key_id, chunk, hold, usage)
    created = convert.now()
    respond = convert.chat_response if kind == "chat" else convert.completion_response
    return await _answer(
        request,
        streams,
        workflow_id,
        key_id,
        lambda step: respond(workflow_id, req.model, created, step),
    )


@router.post("/chat/completions", response_model=None)
async def chat_completions(
    request: Request,
    key: ApiKeyDep,
    settings: SettingsDep,
    catalog: CatalogDep,
    streams: StreamsDep,
) -> Response:
    """OpenAI's chat completions, on the model's pool (``stream: true`` for SSE)."""
    req = convert.parse(ChatRequest, await read_json_body(request, settings.max_body_bytes))

    workflow_id = await _submit(
        lambda: _with_room(convert.chat_workflow(req), catalog), settings, catalog, key.id
    )
    calling = bool(req.tools) and req.tool_choice != "none"
    return await _reply(request, streams, key.id, workflow_id, req, "chat", hold=calling)


@router.post("/completions", response_model=None)
async def completions(
    request: Request,
    key: ApiKeyDep,
    settings: SettingsDep,
    catalog: CatalogDep,
    streams: StreamsDep,
) -> Response:
    """OpenAI's (legacy) text completions: a ``generate`` step."""
    req = convert.parse(CompletionRequest, await read_json_body(request, settings.max_body_bytes))
    workflow_id = await _submit(lambda: convert.completion_workflow(req), settings, catalog, key.id)
    return await _reply(request, streams, key.id, workflow_id, req, "completion")


@router.post("/embeddings", response_model=None)
async def embeddings(
    request: Request,
    key: ApiKeyDep,
    settings: SettingsDep,
    catalog: CatalogDep,
    streams: StreamsDep,
) -> Response:
    """OpenAI's embeddings, on the embedding model's pool."""
    req = convert.parse(EmbeddingRequest, await read_json_body(request, settings.max_body_bytes))
    workflow_id = await _submit(lambda: convert.embedding_workflow(req), settings, catalog, key.id)
    return await _answer(
        request,
        streams,
        workflow_id,
        key.id,
        lambda step: convert.embedding_response(req.model, step, req.encoding_format),
    )
