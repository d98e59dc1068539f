"""A workflow's parsed spec, cached per process.

A spec never changes after submit, so each process parses it once (an LRU of recent
workflows) instead of reading and parsing it in every transaction: the API remembers it
at submit, a worker meets it at its step's claim, and the engine reads it from there.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection

from app import rows


@dataclass(frozen=True)
class Spec:
    """A workflow's parsed spec: its name and its step specs by id."""

    name: str
    steps: dict[str, dict[str, Any]]


_SPECS: OrderedDict[str, Spec] = OrderedDict()  # workflow id: parsed spec (an LRU)
_SPECS_MAX = 256
_lock = threading.Lock()


def cached(workflow_id: str) -> Spec | None:
    """The spec this process parsed for ``workflow_id``, if it still holds it."""
    with _lock:
        spec = _SPECS.get(workflow_id)
        if spec is not None:
            _SPECS.move_to_end(workflow_id)
        return spec


def remember(workflow_id: str, raw: Mapping[str, Any]) -> Spec:
    """Parse a workflow's stored spec (its JSON as a dict) and keep it."""
    spec = Spec(str(raw.get("name", "")), {step["id"]: step for step in raw["steps"]})
    with _lock:
        _SPECS[workflow_id] = spec
        while len(_SPECS) > _SPECS_MAX:
            _SPECS.popitem(last=False)
    return spec


def forget_all() -> None:
    """Drop every cached spec (what a fresh process starts with)."""
    with _lock:
        _SPECS.clear()


class NotCached(LookupError):
    """A spec asked for without a connection to read it is not in this process's cache."""


def spec_of(conn: Connection | None, workflow_id: str) -> Spec:
    """A workflow's parsed spec: from this process's cache, else read once and kept
    (``conn`` None: a run being created, or a result settled in memory, whose spec is in
    the cache unless evicted since: :class:`NotCached`)."""
    spec = cached(workflow_id)
    if spec is None:
        if conn is None:
            raise NotCached(workflow_id)
        raw = conn.execute(rows.SPEC, {"workflow_id": workflow_id}).scalar_one()
        spec = remember(workflow_id, dict(raw))
    return spec


def ancestors(specs: Mapping[str, Mapping[str, Any]], step_id: str) -> set[str]:
    """Every step ``step_id`` depends on, transitively (what its templates may read)."""
    seen: set[str] = set()
    todo = [step_id]
    while todo:
        for dep in specs.get(todo.pop(), {}).get("depends_on") or ():
            if dep not in seen:
                seen.add(dep)
                todo.append(dep)
    return seen
