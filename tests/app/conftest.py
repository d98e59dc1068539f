"""Fixtures of the engine and API tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis

from app import live
from app.core.config import Settings, use_settings
from tests.utils.databases import with_database


@pytest.fixture
def isolated(
    settings: Settings, redis_base_url: str, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Settings]:
    """The session's database with a Redis database of its own: no worker consumes the
    messages these tests send, and no live pool is registered there. The live-pool view a
    first submit reads stays fresh for the whole test: a pause of this shared host longer
    than the product's one second would otherwise send a later submit to the thread pool."""
    monkeypatch.setattr(live, "VIEW_MAX_AGE_S", 3600.0)
    url = with_database(redis_base_url, "12")
    client = redis.Redis.from_url(url)
    client.flushdb()
    with use_settings(settings.model_copy(update={"redis_url": url})) as s:
        yield s
    client.flushdb()
    client.close()
