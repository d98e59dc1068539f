"""Step templates and conditions, evaluated in Jinja's sandbox — never ``eval``.

Inputs may use earlier outputs, ``{{ steps.extract.output.text }}``; conditions are sandboxed
expressions, ``steps.score.output.text | int > 50``. At submit, :func:`references` lists
the ``steps.<id>.<field>`` paths a template uses so the validator can check them.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from jinja2 import ChainableUndefined, Template, TemplateError, nodes
from jinja2.environment import TemplateExpression
from jinja2.sandbox import ImmutableSandboxedEnvironment

# ChainableUndefined: a skipped step's output renders as "" instead of raising.
_ENV = ImmutableSandboxedEnvironment(undefined=ChainableUndefined, autoescape=False)

MAX_RENDERED_CHARS = 2_000_000
_CACHED_CHARS = 8192  # templates up to this long stay compiled (512 of them per process)


@dataclass(frozen=True)
class Reference:
    """One ``steps.<step_id>[.<field>[.<key>]]`` path used by a template or condition."""

    step_id: str
    field: str | None
    key: str | None


def _walk_refs(tree: nodes.Node) -> set[Reference]:
    refs: set[Reference] = set()
    for node in tree.find_all((nodes.Getattr, nodes.Getitem)):
        chain: list[str] = []
        cur: nodes.Node = node
        while isinstance(cur, nodes.Getattr | nodes.Getitem):
            if isinstance(cur, nodes.Getattr):
                chain.append(cur.attr)
            elif isinstance(cur.arg, nodes.Const) and isinstance(cur.arg.value, str):
                chain.append(cur.arg.value)
            else:
                chain.clear()
            cur = cur.node
        if isinstance(cur, nodes.Name) and cur.name == "steps" and chain:
            path = list(reversed(chain))
            refs.add(
                Reference(
                    path[0], path[1] if len(path) > 1 else None, path[2] if len(path) > 2 else None
                )
            )
    # Only keep the longest path of each chain (inner Getattr nodes repeat prefixes).
    return {
        r
        for r in refs
        if not any(o != r and o.step_id == r.step_id and _extends(o, r) for o in refs)
    }


def _extends(longer: Reference, shorter: Reference) -> bool:
    if shorter.field is None:
        return longer.field is not None
    return shorter.key is None and longer.field == shorter.field and longer.key is not None


def check_template(source: str) -> set[Reference]:
    """Parse a template; raise ``TemplateError`` on bad syntax; return the step paths it uses."""
    if not has_template(source):  # plain text: nothing for Jinja to parse or check
        return set()
    return _walk_refs(_ENV.parse(source))


def check_condition(source: str) -> set[Reference]:
    """Parse a condition expression; raise ``TemplateError`` on bad syntax; return its paths."""
    _ENV.compile_expression(source)
    return _walk_refs(_ENV.parse("{{ (" + source + ") }}"))


def has_template(source: str) -> bool:
    return "{{" in source or "{%" in source or "{#" in source


@functools.lru_cache(maxsize=512)
def _compiled(source: str) -> Template:
    """A template compiled once per process (a fan-out renders the same source many times)."""
    return _ENV.from_string(source)


def render(source: str, context: Mapping[str, Any]) -> str:
    """Render a template in the sandbox. Raises ``TemplateError`` on a runtime error."""
    if not has_template(source):
        return source
    template = _compiled(source) if len(source) <= _CACHED_CHARS else _ENV.from_string(source)
    out = template.render(**context)
    if len(out) > MAX_RENDERED_CHARS:
        raise TemplateError(
            f"rendered text is {len(out)} characters; the limit is {MAX_RENDERED_CHARS}"
        )
    return out


@functools.lru_cache(maxsize=512)
def _expression(source: str) -> TemplateExpression:
    return _ENV.compile_expression(source, undefined_to_none=True)


def evaluate(condition: str, context: Mapping[str, Any]) -> bool:
    """Evaluate a condition in the sandbox; undefined values are false."""
    value = _expression(condition)(**context)
    return bool(value)


def render_value(value: Any, context: Mapping[str, Any]) -> Any:
    """Render every string inside a JSON-like value (lists and dicts recursively)."""
    if isinstance(value, str):
        return render(value, context)
    if isinstance(value, list):
        return [render_value(v, context) for v in value]
    if isinstance(value, dict):
        return {k: render_value(v, context) for k, v in value.items()}
    return value


def template_strings(
    value: Any, path: tuple[str | int, ...] = ()
) -> list[tuple[tuple[str | int, ...], str]]:
    """Every string inside a JSON-like value, with its path, for validation."""
    if isinstance(value, str):
        return [(path, value)]
    if isinstance(value, list):
        return [item for i, v in enumerate(value) for item in template_strings(v, (*path, i))]
    if isinstance(value, dict):
        return [item for k, v in value.items() for item in template_strings(v, (*path, k))]
    return []
