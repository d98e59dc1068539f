"""Dependency aliases for route signatures: settings, DB session, the caller's API key."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

import redis.asyncio as aioredis
from fastapi import Depends, Request
from fastapi.concurrency import run_in_threadpool
from redis.exceptions import RedisError
from sqlmodel import Session

from app.core.config import Settings, get_settings
from app.core.errors import AuthError, ForbiddenError, ServiceUnavailable
from app.memory.service import Memory, get_memory
from app.store import db, keys
from app.store.tables import ApiKey
from app.workflows.events import FinishedListener
from models.catalog import Catalog, load_catalog


def _session() -> Iterator[Session]:
    with db.session_scope() as session:
        yield session


def _verify(token: str) -> ApiKey:
    with db.session_scope() as session:
        return keys.verify_key(session, token)


_verified: dict[float, keys.VerifiedKeys] = {}


def verified_keys() -> keys.VerifiedKeys:
    """This process's cache of verified keys (one per CORRAL_API_KEY_CACHE_S value)."""
    ttl = get_settings().api_key_cache_s
    cache = _verified.get(ttl)
    if cache is None:
        cache = _verified[ttl] = keys.VerifiedKeys(ttl)
    return cache


async def _api_key(request: Request) -> ApiKey:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise AuthError("missing API key: send 'Authorization: Bearer <key>'")
    cache = verified_keys()
    row = cache.get(token)
    if row is None:  # not verified lately: ask the database, off the event loop
        row = await run_in_threadpool(_verify, token)
        cache.put(token, row)
    request.state.api_key_id = row.id
    return row


async def _admin_key(key: Annotated[ApiKey, Depends(_api_key)]) -> ApiKey:
    if not key.admin:
        raise ForbiddenError(
            f"key {key.prefix!r} is not an admin key: governance changes need one "
            "(`corral keys create NAME --admin`)"
        )
    return key


# The dependencies below never block, so they are ``async``: FastAPI runs a plain ``def``
# dependency in its thread pool, a hop that costs more than these bodies.


async def _settings() -> Settings:
    return get_settings()


async def _catalog(settings: Annotated[Settings, Depends(_settings)]) -> Catalog:
    return load_catalog(settings.catalog_path)  # cached: a stat() unless the file changed


async def _streams(request: Request) -> aioredis.Redis:
    """This API process's asyncio Redis client, for reading workflows' event streams."""
    client: aioredis.Redis | None = getattr(request.app.state, "streams", None)
    if client is None:
        url = get_settings().broker_url
        client = request.app.state.streams = aioredis.Redis.from_url(url, socket_connect_timeout=5)
    return client


async def _finished(request: Request) -> FinishedListener:
    listener: FinishedListener = request.app.state.finished
    return listener


def _memory() -> Iterator[Memory]:
    """Conversation memory; Redis failures inside the route become a 503."""
    try:
        yield get_memory()
    except (RedisError, OSError) as exc:
        raise ServiceUnavailable(f"Redis is unavailable: {exc}") from exc


SettingsDep = Annotated[Settings, Depends(_settings)]
SessionDep = Annotated[Session, Depends(_session)]
ApiKeyDep = Annotated[ApiKey, Depends(_api_key)]
AdminKeyDep = Annotated[ApiKey, Depends(_admin_key)]
CatalogDep = Annotated[Catalog, Depends(_catalog)]
FinishedDep = Annotated[FinishedListener, Depends(_finished)]
StreamsDep = Annotated[aioredis.Redis, Depends(_streams)]
MemoryDep = Annotated[Memory, Depends(_memory)]
