"""Flower, Celery's monitor, on a real platform: `corral flower` behind basic auth sees the
pool's worker node and the step tasks it ran.

The platform (API and a `corral worker --model tiny-chat` pool) has SQLite and a Redis
database of its own; Flower is a real `corral flower` process, observed over HTTP.

Task events are off in the workers (``worker_send_task_events=False``): Flower turns them
on itself with a broadcast ``enable_events`` every 5 s, and each worker logs that it did.
A user sees the tasks that ran after that, so the test waits for the worker to say so
before it submits the workflow Flower must show.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlmodel import select

from app.core.config import settings_env, use_settings
from app.core.embedded import free_port
from app.store import db
from app.store.tables import StepRun
from app.workflows.names import STEP_TASK
from tests.utils.databases import with_database
from tests.utils.platform import Platform, module_settings, spawn, start_platform
from tests.utils.waiting import until
from tests.utils.workflows import gen

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

REDIS_DB = "7"
USER, PASSWORD = "corral", "flower-test-secret"
# What a Celery worker logs when a remote enable_events (Flower's) turns task events on.
EVENTS_ENABLED = "Events of group {task} enabled by remote"


@dataclass
class Flower:
    url: str
    proc: subprocess.Popen[bytes]
    log: Path


def stop_process(proc: subprocess.Popen[bytes], grace_s: float = 20.0) -> None:
    """SIGTERM, wait, then SIGKILL the whole process group (spawn starts a session)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.fixture(scope="module")
def plat(redis_base_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Platform]:
    root = tmp_path_factory.mktemp("flower")
    settings = module_settings(root, with_database(redis_base_url, REDIS_DB), [])
    with use_settings(settings):
        (root / "logs").mkdir()
        # INFO: the worker logs when task events are turned on (the test waits for it).
        env = {"CORRAL_LOG_LEVEL": "INFO"}
        platform = start_platform(settings, root / "logs", {"tiny-chat": 1}, extra_env=env)
        try:
            yield platform
        finally:
            platform.stop()


@pytest.fixture(scope="module")
def flower(plat: Platform) -> Iterator[Flower]:
    port = free_port()
    log = plat.log_dir / "flower.log"
    proc = spawn(
        ["flower", "--port", str(port), "--basic-auth", f"{USER}:{PASSWORD}"],
        settings_env(plat.settings),
        log,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(base_url=url, timeout=10) as client:

            def answers() -> bool:
                assert proc.poll() is None, f"flower exited with {proc.returncode}"
                try:
                    client.get("/healthcheck")
                except httpx.TransportError:
                    return False
                return True

            until(answers, 60, "flower answers HTTP", plat.logs)
        yield Flower(url, proc, log)
    finally:
        stop_process(proc)
    # A SIGTERM is a clean stop, not a crash (a group kill after the grace would be -9).
    assert proc.returncode in (0, -signal.SIGTERM), (proc.returncode, plat.logs())


@pytest.fixture
def authed(flower: Flower) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=flower.url, auth=(USER, PASSWORD), timeout=30) as client:
        yield client


def test_flower_refuses_requests_without_the_right_credentials(flower: Flower) -> None:
    with httpx.Client(base_url=flower.url, timeout=30) as client:
        for path in ("/", "/api/workers", "/api/tasks"):
            anonymous = client.get(path)
            assert anonymous.status_code == 401, (path, anonymous.text)
            wrong = client.get(path, auth=(USER, "not-the-password"))
            assert wrong.status_code == 401, (path, wrong.text)
            stranger = client.get(path, auth=("someone", PASSWORD))
            assert stranger.status_code == 401, (path, stranger.text)
        # The dashboard asks a browser for the login (the API answers a bare 401).
        page = client.get("/")
        assert page.headers["WWW-Authenticate"] == 'Basic realm="flower"', page.headers
        for path in ("/", "/api/workers", "/api/tasks"):
            right = client.get(path, auth=(USER, PASSWORD))
            assert right.status_code == 200, (path, right.text)


def test_flower_lists_the_pool_worker_node(
    plat: Platform, flower: Flower, authed: httpx.Client
) -> None:
    def pool_nodes() -> dict[str, Any]:
        resp = authed.get("/api/workers", params={"refresh": "true"})
        assert resp.status_code == 200, resp.text
        return {n: w for n, w in resp.json().items() if n.startswith("tiny-chat.")}

    nodes = until(pool_nodes, 60, "flower lists a tiny-chat node", plat.logs)
    assert len(nodes) == 1, nodes  # one `corral worker` process: one Celery node
    ((name, info),) = nodes.items()
    # The node is the worker's own: `tiny-chat.<pid of corral worker>@<host>`.
    assert name.split("@")[0] == f"tiny-chat.{plat.procs['tiny-chat'].pid}", name
    assert [q["name"] for q in info["active_queues"]] == ["model.tiny-chat"], info
    assert STEP_TASK in info["registered"], info["registered"]
    assert info["stats"]["pool"]["max-concurrency"] == 1, info["stats"]
    status = authed.get("/api/workers", params={"status": "true"})
    assert status.status_code == 200, status.text


def test_flower_shows_step_tasks_by_their_stable_name(
    plat: Platform, flower: Flower, authed: httpx.Client
) -> None:
    worker_log = plat.log_dir / "worker-tiny-chat.log"
    # Flower's first enable_events broadcast comes 5 s after it starts; the worker logs it.
    until(
        lambda: EVENTS_ENABLED in worker_log.read_text(errors="replace"),
        60,
        "the worker turns task events on at Flower's request",
        plat.logs,
    )
    run = plat.run(
        {"name": "watched", "steps": [gen("a"), gen("b"), gen("c", depends_on=["a", "b"])]}
    )
    assert run["status"] == "succeeded", run
    with db.session_scope() as session:
        rows = session.exec(select(StepRun).where(StepRun.workflow_id == run["id"])).all()
    # Each attempt is a task whose id is `<step run id>-<attempt>` (app/workflows/dispatch).
    expected = {f"{row.id}-{row.attempts}": row.step_id for row in rows}
    assert len(expected) == 3

    def shown() -> dict[str, Any] | None:
        resp = authed.get("/api/tasks", params={"taskname": STEP_TASK, "limit": 1000})
        assert resp.status_code == 200, resp.text
        tasks: dict[str, Any] = resp.json()
        mine = {uuid: t for uuid, t in tasks.items() if uuid in expected}
        done = len(mine) == len(expected) and all(t["state"] == "SUCCESS" for t in mine.values())
        return mine if done else None

    tasks = until(shown, 60, f"flower shows the step tasks {sorted(expected)}", plat.logs)
    node = f"tiny-chat.{plat.procs['tiny-chat'].pid}@{socket.gethostname()}"
    for uuid, task in tasks.items():
        assert task["name"] == STEP_TASK, task
        assert task["worker"] == node, task
        row_id, attempt = uuid.rsplit("-", 1)
        assert task["args"] == f"['{row_id}', {attempt}]", task  # (step run id, attempt)
        assert task["received"] and task["started"] and task["succeeded"], task
    one = authed.get(f"/api/task/info/{next(iter(tasks))}")
    assert one.status_code == 200, one.text
    assert one.json()["name"] == STEP_TASK
