"""Nothing is lost when PostgreSQL restarts mid-step: a private server, stopped and started.

The worker finishes generating while the database is down; storing the result fails, the
step task retries with backoff until the database answers, and the workflow completes with
one recorded result.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from app import db
from app.core.config import Settings, use_settings
from app.embedded import EmbeddedRedis, free_port
from app.migrate import upgrade
from tests.utils.platform import start_platform

pytestmark = pytest.mark.e2e

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


@pytest.fixture
def private_pg() -> Iterator[PrivatePostgres]:
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


def test_database_restart_mid_step_loses_nothing(
    settings: Settings, private_pg: PrivatePostgres, tmp_path: Path
) -> None:
    redis_server = EmbeddedRedis(tmp_path / "redis", persist=False).start()
    isolated = settings.model_copy(
        update={"database_url": private_pg.url, "redis_url": redis_server.url}
    )
    upgrade(isolated.sqlalchemy_url)
    try:
        with use_settings(isolated):
            (tmp_path / "logs").mkdir()
            plat = start_platform(isolated, tmp_path / "logs", workers={"tiny-chat": 1})
            try:
                spec = {
                    "name": "db-restart",
                    "steps": [
                        {
                            "id": "a",
                            "kind": "generate",
                            "model": "tiny-chat",
                            "input": {"prompt": "Go", "max_tokens": 1500, "ignore_eos": True},
                        },
                        {
                            "id": "b",
                            "kind": "generate",
                            "model": "tiny-chat",
                            "depends_on": ["a"],
                            "input": {"prompt": "{{ steps.a.output.text[:40] }}", "max_tokens": 4},
                        },
                    ],
                }
                wid = plat.submit(spec).json()["id"]
                deadline = time.monotonic() + 30
                while (
                    plat.client.get(f"/v1/workflows/{wid}").json()["steps"][0]["status"]
                    != "running"
                ):
                    assert time.monotonic() < deadline
                    time.sleep(0.02)
                private_pg.stop()
                assert plat.client.get(f"/v1/workflows/{wid}").status_code == 503
                # The step finishes generating while the database is down: its result
                # waits (the worker says so) until the database is back.
                worker_log = plat.log_dir / "worker-tiny-chat.log"
                deadline = time.monotonic() + 60
                while "database is unavailable" not in worker_log.read_text(errors="replace"):
                    assert time.monotonic() < deadline, plat.logs()
                    time.sleep(0.2)
                private_pg.start()
                run = plat.wait(wid, timeout_s=120)
                assert run["status"] == "succeeded", (run, plat.logs())
                a, b = run["steps"]
                assert a["attempts"] == 1
                assert a["output"]["completion_tokens"] == 1500
                assert b["status"] == "succeeded"
            finally:
                plat.stop()
    finally:
        redis_server.stop()
        db.dispose_engines()
