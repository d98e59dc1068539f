"""One process's handle on conversation memory: the stores on its Redis, built once."""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass

import redis

from app.core.config import Settings, get_settings
from app.core.errors import ConfigError, UnknownModelError
from app.core.redis import get_redis
from app.memory.archive import ArchiveStore
from app.memory.blocks import BlockStore
from app.memory.store import ConversationStore
from app.memory.vectors import VectorIndex, detect_index
from models.catalog import CatalogEntry, load_catalog


@dataclass
class Memory:
    """Conversations, blocks, vectors and archival memory on one Redis, configured by one
    ``Settings``."""

    redis: redis.Redis
    settings: Settings
    conversations: ConversationStore
    blocks: BlockStore
    vectors: VectorIndex
    archive: ArchiveStore


def build_memory(client: redis.Redis, settings: Settings) -> Memory:
    """The memory stores on ``client`` (detects the vector index once)."""
    return Memory(
        redis=client,
        settings=settings,
        conversations=ConversationStore(client),
        blocks=BlockStore(
            client,
            default_limit=settings.memory_block_limit,
            max_limit=settings.memory_max_block_limit,
            history=settings.memory_block_history,
        ),
        vectors=detect_index(
            client, settings.memory_vector_index, settings.memory_vector_cache_mb << 20
        ),
        archive=ArchiveStore(client),
    )


_memories: dict[tuple[int, int], Memory] = {}  # (pid, id(settings)); Memory keeps settings alive
_lock = threading.Lock()


def get_memory() -> Memory:
    """This process's memory for the settings in force (a new one after a fork)."""
    settings = get_settings()
    key = (os.getpid(), id(settings))
    with _lock:
        mem = _memories.get(key)
        if mem is None:
            mem = _memories[key] = build_memory(get_redis(), settings)
        return mem


def embed_model(settings: Settings) -> CatalogEntry | None:
    """The model that embeds messages: the configured one, or with ``auto`` the first
    embed model of the catalog whose GGUF is present; None when embedding is off."""
    name = settings.memory_embed_model.strip()
    if not name:
        return None
    catalog = load_catalog(settings.catalog_path)
    if name == "auto":
        for entry in catalog.entries:
            if entry.kind == "embed" and catalog.path_for(entry, settings.models_path).is_file():
                return entry
        return None
    try:
        entry = catalog.get(name)
    except UnknownModelError as exc:
        raise ConfigError(f"CORRAL_MEMORY_EMBED_MODEL: {exc}") from exc
    if entry.kind != "embed":
        raise ConfigError(
            f"CORRAL_MEMORY_EMBED_MODEL={name!r} is a {entry.kind} model; name an embed model"
        )
    return entry


def default_chat_model(settings: Settings) -> str | None:
    """The first chat model of the catalog whose GGUF is present (counts tokens, replies)."""
    catalog = load_catalog(settings.catalog_path)
    for entry in catalog.entries:
        if entry.kind == "chat" and catalog.path_for(entry, settings.models_path).is_file():
            return entry.name
    return None
