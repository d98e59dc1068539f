"""Fixtures for conversation memory: the stores on the session's real Redis, a fresh tenant
per test (so tests never see each other's keys), and the tiny models loaded in-process."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from app.core.config import Settings
from app.core.redis import get_redis
from app.memory.embedding import fit_text
from app.memory.service import Memory, build_memory
from models.catalog import load_catalog
from workers.runtime import LlamaCppRuntime, RunControl

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


Embed = Callable[[list[str]], np.ndarray]


@pytest.fixture(scope="module")
def embed(embed_runtime: LlamaCppRuntime) -> Embed:
    """tiny-embed in this process, as the embedding pool runs it (cut to fit, normalised)."""

    def run(texts: list[str]) -> np.ndarray:
        limit = embed_runtime.n_ctx - 4
        fitted = [fit_text(t, embed_runtime.count_tokens, limit) for t in texts]
        out = embed_runtime.embed({"texts": fitted, "normalize": True}, RunControl())
        return np.asarray(out["vectors"], dtype=np.float32)

    return run
