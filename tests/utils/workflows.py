"""Workflow specs and submits for tests of the workflow core and the workers."""

from __future__ import annotations

from typing import Any

from app.core.config import Settings
from app.workflows import service
from app.workflows.spec import ValidatedWorkflow, validate_workflow
from models.catalog import load_catalog


def gen(step_id: str, prompt: str = "hi", max_tokens: int = 4, **extra: Any) -> dict[str, Any]:
    """A ``generate`` step on tiny-chat (greedy, so its output is the same every run)."""
    return {
        "id": step_id,
        "kind": "generate",
        "model": "tiny-chat",
        "input": {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0},
        **extra,
    }


def validated(settings: Settings, *steps: dict[str, Any], name: str = "t") -> ValidatedWorkflow:
    """A workflow of ``steps`` (one ``gen`` step if none) validated against the catalog."""
    raw = {"name": name, "steps": list(steps) or [gen("a")]}
    return validate_workflow(raw, load_catalog(settings.catalog_path), settings)


def submit(settings: Settings, *steps: dict[str, Any]) -> str:
    """Store and send a workflow through the service, as the API does; its id."""
    return service.submit_validated(validated(settings, *steps), api_key_id=None).id
