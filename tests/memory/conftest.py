"""Fixtures for conversation memory: the stores on the session's real Redis, a fresh tenant
per test (so tests never see each other's keys), and the tiny models loaded in-process."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.core.config import Settings
from app.core.redis import get_redis
from app.memory.service import Memory, build_memory
from models.catalog import load_catalog
from workers.runtime import LlamaCppRuntime

CATALOG = load_catalog()


@pytest.fixture
def mem(settings: Settings) -> Memory:
    return build_memory(get_redis(), settings)


@pytest.fixture
def tenant() -> str:
    return f"t{uuid.uuid4().hex[:10]}"


@pytest.fixture(scope="module")
def chat_runtime(models_dir: Path) -> Iterator[LlamaCppRuntime]:
    rt = LlamaCppRuntime(CATALOG.get("tiny-chat"), models_dir / "tiny-chat.gguf")
    yield rt
    rt.close()


@pytest.fixture(scope="module")
def embed_runtime(models_dir: Path) -> Iterator[LlamaCppRuntime]:
    rt = LlamaCppRuntime(CATALOG.get("tiny-embed"), models_dir / "tiny-embed.gguf")
    yield rt
    rt.close()
