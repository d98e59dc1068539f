"""Structured chat: answers under a JSON schema, and calls of the caller's functions.

A ``chat`` step may ask for

- ``response_format``: ``json_object`` (any JSON object) or ``json_schema`` (an object
  valid under the schema); the reply is generated under a GBNF grammar converted from
  the schema (llama.cpp's own converter), so it parses;
- ``functions`` with ``function_call``: the model is told the functions and may answer
  with one call, ``{"name": …, "arguments": {…}}``. ``required`` or a function's name
  generates the reply under a grammar that admits only a call of the allowed functions
  with arguments valid under their ``parameters``; ``auto`` lets the model choose and
  reads a call from its reply when it made one. Corral does not run the functions: the
  call is the step's output (``function_calls``), for the caller to run.

Messages may carry earlier calls (an assistant message's ``tool_calls``) and their
results (``tool`` messages); :func:`template_messages` writes both as plain turns that
any chat template renders.
"""

from __future__ import annotations

import json
import re
import secrets
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

FUNCTION_NAME_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class JsonSchemaFormat(_Strict):
    """A named JSON schema the answer must be valid under."""

    name: str = Field(default="response", pattern=FUNCTION_NAME_PATTERN)
    description: str | None = Field(default=None, max_length=10_000)
    schema_: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None


class ResponseFormat(_Strict):
    """The form of the answer: free ``text``, a ``json_object``, or ``json_schema``."""

    type: Literal["text", "json_object", "json_schema"] = "text"
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("type 'json_schema' needs json_schema: {name, schema}")
        if self.type != "json_schema" and self.json_schema is not None:
            raise ValueError(f"json_schema is only for type 'json_schema', not {self.type!r}")
        return self


class FunctionDef(_Strict):
    """A function of the caller that the model may call."""

    name: str = Field(pattern=FUNCTION_NAME_PATTERN)
    description: str = Field(default="", max_length=10_000)
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object", "properties": {}})
    strict: bool | None = None


class FunctionCall(_Strict):
    """A call made earlier in the conversation: a function's name and its JSON arguments."""

    name: str = Field(min_length=1, max_length=64)
    arguments: str = Field(max_length=100_000)


class ToolCall(_Strict):
    """An earlier call as it appears on an assistant message."""

    id: str = Field(min_length=1, max_length=128)
    type: Literal["function"] = "function"
    function: FunctionCall


def check_calls(functions: list[FunctionDef], choice: str, fmt: ResponseFormat | None) -> None:
    """Raise ValueError, saying why, when ``function_call`` (``choice``) does not fit the
    ``functions`` or the ``response_format``."""
    names = [f.name for f in functions]
    if len(set(names)) != len(names):
        raise ValueError("functions have duplicate names")
    if choice not in ("auto", "none", "required", *names):
        raise ValueError(f"function_call {choice!r} is not one of functions")
    if choice == "required" and not functions:
        raise ValueError("function_call 'required' needs functions")
    if fmt is not None and fmt.type != "text" and functions and choice != "none":
        raise ValueError(
            "response_format json_object or json_schema cannot be combined with functions "
            "the model may call; set function_call to 'none'"
        )


def schema_grammar(schema: dict[str, Any]) -> str:
    """GBNF admitting exactly the JSON documents valid under ``schema``.

    Raises ValueError (or another exception of the converter) for a schema it cannot
    convert: callers turn that into an error naming the field.
    """
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    return str(json_schema_to_gbnf(json.dumps(schema)))


# Keywords that constrain a value but that the grammar converter cannot enforce: an answer
# generated under the grammar could break them, so a schema with one is refused (as
# OpenAI's structured outputs refuse keywords they do not support).
UNENFORCEABLE = (
    "minimum",
    "maximum",
    "exclusiveMinimum",
    "exclusiveMaximum",
    "multipleOf",
    "uniqueItems",
    "minProperties",
    "maxProperties",
    "not",
    "if",
    "then",
    "else",
    "dependentRequired",
    "dependentSchemas",
    "patternProperties",
    "propertyNames",
    "contains",
    "minContains",
    "maxContains",
    "unevaluatedProperties",
    "unevaluatedItems",
)
_SUBSCHEMA_MAPS = ("properties", "$defs", "definitions")
_SUBSCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SUBSCHEMAS = ("items", "additionalProperties")


def _unenforceable(
    schema: Any, path: tuple[str | int, ...] = ()
) -> tuple[tuple[str | int, ...], str] | None:
    """The first keyword in ``schema`` (or a subschema) the grammar cannot enforce."""
    if not isinstance(schema, dict):
        return None
    for keyword in UNENFORCEABLE:
        if keyword in schema:
            return (*path, keyword), keyword
    subs: list[tuple[tuple[str | int, ...], Any]] = []
    for key in _SUBSCHEMA_MAPS:
        if isinstance(schema.get(key), dict):
            subs += [((*path, key, name), sub) for name, sub in schema[key].items()]
    for key in _SUBSCHEMA_LISTS:
        if isinstance(schema.get(key), list):
            subs += [((*path, key, i), sub) for i, sub in enumerate(schema[key])]
    subs += [((*path, key), schema[key]) for key in _SUBSCHEMAS if key in schema]
    for sub_path, sub in subs:
        found = _unenforceable(sub, sub_path)
        if found is not None:
            return found
    return None


def schema_problem(schema: dict[str, Any]) -> tuple[tuple[str | int, ...], str] | None:
    """Why ``schema`` cannot constrain an answer, as (where in it, what), or None."""
    found = _unenforceable(schema)
    if found is not None:
        where, keyword = found
        return where, (
            f"{keyword!r} is not supported: answers are generated under a grammar that "
            f"cannot enforce it (unsupported: {', '.join(UNENFORCEABLE)})"
        )
    try:
        schema_grammar(schema)
    except Exception as exc:  # the converter raises whatever its parsing hits
        return (), f"cannot build a grammar from this JSON schema: {type(exc).__name__}: {exc}"
    return None


def schema_problems(
    fmt: ResponseFormat | None, functions: list[FunctionDef], function_call: str
) -> list[tuple[tuple[str | int, ...], str]]:
    """Every JSON schema of a chat step's input that cannot constrain an answer, as
    (its place in the input, why)."""
    found: list[tuple[tuple[str | int, ...], dict[str, Any]]] = []
    if fmt is not None and fmt.json_schema is not None:
        found.append((("response_format", "json_schema", "schema"), fmt.json_schema.schema_))
    if function_call != "none":
        found += [(("functions", i, "parameters"), f.parameters) for i, f in enumerate(functions)]
    out = []
    for path, schema in found:
        problem = schema_problem(schema)
        if problem is not None:
            where, msg = problem
            out.append(((*path, *where), msg))
    return out


def response_grammar(fmt: ResponseFormat | None) -> str | None:
    """The grammar of an answer in ``fmt``; None for free text."""
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        from llama_cpp.llama_grammar import JSON_GBNF

        return str(JSON_GBNF)
    assert fmt.json_schema is not None
    return schema_grammar(fmt.json_schema.schema_)


def _call_schema(function: FunctionDef) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {"name": {"const": function.name}, "arguments": function.parameters},
        "required": ["name", "arguments"],
        "additionalProperties": False,
    }


def call_grammar(functions: list[FunctionDef], choice: str) -> str | None:
    """The grammar of a forced call (``required``: any of ``functions``; a name: that
    one); None when the model chooses (``auto``, ``none``)."""
    if choice in ("auto", "none"):
        return None
    allowed = [f for f in functions if choice == "required" or f.name == choice]
    if len(allowed) == 1:
        return schema_grammar(_call_schema(allowed[0]))
    return schema_grammar({"oneOf": [_call_schema(f) for f in allowed]})


def function_prompt(functions: list[FunctionDef], choice: str) -> str:
    """The system prompt's section that tells the model the functions and the format."""
    lines = [
        "You can call functions. To call one, reply with only a JSON object:",
        '{"name": "<function name>", "arguments": {<arguments>}}',
        "Otherwise answer normally." if choice == "auto" else "Call a function now.",
        "Functions:",
    ]
    for f in functions:
        if choice in ("auto", "required") or f.name == choice:
            params = json.dumps(f.parameters, separators=(",", ":"))
            lines.append(f"- {f.name}: {f.description or '(no description)'} Arguments: {params}")
    return "\n".join(lines)


_FENCED = re.compile(r"^```(?:json)?\s*(.*?)\s*```$", re.S)


def parse_call(text: str, functions: list[FunctionDef]) -> dict[str, Any] | None:
    """The call in a reply, ``{"id", "name", "arguments"}`` (arguments as JSON text), when
    the whole reply is one call of one of ``functions``; else None."""
    body = text.strip()
    fenced = _FENCED.match(body)
    if fenced:
        body = fenced.group(1)
    try:
        obj = json.loads(body)
    except json.JSONDecodeError:
        return None
    names = {f.name for f in functions}
    if not isinstance(obj, dict) or obj.get("name") not in names:
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):  # some models write the arguments as a JSON string
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return None
    if not isinstance(args, dict):
        return None
    return {
        "id": "call_" + secrets.token_hex(12),
        "name": obj["name"],
        "arguments": json.dumps(args, ensure_ascii=False),
    }


def template_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Messages as a chat template renders them: ``role`` and ``content`` text only.

    An assistant's earlier calls become its reply's text in the call format; a ``tool``
    message becomes a user turn holding the result, named by its call.
    """
    out: list[dict[str, Any]] = []
    for m in messages:
        role, content = m["role"], m.get("content") or ""
        if role == "assistant" and m.get("tool_calls"):
            calls = [
                json.dumps(
                    {"name": c["function"]["name"], "arguments": _loads(c["function"]["arguments"])}
                )
                for c in m["tool_calls"]
            ]
            content = "\n".join([content, *calls]) if content else "\n".join(calls)
        elif role == "tool":
            label = m.get("name") or m.get("tool_call_id") or "tool"
            role, content = "user", f"<tool_result name={label!r}>\n{content}\n</tool_result>"
        out.append({"role": role, "content": content})
    return out


def _loads(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text
