"""Fixtures of the worker tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from models.catalog import load_catalog
from workers.runtime import LlamaCppRuntime


@pytest.fixture(scope="module")
def runtime(models_dir: Path) -> Iterator[LlamaCppRuntime]:
    """The tiny chat model loaded in llama.cpp, once per module."""
    catalog = load_catalog(Path(__file__).parents[2] / "models" / "catalog.yaml")
    rt = LlamaCppRuntime(catalog.get("tiny-chat"), models_dir / "tiny-chat.gguf")
    yield rt
    rt.close()
