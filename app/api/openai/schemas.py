"""OpenAI's request shapes, as Corral takes them.

Every field OpenAI defines is known here: those Corral serves, those it accepts and
ignores (``store``, ``metadata``, …), and those it refuses unless left at their default
(``n`` above 1, ``logprobs``, ``audio``, …), each refusal naming the field. A field
OpenAI does not define is refused as OpenAI refuses it, unless it is one of Corral's
extras (``conversation_id``, ``user_id``, ``memory``, ``top_k``, ``repeat_penalty``,
``ignore_eos``, ``timeout_s``), which the SDKs send through ``extra_body``.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from app.memory.keys import CONVERSATION_ID_PATTERN, USER_ID_PATTERN
from app.memory.options import MemoryOptions


class Unsupported(ValueError):
    """A field OpenAI defines that Corral does not serve as given."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TextPart(_Body):
    type: Literal["text"]
    text: str


class FunctionRef(_Body):
    name: str
    arguments: str


class ToolCallIn(_Body):
    id: str
    type: Literal["function"] = "function"
    function: FunctionRef


class Message(_Body):
    """A message of ``messages``; ``developer`` is taken as ``system``."""

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = None
    refusal: str | None = None

    def text(self) -> str | None:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content


class FunctionSpec(_Body):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Body):
    type: Literal["function"]
    function: FunctionSpec


class NamedToolChoice(_Body):
    type: Literal["function"]
    function: dict[str, str]


class StreamOptions(_Body):
    include_usage: bool = False
    include_obfuscation: bool | None = None


class _Sampling(_Body):
    """Fields of both completions APIs, and Corral's extras."""

    model: str = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    n: int | None = Field(default=None, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    logprobs: bool | int | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # Accepted and ignored: they change nothing Corral does.
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None
    # Corral's extras (the SDKs' extra_body).
    top_k: int | None = Field(default=None, ge=0)
    repeat_penalty: float | None = Field(default=None, gt=0)
    ignore_eos: bool | None = None
    timeout_s: float | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _refused(self) -> _Sampling:
        if self.n not in (None, 1):
            raise Unsupported("n", "Corral returns one choice per request; n must be 1")
        if self.logprobs:
            raise Unsupported("logprobs", "log probabilities are not returned")
        if self.logit_bias:
            raise Unsupported("logit_bias", "logit_bias is not supported")
        if self.stream_options is not None and not self.stream:
            raise Unsupported("stream_options", "stream_options needs stream: true")
        return self


class ChatRequest(_Sampling):
    """``POST /v1/chat/completions``."""

    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    response_format: dict[str, Any] | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    top_logprobs: int | None = None
    modalities: list[str] | None = None
    reasoning_effort: str | None = None
    verbosity: str | None = None
    # Refused when given (Corral has no audio, prediction or web search).
    audio: dict[str, Any] | None = None
    prediction: dict[str, Any] | None = None
    web_search_options: dict[str, Any] | None = None
    functions: list[dict[str, Any]] | None = None
    function_call: Any = None
    # Corral's extras: conversation memory.
    conversation_id: str | None = Field(default=None, pattern=CONVERSATION_ID_PATTERN)
    user_id: str | None = Field(default=None, pattern=USER_ID_PATTERN)
    memory: MemoryOptions | None = None

    @model_validator(mode="after")
    def _refused_chat(self) -> ChatRequest:
        if self.top_logprobs:
            raise Unsupported("top_logprobs", "log probabilities are not returned")
        if self.modalities not in (None, ["text"]):
            raise Unsupported("modalities", "Corral answers text only")
        for name in ("audio", "prediction", "web_search_options"):
            if getattr(self, name) is not None:
                raise Unsupported(name, f"{name} is not supported")
        if self.functions is not None or self.function_call is not None:
            raise Unsupported(
                "functions", "the deprecated functions and function_call: use tools, tool_choice"
            )
        if self.max_tokens and self.max_completion_tokens:
            raise Unsupported("max_tokens", "give max_completion_tokens or max_tokens, not both")
        return self


class CompletionRequest(_Sampling):
    """``POST /v1/completions``."""

    prompt: str | list[str]
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _refused_completion(self) -> CompletionRequest:
        if isinstance(self.prompt, list) and len(self.prompt) != 1:
            raise Unsupported("prompt", "give one prompt per request (a string)")
        if self.echo:
            raise Unsupported("echo", "echo is not supported")
        if self.suffix:
            raise Unsupported("suffix", "suffix (insertion) is not supported")
        if self.best_of not in (None, 1):
            raise Unsupported("best_of", "best_of must be 1")
        return self

    def prompt_text(self) -> str:
        return self.prompt[0] if isinstance(self.prompt, list) else self.prompt


class EmbeddingRequest(_Body):
    """``POST /v1/embeddings``."""

    model: str = Field(min_length=1)
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None
    timeout_s: float | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _refused(self) -> EmbeddingRequest:
        if self.dimensions is not None:
            raise Unsupported(
                "dimensions", "a model's embeddings have its own size; leave dimensions out"
            )
        if isinstance(self.input, list) and any(not isinstance(i, str) for i in self.input):
            raise Unsupported("input", "give text: token arrays are not supported")
        return self

    def texts(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else [str(i) for i in self.input]
