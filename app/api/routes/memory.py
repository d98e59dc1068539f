"""A user's memory: blocks and their history, semantic search, key moments, archival
(long-term) memory, memory tools.

Blocks and archival entries are shared by all of the user's conversations under this API
key; the tools are the ones a model calls in a chat step, run here with ``source: api``.
"""

from __future__ import annotations

import math
import re
from typing import Annotated, Any, cast

from fastapi import APIRouter, Depends, Query, Response

from app.api.deps import ApiKeyDep, MemoryDep, SettingsDep
from app.api.errors import valid_body
from app.core.errors import SpecError
from app.memory import embedding, recall, tools
from app.memory.archive import Kind
from app.memory.keys import check_block_name, check_user_id, tenant_of
from app.memory.schemas import (
    ArchiveEntry,
    ArchivePage,
    Block,
    BlockEdit,
    BlockPut,
    Message,
    SearchHit,
    SearchRequest,
)
from app.memory.schemas import ToolRequest as ToolBody
from app.memory.vectors import Vectors

router = APIRouter(prefix="/v1/memory", tags=["memory"], dependencies=[Depends(valid_body)])

_ENTRY_ID = re.compile(r"^[0-9a-f]{32}$")


@router.get("/{user_id}/blocks", response_model=list[Block])
def list_blocks(user_id: str, key: ApiKeyDep, mem: MemoryDep) -> list[Block]:
    """The user's memory blocks (``persona``, ``user``, ``project`` and any others)."""
    check_user_id(user_id, ("path", "user_id"))
    return list(mem.blocks.all(tenant_of(key.id), user_id).values())


@router.get("/{user_id}/blocks/{name}", response_model=Block)
def get_block(user_id: str, name: str, key: ApiKeyDep, mem: MemoryDep) -> Block:
    """One block."""
    check_user_id(user_id, ("path", "user_id"))
    return mem.blocks.get(tenant_of(key.id), user_id, name)


@router.put("/{user_id}/blocks/{name}", response_model=Block)
def put_block(user_id: str, name: str, body: BlockPut, key: ApiKeyDep, mem: MemoryDep) -> Block:
    """Set a block's value (creating it), optionally with a new character limit."""
    check_user_id(user_id, ("path", "user_id"))
    check_block_name(name, ("path", "name"))
    return mem.blocks.put(
        tenant_of(key.id),
        user_id,
        name,
        body.value,
        source="api",
        limit=body.limit,
        description=body.description,
    )


@router.delete("/{user_id}/blocks/{name}", status_code=204)
def delete_block(user_id: str, name: str, key: ApiKeyDep, mem: MemoryDep) -> Response:
    """Remove a block (a default one reads as empty afterwards)."""
    check_user_id(user_id, ("path", "user_id"))
    mem.blocks.delete(tenant_of(key.id), user_id, name, source="api")
    return Response(status_code=204)


@router.get("/{user_id}/blocks/{name}/history", response_model=list[BlockEdit])
def block_history(
    user_id: str,
    name: str,
    key: ApiKeyDep,
    mem: MemoryDep,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
) -> list[BlockEdit]:
    """The block's edits, newest first: by whom (``api`` or ``model:…``), from what to what."""
    check_user_id(user_id, ("path", "user_id"))
    return mem.blocks.history(tenant_of(key.id), user_id, name, limit)


@router.post("/{user_id}/search", response_model=list[SearchHit])
def search_memory(
    user_id: str, body: SearchRequest, key: ApiKeyDep, mem: MemoryDep
) -> list[SearchHit]:
    """The user's messages (``scope: messages``, the default), archival entries
    (``archive``) or both (``all``, merged by score, ``k`` in all) most similar to
    ``query`` (cosine), across conversations.

    The query is embedded once by the embedding model's pool; messages are searchable once
    embedded (a conversation's ``embedded_count`` says how many are), archival entries
    when stored with a vector (``embedded``).
    """
    check_user_id(user_id, ("path", "user_id"))
    return recall.search(
        mem,
        tenant_of(key.id),
        user_id,
        body.query,
        body.k,
        conversation_id=body.conversation_id,
        scope=body.scope,
    )


def _entry_id(entry_id: str) -> str:
    if not _ENTRY_ID.match(entry_id):
        raise SpecError.single(
            ("path", "entry_id"),
            f"an archival entry id is 32 lowercase hex digits, got {entry_id!r}",
            "entry_id",
        )
    return entry_id


@router.get("/{user_id}/archive", response_model=ArchivePage)
def list_archive(
    user_id: str,
    key: ApiKeyDep,
    mem: MemoryDep,
    settings: SettingsDep,
    kind: Kind | None = None,
    limit: Annotated[int, Query(ge=1)] = 50,
    cursor: str | None = None,
) -> ArchivePage:
    """The user's archival (long-term memory) entries, newest first, optionally of one
    ``kind``; pass the page's ``next_cursor`` as ``cursor`` for the next page."""
    check_user_id(user_id, ("path", "user_id"))
    if limit > settings.max_list_limit:
        raise SpecError.single(
            ("query", "limit"),
            f"limit must be ≤ {settings.max_list_limit} (CORRAL_MAX_LIST_LIMIT), got {limit}",
            "limit",
        )
    before = None
    if cursor is not None:
        try:
            before = float(cursor)
        except ValueError:
            before = math.nan
        if not math.isfinite(before):
            raise SpecError.single(
                ("query", "cursor"),
                f"cursor must be a page's next_cursor (a number), got {cursor!r}",
                "cursor",
            )
    return mem.archive.page(tenant_of(key.id), user_id, kind=kind, limit=limit, before=before)


@router.get("/{user_id}/archive/{entry_id}", response_model=ArchiveEntry)
def get_archive_entry(user_id: str, entry_id: str, key: ApiKeyDep, mem: MemoryDep) -> ArchiveEntry:
    """One archival entry: its text, kind, source conversation and messages."""
    check_user_id(user_id, ("path", "user_id"))
    return mem.archive.get(tenant_of(key.id), user_id, _entry_id(entry_id))


@router.delete("/{user_id}/archive/{entry_id}", status_code=204)
def delete_archive_entry(user_id: str, entry_id: str, key: ApiKeyDep, mem: MemoryDep) -> Response:
    """Forget an archival entry (404 when the user has none by that id)."""
    check_user_id(user_id, ("path", "user_id"))
    mem.archive.delete(tenant_of(key.id), user_id, _entry_id(entry_id))
    return Response(status_code=204)


@router.get("/{user_id}/key-moments", response_model=list[Message])
def key_moments(
    user_id: str,
    key: ApiKeyDep,
    mem: MemoryDep,
    limit: Annotated[int, Query(ge=1, le=200)] = 20,
) -> list[Message]:
    """Messages marked as key moments, newest mark first."""
    check_user_id(user_id, ("path", "user_id"))
    return mem.conversations.key_moments(tenant_of(key.id), user_id, limit)


@router.post("/{user_id}/tools/{tool}")
def call_tool(
    user_id: str, tool: str, body: ToolBody, key: ApiKeyDep, mem: MemoryDep
) -> dict[str, Any]:
    """Run a memory tool as a model would (``recent_history``, ``semantic_search``,
    ``key_moments``, ``enriched_context``, ``memory_append``, ``memory_replace``)."""
    check_user_id(user_id, ("path", "user_id"))
    if tool not in tools.ARGS:
        raise SpecError.single(
            ("path", "tool"), f"unknown tool {tool!r}; one of {', '.join(tools.ARGS)}", "tool"
        )
    tenant = tenant_of(key.id)
    conv = None
    if body.conversation_id:
        conv = mem.conversations.get(tenant, body.conversation_id)
        if conv.user_id != user_id:
            raise SpecError.single(
                ("body", "conversation_id"), "the conversation belongs to another user", "user"
            )

    def embed_query(text: str) -> Vectors:
        return cast(Vectors, embedding.embed_queries(mem, [text])[0])

    ctx = tools.ToolContext(mem, tenant, user_id, conv, "api", embed_query)
    return tools.execute(ctx, tools.ToolCall(tool, body.args, ""))
