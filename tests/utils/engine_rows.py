"""Rows of a run and its steps as the engine inserts them, for tests that write them
through app/prepared.py directly."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from app.store.tables import StepStatus, WorkflowStatus, new_id, utcnow

# Values a client-side binding must quote right: quotes, percent signs (the driver's
# placeholders), backslashes, a NUL-free control character, non-ASCII, JSON nesting.
AWKWARD = 'it\'s 100% {{ x }} %(name)s %s \\ \t "quoted" — ünïcode ☃'


def run_row(workflow_id: str) -> dict[str, Any]:
    now = utcnow()
    return {
        "id": workflow_id,
        "name": AWKWARD,
        "status": WorkflowStatus.running,
        "spec": {"name": AWKWARD, "steps": [], "nested": {"list": [1, 2.5, None, True]}},
        "api_key_id": None,
        "idempotency_key": None,
        "request_hash": None,
        "error": None,
        "created_at": now,
        "updated_at": now,
        "finished_at": None,
    }


def step_rows(workflow_id: str, n: int) -> list[dict[str, Any]]:
    now = utcnow()
    return [
        {
            "id": new_id(),
            "workflow_id": workflow_id,
            "step_id": f"s{i}",
            "position": i,
            "kind": "generate",
            "model": "tiny-chat",
            "status": StepStatus.queued if i == 0 else StepStatus.pending,
            "depends_on": [f"s{j}" for j in range(i)],
            "attempts": 0,
            "max_attempts": 3,
            "output": {"text": AWKWARD, "n": i} if i % 2 else None,
            "error": AWKWARD if i == 2 else None,
            "queued_at": now - timedelta(microseconds=i) if i == 0 else None,
            "dispatched_at": None,
            "started_at": None,
            "finished_at": None,
            "updated_at": now,
        }
        for i in range(n)
    ]
