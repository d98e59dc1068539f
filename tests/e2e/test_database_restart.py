"""Nothing is lost when PostgreSQL restarts mid-step: a private server, stopped and started.

The worker finishes generating while the database is down; storing the result fails, the
step task retries with backoff until the database answers, and the workflow completes with
one recorded result.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from app.core.config import Settings, use_settings
from app.core.embedded import EmbeddedRedis
from app.store import db
from app.store.migrate import upgrade
from tests.utils.databases import PrivatePostgres
from tests.utils.platform import start_platform

pytestmark = pytest.mark.e2e


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
