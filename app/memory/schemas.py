"""Shapes of conversation memory: what the store returns and what the API reads and writes."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from app.memory.keys import USER_ID_PATTERN
from app.memory.options import MemoryOptions, ToolChoice, ToolName
from app.workflows.spec import SamplingParams

Role = Literal["system", "user", "assistant", "tool"]


def from_ms(ms: float) -> datetime:
    return datetime.fromtimestamp(ms / 1000, UTC)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Message(BaseModel):
    """One message of a conversation; ``seq`` numbers them 1, 2, … in append order."""

    conversation_id: str
    seq: int
    role: Role
    content: str
    tokens: int | None = None
    tokens_model: str | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)
    created_at: datetime
    key_moment: bool = False
    note: str | None = None


class Conversation(BaseModel):
    """A conversation's metadata, its counters and its rolling summary."""

    id: str
    user_id: str
    title: str | None
    model: str | None
    system_prompt: str | None
    metadata: dict[str, Any]
    ttl_s: int
    expires_in_s: float | None
    created_at: datetime
    updated_at: datetime
    message_count: int
    embedded_count: int
    summary: str | None
    summary_upto: int
    summary_tokens: int | None
    summary_model: str | None
    consolidated_upto: int = Field(
        default=0, description="the last message consolidation has taken into long-term memory"
    )


class ConversationPage(BaseModel):
    """One page of conversations, most recently active first."""

    items: list[Conversation]
    next_cursor: str | None


class MessagePage(BaseModel):
    """Messages in seq order; pass ``next_after`` as ``after`` for the next page."""

    items: list[Message]
    next_after: int | None


class Block(BaseModel):
    """A named memory block of a user, with its character limit."""

    name: str
    value: str
    limit: int
    description: str | None = None
    version: int = 0
    updated_at: datetime | None = None


class BlockEdit(BaseModel):
    """One change of a block: what changed, and who changed it (``api``, ``model:...``)."""

    version: int
    op: Literal["put", "append", "replace", "delete"]
    source: str
    old: str
    new: str
    at: datetime
    detail: dict[str, Any] = Field(default_factory=dict)


class ArchiveSource(BaseModel):
    """Where an archival entry came from: a conversation's messages, by a run."""

    conversation_id: str
    from_seq: int
    to_seq: int
    run_id: str | None = None


class ArchiveEntry(BaseModel):
    """Something long-term memory holds about a user, learnt from a conversation."""

    id: str
    user_id: str
    text: str
    kind: Literal["fact", "preference", "event", "summary"]
    block: str | None = Field(default=None, description="the memory block it was added to")
    source: ArchiveSource
    seen: int = Field(default=1, description="how many times consolidation has learnt it")
    sources: list[dict[str, Any]] = Field(
        default_factory=list, description="where it was seen again (latest 20)"
    )
    embedded: bool
    created_at: datetime
    updated_at: datetime


class ArchiveHit(BaseModel):
    """An archival entry and its cosine similarity to the query."""

    score: float
    entry: ArchiveEntry


class ArchivePage(BaseModel):
    """Archival entries newest first; pass ``next_cursor`` as ``cursor`` for more."""

    items: list[ArchiveEntry]
    next_cursor: str | None


SearchScope = Literal["messages", "archive", "all"]


class SearchHit(BaseModel):
    """What semantic search found, with its cosine similarity to the query: a message
    (``source: message``, in ``message``) or an archival entry (``source: archive``, in
    ``entry``)."""

    score: float
    source: Literal["message", "archive"] = "message"
    message: Message | None = None
    entry: ArchiveEntry | None = None

    @model_validator(mode="after")
    def _holds_its_item(self) -> SearchHit:
        is_message = self.source == "message"
        if (self.message is not None) != is_message or (self.entry is not None) == is_message:
            raise ValueError("a message hit holds `message`, an archive hit holds `entry`")
        return self


# --- request bodies -------------------------------------------------------------------


class ConversationCreate(_Strict):
    """A new conversation for ``user_id``."""

    user_id: str = Field(pattern=USER_ID_PATTERN)
    title: str | None = Field(default=None, max_length=500)
    model: str | None = Field(
        default=None, max_length=128, description="chat model that replies and counts tokens"
    )
    system_prompt: str | None = Field(default=None, max_length=100_000)
    ttl_s: int | None = Field(default=None, ge=1, description="default: CORRAL_MEMORY_TTL_S")
    metadata: dict[str, Any] = Field(default_factory=dict)


class ConversationUpdate(_Strict):
    """Fields of a conversation that may change."""

    title: str | None = Field(default=None, max_length=500)
    system_prompt: str | None = Field(default=None, max_length=100_000)
    ttl_s: int | None = Field(default=None, ge=1)
    metadata: dict[str, Any] | None = None


class RespondOptions(SamplingParams):
    """Run a chat step on the conversation after the append (sampling as in a chat step)."""

    model: str | None = Field(default=None, description="default: the conversation's model")
    wait: bool = Field(default=True, description="wait for the reply (else: the workflow id)")
    timeout_s: float | None = Field(
        default=None, gt=0, le=600, description="how long to wait for the reply (at most 600 s)"
    )
    memory: MemoryOptions = Field(default_factory=MemoryOptions)
    tools: list[ToolName] = Field(default_factory=list)
    tool_choice: ToolChoice = "auto"
    max_tool_rounds: int = Field(default=2, ge=0, le=8)


class MessageCreate(_Strict):
    """A message to append; ``respond`` also runs a chat step and returns its reply."""

    role: Role = "user"
    content: str
    metadata: dict[str, Any] = Field(default_factory=dict)
    key_moment: bool = False
    respond: RespondOptions | None = None


class MessageAppended(BaseModel):
    """What an append did: the stored message, and the reply when one was asked for."""

    message: Message
    workflow_id: str | None = None
    status: str | None = None
    reply: Message | None = None
    output: dict[str, Any] | None = None
    error: str | None = None


class KeyMomentMark(_Strict):
    """Mark (or unmark) a message as a key moment."""

    key_moment: bool = True
    note: str | None = Field(default=None, max_length=2000)


class BlockPut(_Strict):
    """A block's new value (and optionally its limit and description)."""

    value: str
    limit: int | None = Field(default=None, ge=1)
    description: str | None = Field(default=None, max_length=2000)


class SearchRequest(_Strict):
    """Semantic search over a user's messages and/or long-term (archival) memory."""

    query: str = Field(min_length=1, max_length=20_000)
    k: int = Field(default=5, ge=1)
    conversation_id: str | None = Field(
        default=None, description="only messages (and entries learnt from) this conversation"
    )
    scope: SearchScope = Field(
        default="messages",
        description="messages, archive (long-term memory) or all (both, by score, k in total)",
    )


class ToolRequest(_Strict):
    """Arguments of a memory tool called through the API."""

    args: dict[str, Any] = Field(default_factory=dict)
    conversation_id: str | None = None
