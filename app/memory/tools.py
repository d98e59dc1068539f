"""Memory tools a model calls during a chat step (and the API exposes): the protocol.

**Format.** A tool call is a JSON object with ``tool`` and ``args``, alone on its line of
the model's reply (or the whole reply, or inside a fenced code block)::

    {"tool": "memory_append", "args": {"block": "user", "text": "Prefers short answers."}}

The worker parses the reply after generation, executes each call (at most
:data:`MAX_CALLS` per round), records every call and its result in the step output (and
block edits in the block's history), then gives the model the results as a user message
``<tool_results>…</tool_results>`` and lets it generate again, up to ``max_tool_rounds``.

With ``tool_choice`` ``required`` (or a tool's name) the first round is generated under a
GBNF grammar (:func:`grammar`) that admits only well-formed calls of the allowed tools —
block names that exist, and for ``memory_replace`` an ``old`` text the block holds — so
even a model that has never seen the format emits a valid, executable call.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from app.core.errors import CorralError, SpecError
from app.memory import recall
from app.memory.blocks import DEFAULT_BLOCKS
from app.memory.keys import Keys
from app.memory.schemas import Block, Conversation, SearchScope
from app.memory.service import Memory
from app.memory.vectors import Vectors

MAX_CALLS = 8
MUTATING = {"memory_append", "memory_replace"}
TEXT_CHARS = 160  # longest string a forced call may hold


class _Args(BaseModel):
    model_config = ConfigDict(extra="forbid")


class AppendArgs(_Args):
    block: str = Field(min_length=1, max_length=64)
    text: str = Field(min_length=1)


class ReplaceArgs(_Args):
    block: str = Field(min_length=1, max_length=64)
    old: str = Field(min_length=1)
    new: str = ""


class LimitArgs(_Args):
    limit: int = Field(default=10, ge=1, le=50)


class SearchArgs(_Args):
    query: str = Field(min_length=1, max_length=2000)
    k: int = Field(default=5, ge=1, le=20)
    scope: SearchScope = "all"  # models see long-term memory unless they ask otherwise


class EnrichedArgs(_Args):
    query: str | None = Field(default=None, max_length=2000)
    limit: int = Field(default=10, ge=1, le=50)
    k: int = Field(default=5, ge=0, le=20)


ARGS: dict[str, type[_Args]] = {
    "memory_append": AppendArgs,
    "memory_replace": ReplaceArgs,
    "recent_history": LimitArgs,
    "semantic_search": SearchArgs,
    "key_moments": LimitArgs,
    "enriched_context": EnrichedArgs,
}
DESCRIPTIONS = {
    "memory_append": '{"block": NAME, "text": TEXT}: add a line to one of your memory blocks',
    "memory_replace": '{"block": NAME, "old": TEXT, "new": TEXT}: replace text in a block '
    '("new": "" deletes it)',
    "recent_history": '{"limit": N}: the latest messages of this conversation',
    "semantic_search": '{"query": TEXT, "k": N, "scope": "all"}: what this user said earlier '
    "(from any conversation) and long-term memory (facts, preferences, events learnt from "
    'past conversations) most similar to the query; scope "messages" or "archive" for one',
    "key_moments": '{"limit": N}: messages marked as key moments (breakthroughs)',
    "enriched_context": '{"query": TEXT, "limit": N, "k": N}: recent messages, similar '
    "earlier ones, long-term memory and key moments together",
}


@dataclass(frozen=True)
class ToolCall:
    """One call the model made: the tool, its arguments, and the text it came from."""

    tool: str
    args: dict[str, Any]
    raw: str

    def digest(self) -> str:
        body = json.dumps([self.tool, self.args], sort_keys=True).encode()
        return hashlib.sha256(body).hexdigest()[:16]


def instructions(tools: Sequence[str], blocks: Sequence[str]) -> str:
    """The system prompt's section that teaches the model the tool-call format."""
    lines = [
        "You can call tools. To call one, reply with a line holding only a JSON object:",
        '{"tool": "<name>", "args": {...}}',
        "The results come back in the next message; then answer.",
        f"Memory blocks: {', '.join(blocks)}.",
        "Tools:",
    ]
    lines += [f"- {name} {DESCRIPTIONS[name]}" for name in tools]
    return "\n".join(lines)


_FENCE = re.compile(r"```(?:json)?\s*(.*?)```", re.S)


def _as_call(chunk: str) -> ToolCall | None:
    chunk = chunk.strip()
    if not (chunk.startswith("{") and chunk.endswith("}")):
        return None
    try:
        obj = json.loads(chunk)
    except json.JSONDecodeError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("tool"), str):
        return None
    args = obj.get("args", {})
    return ToolCall(obj["tool"], args if isinstance(args, dict) else {"_invalid": args}, chunk)


def parse_tool_calls(text: str) -> list[ToolCall]:
    """The tool calls in a model's reply, in order (none when it just answered)."""
    whole = _as_call(text)
    if whole is not None:
        return [whole]
    fenced = [c for c in (_as_call(m) for m in _FENCE.findall(text)) if c is not None]
    if fenced:
        return fenced[:MAX_CALLS]
    calls = [c for c in (_as_call(line) for line in text.splitlines()) if c is not None]
    return calls[:MAX_CALLS]


# --- grammar-forced calls ---------------------------------------------------------------


def _gbnf(text: str) -> str:
    """A GBNF literal matching ``text`` exactly."""
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return '"' + escaped.replace("\r", "\\r").replace("\t", "\\t") + '"'


def _alternatives(values: Sequence[str]) -> str:
    return " | ".join(_gbnf(json.dumps(v)) for v in values)


def _replace_candidates(value: str, limit: int = 40) -> list[str]:
    seen: dict[str, None] = {}
    for piece in [*value.splitlines(), *value.split()]:
        piece = piece.strip()
        if len(piece) >= 2:
            seen.setdefault(piece, None)
    return list(seen)[:limit]


def grammar(tools: Sequence[str], blocks: dict[str, Block]) -> str | None:
    """GBNF admitting exactly one well-formed call of one of ``tools``; None if none can be."""
    rules: dict[str, str] = {
        "str": f'"\\"" [^"\\\\\\x00-\\x1f]{{1,{TEXT_CHARS}}} "\\""',
        "num": "[1-9]",
    }
    if "semantic_search" in tools:
        rules["scope"] = _alternatives(["all", "messages", "archive"])
    names = list(blocks) or list(DEFAULT_BLOCKS)
    rules["block"] = _alternatives(names)
    calls: list[str] = []

    def call(tool: str, body: str) -> None:
        rules[f"call-{tool.replace('_', '-')}"] = (
            _gbnf(f'{{"tool": "{tool}", "args": {{') + " " + body + ' "}}"'
        )
        calls.append(f"call-{tool.replace('_', '-')}")

    for tool in tools:
        if tool == "memory_append":
            call(tool, _gbnf('"block": ') + " block " + _gbnf(', "text": ') + " str")
        elif tool == "memory_replace":
            options: list[str] = []
            for name, block in blocks.items():
                candidates = _replace_candidates(block.value)
                if candidates:
                    rule = f"old-{len(options)}"
                    rules[rule] = _alternatives(candidates)
                    options.append(_gbnf(f'"block": {json.dumps(name)}, "old": ') + " " + rule)
            if options:
                rules["replace-target"] = " | ".join(f"( {o} )" for o in options)
                call(tool, "replace-target " + _gbnf(', "new": ') + " str")
        elif tool == "semantic_search":
            scope = "( " + _gbnf(', "scope": ') + " scope )?"
            call(tool, _gbnf('"query": ') + " str " + _gbnf(', "k": ') + " num " + scope)
        elif tool == "enriched_context":
            call(tool, _gbnf('"query": ') + " str")
        else:  # recent_history, key_moments
            call(tool, _gbnf('"limit": ') + " num")
    if not calls:
        return None
    rules = {"root": " | ".join(calls), **rules}
    return "\n".join(f"{name} ::= {body}" for name, body in rules.items())


# --- execution --------------------------------------------------------------------------


@dataclass
class ToolContext:
    """Whose memory a call works on, who makes it, and how queries are embedded."""

    mem: Memory
    tenant: str
    user_id: str
    conversation: Conversation | None
    source: str  # "api", or "model:<name> workflow=<id> step=<id>"
    embed_query: Callable[[str], Vectors]
    allowed: Sequence[str] = tuple(ARGS)
    scope: str | None = None  # a step's run: a retried step does not repeat an edit


def execute(ctx: ToolContext, call: ToolCall, ordinal: str = "0") -> dict[str, Any]:
    """Run one call; returns ``{tool, args, ok, result | error}`` (never raises for bad calls)."""
    record: dict[str, Any] = {"tool": call.tool, "args": call.args}
    if call.tool not in ARGS:
        return {**record, "ok": False, "error": f"unknown tool {call.tool!r}"}
    if call.tool not in ctx.allowed:
        return {**record, "ok": False, "error": f"tool {call.tool!r} is not enabled here"}
    try:
        args = ARGS[call.tool].model_validate(call.args)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'args'}: {e['msg']}"
            for e in exc.errors(include_url=False)
        )
        return {**record, "ok": False, "error": f"invalid args: {problems}"}
    replay_key = None
    if ctx.scope is not None and call.tool in MUTATING:
        replay_key = f"{ordinal}:{call.digest()}"
        done = ctx.mem.redis.hget(Keys(ctx.tenant).toolruns(ctx.scope), replay_key)
        if done is not None:
            return {**cast(dict[str, Any], json.loads(cast(bytes, done))), "replayed": True}
    try:
        out = {**record, "ok": True, "result": _run(ctx, call.tool, args)}
    except CorralError as exc:
        out = {**record, "ok": False, "error": str(exc)}
    if replay_key is not None:
        key = Keys(ctx.tenant).toolruns(cast(str, ctx.scope))
        pipe = ctx.mem.redis.pipeline()
        pipe.hset(key, replay_key, json.dumps(out))
        pipe.expire(key, 7 * 86400)
        pipe.execute()
    return out


def _run(ctx: ToolContext, tool: str, args: _Args) -> Any:
    mem, tenant, user = ctx.mem, ctx.tenant, ctx.user_id
    if isinstance(args, AppendArgs):
        block = mem.blocks.append(tenant, user, args.block, args.text, source=ctx.source)
        return {"block": block.name, "value": block.value, "version": block.version}
    if isinstance(args, ReplaceArgs):
        block = mem.blocks.replace(tenant, user, args.block, args.old, args.new, source=ctx.source)
        return {"block": block.name, "value": block.value, "version": block.version}
    if isinstance(args, SearchArgs):
        vector = ctx.embed_query(args.query)
        hits = recall.nearest(mem, tenant, user, vector, args.k, scope=args.scope)
        return [recall.compact_hit(h) for h in hits]
    if isinstance(args, EnrichedArgs):
        query = ctx.embed_query(args.query) if args.query and args.k else None
        return recall.enriched(
            mem, tenant, user, ctx.conversation, query, limit=args.limit, k=args.k
        )
    assert isinstance(args, LimitArgs)
    if tool == "key_moments":
        return [recall.compact(m) for m in mem.conversations.key_moments(tenant, user, args.limit)]
    if ctx.conversation is None:
        raise SpecError.single(("args",), "recent_history needs a conversation", "conversation")
    return [recall.compact(m) for m in recall.recent(mem, tenant, ctx.conversation, args.limit)]


def results_message(results: Sequence[dict[str, Any]]) -> str:
    """The tool results as the model reads them."""
    lines = [json.dumps(r, ensure_ascii=False) for r in results]
    return "<tool_results>\n" + "\n".join(lines) + "\n</tool_results>"
