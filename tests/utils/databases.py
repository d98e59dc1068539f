"""Test databases: SQLite files, and fresh PostgreSQL databases on the configured server."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest

from app.core.embedded import free_port
from app.store import db

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


INITDB = shutil.which("initdb") or "/usr/lib/postgresql/15/bin/initdb"
PG_CTL = shutil.which("pg_ctl") or "/usr/lib/postgresql/15/bin/pg_ctl"


def _as_postgres(args: list[str]) -> list[str]:
    """initdb and postgres refuse to run as root: drop to the postgres user when root."""
    if os.geteuid() == 0:
        return ["runuser", "-u", "postgres", "--", *args]
    return args


@dataclass
class PrivatePostgres:
    data: Path
    port: int

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def ctl(self, *args: str) -> None:
        subprocess.run(
            _as_postgres([PG_CTL, "-D", str(self.data), "-w", "-t", "30", *args]),
            check=True,
            capture_output=True,
        )

    def start(self) -> None:
        opts = f"-p {self.port} -k {self.data} -c listen_addresses=127.0.0.1 -c fsync=off"
        self.ctl("-o", opts, "-l", str(self.data / "server.log"), "start")

    def stop(self) -> None:
        self.ctl("-m", "fast", "stop")


@contextlib.contextmanager
def private_postgres() -> Iterator[PrivatePostgres]:
    """A PostgreSQL server of its own on a free port (tests that stop and start one never
    touch the shared server); skips the test where the server binaries are missing."""
    if not (Path(INITDB).exists() and Path(PG_CTL).exists()):
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) are not installed")
    # Outside pytest's 0700 root-owned tmp tree, so the postgres user can reach it.
    top = Path(tempfile.mkdtemp(prefix="corral-pg-"))
    data = top / "pg"
    if os.geteuid() == 0:
        shutil.chown(top, "postgres")
    subprocess.run(
        _as_postgres([INITDB, "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8"]),
        check=True,
        capture_output=True,
    )
    pg = PrivatePostgres(data, free_port())
    pg.start()
    try:
        yield pg
    finally:
        db.dispose_engines()
        with contextlib.suppress(subprocess.CalledProcessError):
            pg.stop()
        shutil.rmtree(top, ignore_errors=True)
