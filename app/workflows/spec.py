"""The workflow spec and its validation at submit time.

A spec is JSON (or YAML from the CLI)::

    name: summarise
    priority: normal              # normal | low (waits behind every normal step)
    steps:
      - id: extract
        kind: generate            # generate | chat | embed
        model: tiny-chat          # a catalog name; the step runs on queue model.tiny-chat
        input: {prompt: "Key facts: ...", max_tokens: 64, temperature: 0, seed: 1}
        retry: {max_attempts: 3, backoff_s: 1, max_backoff_s: 30}
        timeout_s: 120
      - id: summary
        kind: chat
        model: tiny-chat
        depends_on: [extract]
        when: "steps.extract.output.text | length > 0"
        input: {messages: [{role: user, content: "Summarise {{ steps.extract.output.text }}"}]}

:func:`validate_workflow` finds every problem at once and raises one ``SpecError`` whose
entries name the field and the limit; nothing is written or enqueued before it passes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from jinja2 import TemplateError
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from app.core.config import Settings
from app.core.errors import FieldError, SpecError, UnknownModelError
from app.memory.keys import CONVERSATION_ID_PATTERN, USER_ID_PATTERN
from app.memory.options import TOOL_NAMES, MemoryOptions, ToolChoice, ToolName
from app.workflows import structured
from app.workflows.structured import (
    FUNCTION_NAME_PATTERN,
    FunctionDef,
    ResponseFormat,
    ToolCall,
    schema_problems,
)
from app.workflows.templating import (
    Reference,
    check_condition,
    check_template,
    has_template,
    template_strings,
)
from models.catalog import Catalog, CatalogEntry

StepKind = Literal["generate", "chat", "embed"]
Priority = Literal["normal", "low"]  # a low workflow's steps wait behind normal ones
STEP_ID_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]{0,63}$"
# What a template may read of another step: steps.<id>.<field>[.<key>]
STEP_FIELDS = {"output", "status", "attempts", "error"}
OUTPUT_KEYS = {
    "generate": {"text", "finish_reason", "prompt_tokens", "completion_tokens", "timings"},
    "chat": {
        "text",
        "message",
        "finish_reason",
        "prompt_tokens",
        "completion_tokens",
        "timings",
        "memory",
        "tool_calls",
        "function_calls",
    },
    "embed": {"vectors", "dim", "prompt_tokens", "timings"},
}

# Counts the tokens of a text with a model's own tokenizer; None when it cannot (no file).
TokenCounter = Callable[[CatalogEntry, str], int | None]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RetryPolicy(_Strict):
    """How often a failing step is tried, with exponential backoff and full jitter."""

    max_attempts: int = Field(default=1, ge=1)
    backoff_s: float = Field(default=1.0, ge=0)
    max_backoff_s: float = Field(default=60.0, ge=0)

    @model_validator(mode="after")
    def _order(self) -> RetryPolicy:
        if self.max_backoff_s < self.backoff_s:
            raise ValueError(
                f"max_backoff_s ({self.max_backoff_s}) must be ≥ backoff_s ({self.backoff_s})"
            )
        return self


class SamplingParams(_Strict):
    """Generation parameters shared by ``generate`` and ``chat`` steps."""

    max_tokens: int = Field(default=256, ge=1)
    temperature: float = Field(default=0.8, ge=0, le=5)
    top_p: float = Field(default=0.95, gt=0, le=1)
    top_k: int = Field(default=40, ge=0)
    repeat_penalty: float = Field(default=1.0, gt=0)
    presence_penalty: float = Field(default=0.0, ge=-2, le=2)
    frequency_penalty: float = Field(default=0.0, ge=-2, le=2)
    seed: int | None = Field(default=None, ge=0, lt=2**32)
    stop: list[str] = Field(default_factory=list, max_length=16)
    ignore_eos: bool = False


class GenerateInput(SamplingParams):
    """Input of a ``generate`` step: a raw prompt."""

    prompt: str = Field(min_length=1)


class ChatMessage(_Strict):
    """One chat message; an assistant's may hold the calls it made, and a ``tool``
    message the result of one (``tool_call_id``)."""

    role: Literal["system", "user", "assistant", "tool"]
    content: str | None = None
    name: str | None = Field(default=None, max_length=64)
    tool_calls: list[ToolCall] | None = Field(default=None, max_length=64)
    tool_call_id: str | None = Field(default=None, max_length=128)

    @model_validator(mode="after")
    def _shape(self) -> ChatMessage:
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError("content is required (only an assistant's tool_calls may stand alone)")
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only an assistant message has tool_calls")
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a tool message needs the tool_call_id of the call it answers")
        return self


class ChatInput(SamplingParams):
    """Input of a ``chat`` step: messages rendered through the model's chat template.

    With ``conversation_id`` the step runs on conversation memory (``app.memory``): its
    messages are the new turn (none: answer the conversation's last message), and the
    worker assembles the context from history, memory blocks, the summary and recall.
    ``tools`` lets the model call memory tools (see ``app.memory.tools``).
    """

    messages: list[ChatMessage] = Field(default_factory=list)
    conversation_id: str | None = Field(default=None, pattern=CONVERSATION_ID_PATTERN)
    user_id: str | None = Field(default=None, pattern=USER_ID_PATTERN)
    memory: MemoryOptions = Field(default_factory=MemoryOptions)
    tools: list[ToolName] = Field(default_factory=list, max_length=len(TOOL_NAMES))
    tool_choice: ToolChoice = "auto"
    max_tool_rounds: int = Field(default=2, ge=0, le=8)
    response_format: ResponseFormat | None = None
    functions: list[FunctionDef] = Field(default_factory=list, max_length=64)
    function_call: str = Field(default="auto", pattern=FUNCTION_NAME_PATTERN)

    @model_validator(mode="after")
    def _memory_fields(self) -> ChatInput:
        if not self.messages and self.conversation_id is None:
            raise ValueError("messages must have at least 1 item (or give a conversation_id)")
        if self.tools and self.conversation_id is None and self.user_id is None:
            raise ValueError("tools need a conversation_id or a user_id (whose memory to use)")
        if self.tool_choice not in ("auto", "none", "required") and (
            self.tool_choice not in self.tools
        ):
            raise ValueError(f"tool_choice {self.tool_choice!r} is not one of tools")
        if self.tool_choice == "required" and not self.tools:
            raise ValueError("tool_choice 'required' needs tools")
        self._check_functions()
        return self

    def _check_functions(self) -> None:
        structured.check_calls(self.functions, self.function_call, self.response_format)
        if self.functions and self.tools:
            raise ValueError("give memory tools or functions, not both")
        if self.conversation_id is not None and any(
            m.role == "tool" or m.tool_calls for m in self.messages
        ):
            raise ValueError(
                "conversation memory records user and assistant text: send tool calls and "
                "tool messages without a conversation_id"
            )


class EmbedInput(_Strict):
    """Input of an ``embed`` step: texts to embed, one vector each."""

    texts: list[str] = Field(min_length=1, max_length=256)
    normalize: bool = True


INPUT_MODELS: dict[str, type[_Strict]] = {
    "generate": GenerateInput,
    "chat": ChatInput,
    "embed": EmbedInput,
}
MODEL_KIND_FOR_STEP = {"generate": "chat", "chat": "chat", "embed": "embed"}


class StepSpec(_Strict):
    """One step of a workflow."""

    id: str = Field(pattern=STEP_ID_PATTERN)
    kind: StepKind
    model: str = Field(min_length=1, max_length=128)
    input: dict[str, Any]
    depends_on: list[str] = Field(default_factory=list)
    when: str | None = Field(default=None, max_length=2000)
    retry: RetryPolicy = Field(default_factory=RetryPolicy)
    timeout_s: float | None = Field(default=None, gt=0)


class WorkflowSpec(_Strict):
    """A workflow: a name, a DAG of steps and a priority."""

    name: str = Field(min_length=1, max_length=200)
    steps: list[StepSpec] = Field(min_length=1)
    priority: Priority = Field("normal", description="low: its steps wait behind every normal step")


@dataclass
class ValidatedWorkflow:
    """A spec that passed every check, with its steps in a topological order."""

    spec: WorkflowSpec
    order: list[str]

    def dump(self) -> dict[str, Any]:
        return self.spec.model_dump(mode="json")


def pydantic_errors(exc: ValidationError, prefix: tuple[str | int, ...] = ()) -> list[FieldError]:
    """A pydantic error as Corral's field errors (an extra field named as unknown)."""
    out = []
    for err in exc.errors(include_url=False):
        loc = (*prefix, *err["loc"])
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = f"unknown field {loc[-1]!r}"
        out.append(FieldError(loc, msg, err["type"]))
    return out


def validate_workflow(
    raw: Any,
    catalog: Catalog,
    settings: Settings,
    count_tokens: TokenCounter | None = None,
    pool_ctx: Mapping[str, int] | None = None,
) -> ValidatedWorkflow:
    """Check a raw spec completely; raise one ``SpecError`` listing every problem.

    ``pool_ctx`` maps a model to the largest context its live pools serve: a step that
    needs more than that is refused (with no live pool, the catalog's ``n_ctx`` applies).
    """
    if not isinstance(raw, dict):
        raise SpecError.single((), f"a workflow must be an object, got {type(raw).__name__}")
    try:
        spec = WorkflowSpec.model_validate(raw)
    except ValidationError as exc:
        raise SpecError(pydantic_errors(exc)) from None

    errors: list[FieldError] = []
    if len(spec.steps) > settings.max_steps:
        errors.append(
            FieldError(
                ("steps",),
                f"a workflow may have at most {settings.max_steps} steps (CORRAL_MAX_STEPS), "
                f"got {len(spec.steps)}",
                "too_many_steps",
            )
        )
    ids: dict[str, int] = {}
    for i, step in enumerate(spec.steps):
        if step.id in ids:
            errors.append(
                FieldError(
                    ("steps", i, "id"),
                    f"duplicate step id {step.id!r} (first used by steps[{ids[step.id]}])",
                    "duplicate_id",
                )
            )
        else:
            ids[step.id] = i
    for i, step in enumerate(spec.steps):
        errors.extend(_check_step(i, step, ids, catalog, settings, count_tokens, pool_ctx or {}))
    order, cycle = _toposort(spec, ids)
    if cycle:
        errors.append(FieldError(("steps",), "steps form a cycle: " + " → ".join(cycle), "cycle"))
    if not errors:
        errors.extend(_check_references(spec, ids))
    if errors:
        raise SpecError(errors)
    return ValidatedWorkflow(spec, order)


def _check_step(
    i: int,
    step: StepSpec,
    ids: dict[str, int],
    catalog: Catalog,
    settings: Settings,
    count_tokens: TokenCounter | None,
    pool_ctx: Mapping[str, int],
) -> list[FieldError]:
    errors: list[FieldError] = []
    loc: tuple[str | int, ...] = ("steps", i)
    entry: CatalogEntry | None = None
    try:
        entry = catalog.get(step.model)
    except UnknownModelError as exc:
        errors.append(FieldError((*loc, "model"), str(exc), "unknown_model"))
    if entry is not None and entry.kind != MODEL_KIND_FOR_STEP[step.kind]:
        errors.append(
            FieldError(
                (*loc, "model"),
                f"model {entry.name!r} is a {entry.kind} model; a {step.kind} step needs a "
                f"{MODEL_KIND_FOR_STEP[step.kind]} model",
                "model_kind",
            )
        )
        entry = None
    for j, dep in enumerate(step.depends_on):
        if dep not in ids:
            errors.append(
                FieldError((*loc, "depends_on", j), f"unknown step id {dep!r}", "unknown_step")
            )
        elif dep == step.id:
            errors.append(
                FieldError((*loc, "depends_on", j), "a step cannot depend on itself", "cycle")
            )
    if step.timeout_s is not None and step.timeout_s > settings.max_step_timeout_s:
        errors.append(
            FieldError(
                (*loc, "timeout_s"),
                f"timeout_s must be ≤ {settings.max_step_timeout_s:g} s "
                f"(CORRAL_MAX_STEP_TIMEOUT_S), got {step.timeout_s:g}",
                "limit",
            )
        )
    if step.retry.max_attempts > settings.max_attempts:
        errors.append(
            FieldError(
                (*loc, "retry", "max_attempts"),
                f"max_attempts must be ≤ {settings.max_attempts} (CORRAL_MAX_ATTEMPTS), "
                f"got {step.retry.max_attempts}",
                "limit",
            )
        )
    if step.retry.max_backoff_s > settings.max_backoff_s:
        errors.append(
            FieldError(
                (*loc, "retry", "max_backoff_s"),
                f"max_backoff_s must be ≤ {settings.max_backoff_s:g} (CORRAL_MAX_BACKOFF_S), "
                f"got {step.retry.max_backoff_s:g}",
                "limit",
            )
        )
    if step.when is not None:
        try:
            check_condition(step.when)
        except TemplateError as exc:
            errors.append(
                FieldError((*loc, "when"), f"invalid condition: {exc}", "condition_syntax")
            )
    n_ctx = pool_ctx.get(step.model, entry.n_ctx) if entry is not None else 0
    errors.extend(_check_input(loc, step, entry, n_ctx, settings, count_tokens))
    return errors


def _check_input(
    loc: tuple[str | int, ...],
    step: StepSpec,
    entry: CatalogEntry | None,
    n_ctx: int,
    settings: Settings,
    count_tokens: TokenCounter | None,
) -> list[FieldError]:
    errors: list[FieldError] = []
    try:
        parsed = INPUT_MODELS[step.kind].model_validate(step.input)
    except ValidationError as exc:
        return pydantic_errors(exc, (*loc, "input"))
    total_chars = 0
    static_text: list[str] = []
    for path, text in template_strings(step.input):
        total_chars += len(text)
        try:
            check_template(text)
        except TemplateError as exc:
            errors.append(
                FieldError((*loc, "input", *path), f"invalid template: {exc}", "template_syntax")
            )
        if not has_template(text):
            static_text.append(text)
    if total_chars > settings.max_prompt_chars:
        errors.append(
            FieldError(
                (*loc, "input"),
                f"input text is {total_chars} characters; the limit is "
                f"{settings.max_prompt_chars} (CORRAL_MAX_PROMPT_CHARS)",
                "prompt_too_long",
            )
        )
    elif entry is not None and isinstance(parsed, SamplingParams):
        errors.extend(_check_context(loc, parsed, entry, n_ctx, static_text, count_tokens))
    elif entry is not None and isinstance(parsed, EmbedInput) and count_tokens is not None:
        for j, text in enumerate(parsed.texts):
            n = count_tokens(entry, text) if not has_template(text) else None
            if n is not None and n > n_ctx:
                errors.append(
                    FieldError(
                        (*loc, "input", "texts", j),
                        f"text is {n} tokens; model {entry.name!r} embeds at most {n_ctx} tokens",
                        "prompt_too_long",
                    )
                )
    if isinstance(parsed, ChatInput):
        problems = schema_problems(parsed.response_format, parsed.functions, parsed.function_call)
        errors += [
            FieldError((*loc, "input", *where), msg, "json_schema") for where, msg in problems
        ]
    return errors


def _check_context(
    loc: tuple[str | int, ...],
    params: SamplingParams,
    entry: CatalogEntry,
    n_ctx: int,
    static_text: list[str],
    count_tokens: TokenCounter | None,
) -> list[FieldError]:
    if params.max_tokens >= n_ctx:
        return [
            FieldError(
                (*loc, "input", "max_tokens"),
                f"max_tokens must be < the context of model {entry.name!r} "
                f"({n_ctx} tokens{_served(entry, n_ctx)}), got {params.max_tokens}",
                "limit",
            )
        ]
    if count_tokens is None or not static_text:
        return []
    # A lower bound: the literal text's tokens. Never refuses a prompt that would fit;
    # the worker checks the rendered prompt exactly before it runs.
    counts = [count_tokens(entry, t) for t in static_text]
    if any(c is None for c in counts):
        return []
    prompt_tokens = sum(c for c in counts if c is not None)
    if prompt_tokens + params.max_tokens > n_ctx:
        return [
            FieldError(
                (*loc, "input"),
                f"prompt is at least {prompt_tokens} tokens and max_tokens is "
                f"{params.max_tokens}: together {prompt_tokens + params.max_tokens}, over the "
                f"{n_ctx}-token context of model {entry.name!r}{_served(entry, n_ctx)}",
                "prompt_too_long",
            )
        ]
    return []


def _served(entry: CatalogEntry, n_ctx: int) -> str:
    return "" if n_ctx == entry.n_ctx else " (the most any of its live pools serves)"


def _toposort(spec: WorkflowSpec, ids: dict[str, int]) -> tuple[list[str], list[str]]:
    """Kahn's order of the steps, or ([], cycle) naming one cycle."""
    deps = {s.id: [d for d in s.depends_on if d in ids and d != s.id] for s in spec.steps}
    state: dict[str, int] = {}
    order: list[str] = []
    stack: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = 1
        stack.append(node)
        for dep in deps[node]:
            if state.get(dep) == 1:
                return [*stack[stack.index(dep) :], dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        stack.pop()
        state[node] = 2
        order.append(node)
        return []

    for s in spec.steps:
        if s.id not in state and (cycle := visit(s.id)):
            return [], cycle
    return order, []


def ancestors(spec: WorkflowSpec) -> dict[str, set[str]]:
    """For each step, every step it transitively depends on."""
    deps = {s.id: set(s.depends_on) for s in spec.steps}
    memo: dict[str, set[str]] = {}

    def up(node: str) -> set[str]:
        if node not in memo:
            memo[node] = set()
            for d in deps[node]:
                memo[node] |= {d} | up(d)
        return memo[node]

    return {s.id: up(s.id) for s in spec.steps}


def _check_references(spec: WorkflowSpec, ids: dict[str, int]) -> list[FieldError]:
    errors: list[FieldError] = []
    above = ancestors(spec)
    kinds = {s.id: s.kind for s in spec.steps}
    for i, step in enumerate(spec.steps):
        found: list[tuple[tuple[str | int, ...], Reference]] = []
        for path, text in template_strings(step.input):
            found += [((*path,), r) for r in check_template(text)]
        if step.when:
            found += [((), r) for r in check_condition(step.when)]
        for path, ref in found:
            where: tuple[str | int, ...] = (
                ("steps", i, "input", *path) if path else ("steps", i, "when")
            )
            if ref.step_id not in ids:
                errors.append(FieldError(where, f"unknown step {ref.step_id!r}", "unknown_step"))
            elif ref.step_id not in above[step.id]:
                errors.append(
                    FieldError(
                        where,
                        f"uses steps.{ref.step_id} but does not depend on it; add it to depends_on",
                        "missing_dependency",
                    )
                )
            elif ref.field is not None and ref.field not in STEP_FIELDS:
                errors.append(
                    FieldError(
                        where,
                        f"steps.{ref.step_id}.{ref.field}: unknown field; use one of "
                        + ", ".join(sorted(STEP_FIELDS)),
                        "unknown_field",
                    )
                )
            elif ref.field == "output" and ref.key is not None:
                allowed = OUTPUT_KEYS[kinds[ref.step_id]]
                if ref.key not in allowed:
                    errors.append(
                        FieldError(
                            where,
                            f"steps.{ref.step_id}.output.{ref.key}: the output of a "
                            f"{kinds[ref.step_id]!r} step has " + ", ".join(sorted(allowed)),
                            "unknown_field",
                        )
                    )
    return errors
