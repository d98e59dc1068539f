"""Shared fixtures: real Redis, real databases (SQLite, and PostgreSQL when configured), the
tiny GGUF models, and a running platform (API + worker processes) for end-to-end tests.

Services come from ``CORRAL_TEST_REDIS_URL`` / ``CORRAL_TEST_DATABASE_URL`` when set (CI
points them at the machine's Redis and PostgreSQL); otherwise Redis is an embedded
redis-server and the database is SQLite only.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest
import redis

from app import db
from app.core.config import Settings, use_settings
from app.embedded import EmbeddedRedis
from app.engine import Dispatch
from app.migrate import upgrade
from models.tiny import make_tiny
from tests.utils.platform import Platform, start_platform

PG_URL = os.environ.get("CORRAL_TEST_DATABASE_URL")
BACKENDS = ["sqlite", *(["postgresql"] if PG_URL else [])]
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
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny GGUF models, generated once per test session."""
    path = tmp_path_factory.mktemp("models")
    make_tiny(path)
    return path


@pytest.fixture(scope="session", params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    return name


def _with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{name}"))


def create_pg_database() -> str:
    """A fresh, empty PostgreSQL database on the configured server; returns its URL."""
    assert PG_URL is not None
    name = f"corral_test_{secrets.token_hex(4)}"
    admin = PG_URL.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return _with_database(admin, name)


def drop_pg_database(url: str) -> None:
    db.dispose_engines()
    assert PG_URL is not None
    admin = PG_URL.replace("postgresql+psycopg://", "postgresql://")
    name = urlsplit(url).path.lstrip("/")
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


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
    redis_url = _with_database(redis_base_url, str(REDIS_DB[backend]))
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


@dataclass
class RecordingDispatcher:
    """Keeps what the engine would send, so engine tests can inspect it."""

    sent: list[Dispatch] = field(default_factory=list)

    def send(self, dispatches: list[Dispatch]) -> None:  # type: ignore[override]
        self.sent.extend(dispatches)


@pytest.fixture
def dispatcher() -> RecordingDispatcher:
    return RecordingDispatcher()


@pytest.fixture(scope="session")
def platform(settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Platform]:
    """The API and workers for tiny-chat (2 processes) and tiny-embed, as real processes."""
    plat = start_platform(settings, tmp_path_factory.mktemp("platform"))
    try:
        yield plat
    finally:
        plat.stop()
