"""What a ``chat`` step may ask of conversation memory (fields of ``app.workflows.spec.ChatInput``).

Kept free of Redis and of ``app.workflows.spec`` so the spec can import it without a cycle.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

ToolName = Literal[
    "memory_append",
    "memory_replace",
    "recent_history",
    "semantic_search",
    "key_moments",
    "enriched_context",
]
TOOL_NAMES: tuple[str, ...] = ToolName.__args__  # type: ignore[attr-defined]
# "auto": the model may call tools; "required": the first round must be a call to one of
# `tools` (forced with a grammar); a tool's name: the first round must call that tool;
# "none": tools are neither described nor executed.
ToolChoice = Literal[
    "auto",
    "required",
    "none",
    "memory_append",
    "memory_replace",
    "recent_history",
    "semantic_search",
    "key_moments",
    "enriched_context",
]


class MemoryOptions(BaseModel):
    """How a chat step with a ``conversation_id`` builds its context and records the turn."""

    model_config = ConfigDict(extra="forbid")

    blocks: bool = Field(default=True, description="put the user's memory blocks in the prompt")
    semantic_k: int = Field(
        default=4, ge=0, le=50, description="earlier messages recalled by similarity; 0: none"
    )
    semantic_share: float = Field(
        default=0.25, ge=0, le=0.9, description="at most this share of the free context"
    )
    archive_k: int = Field(
        default=3,
        ge=0,
        le=50,
        description="long-term memory entries recalled by similarity (within semantic_share); "
        "0: none",
    )
    recent_limit: int | None = Field(
        default=None, ge=0, le=100_000, description="at most this many latest messages"
    )
    context_tokens: int | None = Field(
        default=None, ge=64, description="assemble into fewer tokens than the model's n_ctx"
    )
    summarise: bool = Field(default=True, description="fold overflowing turns into the summary")
    record: bool = Field(
        default=True, description="append the step's messages and the reply to the conversation"
    )
    system_prompt: str | None = Field(
        default=None, max_length=100_000, description="instead of the conversation's"
    )
    task: Literal["reply", "summarise", "consolidate"] = Field(
        default="reply",
        description="summarise: fold messages up to `upto` into the summary; consolidate: "
        "learn long-term memory from the messages after the conversation's watermark",
    )
    upto: int | None = Field(
        default=None, ge=1, description="summarise and consolidate tasks: the last seq"
    )
    run: str | None = Field(
        default=None, max_length=64, description="consolidate task: the consolidation run"
    )
