"""The Alembic migrations and the SQLModel tables agree, on SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect
from sqlmodel import SQLModel

import app.store.tables  # noqa: F401
from app.store.db import make_engine
from app.store.migrate import downgrade, upgrade
from tests.utils.databases import BACKENDS, create_pg_database, drop_pg_database


@pytest.fixture(params=BACKENDS)
def empty_db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'm.db'}"
        return
    url = create_pg_database()
    yield url
    drop_pg_database(url)


def _diff(url: str) -> list[object]:
    engine = make_engine(url.replace("postgresql://", "postgresql+psycopg://"))
    try:
        with engine.connect() as conn:
            ctx = MigrationContext.configure(conn, opts={"compare_type": True})
            return list(compare_metadata(ctx, SQLModel.metadata))
    finally:
        engine.dispose()


def _tables(url: str) -> set[str]:
    engine = make_engine(url.replace("postgresql://", "postgresql+psycopg://"))
    try:
        return set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


def test_migrations_match_models_and_round_trip(empty_db: str) -> None:
    upgrade(empty_db)
    assert _diff(empty_db) == []
    assert {"workflow_run", "step_run", "api_key"} <= _tables(empty_db)
    downgrade(empty_db, "base")
    assert not ({"workflow_run", "step_run", "api_key"} & _tables(empty_db))
    upgrade(empty_db)
    assert _diff(empty_db) == []
