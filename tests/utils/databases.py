"""Test databases: SQLite files, and fresh PostgreSQL databases on the configured server."""

from __future__ import annotations

import os
import secrets
from urllib.parse import urlsplit, urlunsplit

import psycopg

from app import db

PG_URL = os.environ.get("CORRAL_TEST_DATABASE_URL")
BACKENDS = ["sqlite", *(["postgresql"] if PG_URL else [])]


def with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{name}"))


def create_pg_database() -> str:
    """A fresh, empty PostgreSQL database on the configured server; returns its URL."""
    assert PG_URL is not None
    name = f"corral_test_{secrets.token_hex(4)}"
    admin = PG_URL.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return with_database(admin, name)


def drop_pg_database(url: str) -> None:
    db.dispose_engines()
    assert PG_URL is not None
    admin = PG_URL.replace("postgresql+psycopg://", "postgresql://")
    name = urlsplit(url).path.lstrip("/")
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
