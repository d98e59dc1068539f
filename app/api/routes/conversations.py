"""Conversations: create, list, read, update, delete; append messages and get replies.

Every conversation belongs to the API key that created it (its tenant) and to a
``user_id`` the client names; another key's conversation reads as 404.
"""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Depends, Header, Query, Response
from fastapi.concurrency import run_in_threadpool

from app.api.deps import ApiKeyDep, CatalogDep, FinishedDep, MemoryDep, SettingsDep
from app.api.errors import valid_body
from app.core.config import Settings
from app.core.errors import NotFoundError, SpecError, UnknownModelError
from app.memory import embedding, respond
from app.memory.keys import tenant_of
from app.memory.schemas import (
    Conversation,
    ConversationCreate,
    ConversationPage,
    ConversationUpdate,
    KeyMomentMark,
    Message,
    MessageAppended,
    MessageCreate,
    MessagePage,
)
from app.memory.service import Memory, default_chat_model
from app.memory.store import NewMessage
from app.store.tables import ApiKey
from app.workflows import service
from app.workflows.tokens import count_tokens
from models.catalog import Catalog

router = APIRouter(
    prefix="/v1/conversations", tags=["conversations"], dependencies=[Depends(valid_body)]
)


def _check_ttl(ttl_s: int | None, settings: Settings) -> None:
    if ttl_s is not None and ttl_s > settings.memory_max_ttl_s:
        raise SpecError.single(
            ("body", "ttl_s"),
            f"ttl_s must be ≤ {settings.memory_max_ttl_s} (CORRAL_MEMORY_MAX_TTL_S), got {ttl_s}",
            "limit",
        )


def _chat_model(catalog: Catalog, name: str, loc: tuple[str | int, ...]) -> str:
    try:
        entry = catalog.get(name)
    except UnknownModelError as exc:
        raise SpecError.single(loc, str(exc), "unknown_model") from exc
    if entry.kind != "chat":
        raise SpecError.single(loc, f"model {name!r} is a {entry.kind} model, not chat", "kind")
    return entry.name


@router.post("", status_code=201, response_model=Conversation)
def create_conversation(
    body: ConversationCreate,
    key: ApiKeyDep,
    mem: MemoryDep,
    settings: SettingsDep,
    catalog: CatalogDep,
) -> Conversation:
    """Start a conversation for ``user_id``; its TTL is renewed whenever it is used."""
    _check_ttl(body.ttl_s, settings)
    model = body.model and _chat_model(catalog, body.model, ("body", "model"))
    return mem.conversations.create(
        tenant_of(key.id),
        uuid.uuid4().hex,
        body.user_id,
        ttl_s=body.ttl_s or settings.memory_ttl_s,
        title=body.title,
        model=model or default_chat_model(settings),
        system_prompt=body.system_prompt,
        metadata=body.metadata,
    )


@router.get("", response_model=ConversationPage)
def list_conversations(
    key: ApiKeyDep,
    mem: MemoryDep,
    settings: SettingsDep,
    user_id: Annotated[str | None, Query(pattern=r"^[A-Za-z0-9_.@-]{1,128}$")] = None,
    limit: Annotated[int, Query(ge=1)] = 50,
    cursor: str | None = None,
) -> ConversationPage:
    """This key's conversations (of one user if given), most recently active first."""
    if limit > settings.max_list_limit:
        raise SpecError.single(
            ("query", "limit"),
            f"limit must be ≤ {settings.max_list_limit} (CORRAL_MAX_LIST_LIMIT), got {limit}",
            "limit",
        )
    items, next_cursor = mem.conversations.list_page(
        tenant_of(key.id), user_id=user_id, limit=limit, cursor=cursor
    )
    return ConversationPage(items=items, next_cursor=next_cursor)


@router.get("/{conversation_id}", response_model=Conversation)
def get_conversation(conversation_id: str, key: ApiKeyDep, mem: MemoryDep) -> Conversation:
    """A conversation: its user, counters, TTL left and rolling summary."""
    return mem.conversations.get(tenant_of(key.id), conversation_id)


@router.patch("/{conversation_id}", response_model=Conversation)
def update_conversation(
    conversation_id: str,
    body: ConversationUpdate,
    key: ApiKeyDep,
    mem: MemoryDep,
    settings: SettingsDep,
) -> Conversation:
    """Change the title, system prompt, metadata or TTL (and renew the TTL)."""
    _check_ttl(body.ttl_s, settings)
    return mem.conversations.update(
        tenant_of(key.id),
        conversation_id,
        title=body.title,
        system_prompt=body.system_prompt,
        metadata=body.metadata,
        ttl_s=body.ttl_s,
    )


@router.delete("/{conversation_id}", status_code=204)
def delete_conversation(conversation_id: str, key: ApiKeyDep, mem: MemoryDep) -> Response:
    """Delete a conversation with its messages, key moments and vectors."""
    tenant = tenant_of(key.id)
    mem.conversations.delete(tenant, conversation_id)
    mem.vectors.drop(tenant, conversation_id)
    return Response(status_code=204)


@router.post("/{conversation_id}/messages", status_code=201, response_model=MessageAppended)
async def append_message(
    conversation_id: str,
    body: MessageCreate,
    key: ApiKeyDep,
    mem: MemoryDep,
    settings: SettingsDep,
    catalog: CatalogDep,
    finished: FinishedDep,
    idempotency_key: Annotated[str | None, Header(max_length=255)] = None,
) -> MessageAppended:
    """Append a message; with ``respond``, also run a chat step on the conversation.

    The reply is returned when it is ready within ``respond.timeout_s`` (``wait``), else
    ``status: running`` and the ``workflow_id`` to poll at ``/v1/workflows/{id}``. With an
    ``Idempotency-Key`` header a retried append adds nothing.
    """
    result = await run_in_threadpool(
        _append, conversation_id, body, key, mem, settings, catalog, idempotency_key
    )
    if body.respond is None or result.workflow_id is None or not body.respond.wait:
        return result
    timeout = body.respond.timeout_s or settings.memory_respond_timeout_s
    view = await service.wait_for_end(finished, result.workflow_id, key.id, timeout)
    return await run_in_threadpool(respond.finish, mem, tenant_of(key.id), view, result)


def _append(
    conversation_id: str,
    body: MessageCreate,
    key: ApiKey,
    mem: Memory,
    settings: Settings,
    catalog: Catalog,
    idempotency_key: str | None,
) -> MessageAppended:
    tenant = tenant_of(key.id)
    if len(body.content) > settings.memory_max_message_chars:
        raise SpecError.single(
            ("body", "content"),
            f"content is {len(body.content)} characters; the limit is "
            f"{settings.memory_max_message_chars} (CORRAL_MEMORY_MAX_MESSAGE_CHARS)",
            "message_too_long",
        )
    conv = mem.conversations.get(tenant, conversation_id)
    model = None
    if body.respond is not None:
        model = body.respond.model or conv.model
        if model is None:
            raise SpecError.single(
                ("body", "respond", "model"),
                "name a chat model: the conversation has none",
                "missing",
            )
        model = _chat_model(catalog, model, ("body", "respond", "model"))
        respond.check(conv, body.respond, model, catalog, settings)
    tokens = None
    if conv.model and conv.model in catalog:
        tokens = count_tokens(catalog.get(conv.model), body.content)
    seqs = mem.conversations.append(
        tenant,
        conv,
        [NewMessage(body.role, body.content, tokens, conv.model, body.metadata)],
        idempotency_key=f"api:{idempotency_key}" if idempotency_key else None,
        embed=embedding.embedding_on(mem),
    )
    embedding.kick(mem)
    if body.key_moment:
        mem.conversations.mark(tenant, conv.id, seqs[0], on=True)
    message = mem.conversations.messages(tenant, conv.id, seqs)[0]
    result = MessageAppended(message=message)
    if body.respond is None or model is None:
        return result
    result.workflow_id = respond.start(
        conv,
        seqs[0],
        body.respond,
        model,
        api_key_id=key.id,
        catalog=catalog,
        settings=settings,
    )
    result.status = "running"
    return result


@router.get("/{conversation_id}/messages", response_model=MessagePage)
def list_messages(
    conversation_id: str,
    key: ApiKeyDep,
    mem: MemoryDep,
    settings: SettingsDep,
    after: Annotated[int, Query(ge=0)] = 0,
    limit: Annotated[int, Query(ge=1)] = 50,
) -> MessagePage:
    """Messages in order, from seq ``after + 1``."""
    if limit > settings.max_list_limit:
        raise SpecError.single(
            ("query", "limit"),
            f"limit must be ≤ {settings.max_list_limit} (CORRAL_MAX_LIST_LIMIT), got {limit}",
            "limit",
        )
    tenant = tenant_of(key.id)
    conv = mem.conversations.get(tenant, conversation_id)
    items = mem.conversations.page(tenant, conversation_id, after=after, limit=limit)
    last = items[-1].seq if items else after
    return MessagePage(items=items, next_after=last if last < conv.message_count else None)


@router.get("/{conversation_id}/messages/{seq}", response_model=Message)
def get_message(conversation_id: str, seq: int, key: ApiKeyDep, mem: MemoryDep) -> Message:
    """One message by its seq."""
    tenant = tenant_of(key.id)
    mem.conversations.get(tenant, conversation_id)
    found = mem.conversations.messages(tenant, conversation_id, [seq])
    if not found:
        raise NotFoundError(f"conversation {conversation_id!r} has no message {seq}")
    return found[0]


@router.put("/{conversation_id}/messages/{seq}/key-moment", response_model=Message)
def mark_key_moment(
    conversation_id: str, seq: int, body: KeyMomentMark, key: ApiKeyDep, mem: MemoryDep
) -> Message:
    """Mark a message as a key moment (a breakthrough worth recalling), or unmark it."""
    tenant = tenant_of(key.id)
    mem.conversations.mark(tenant, conversation_id, seq, on=body.key_moment, note=body.note)
    return mem.conversations.messages(tenant, conversation_id, [seq])[0]
