"""Horizontal scaling: more `corral worker` pools for one model share its queue.

Two pools for tiny-chat run as separate `corral worker` processes on two declared hosts
(``CORRAL_HOST=host-a`` and ``host-b``), each its own Celery node
(``tiny-chat.<pid>@<host>``), announcing its host in its heartbeat. 40 one-step
workflows go to the queue; a third pool starts mid-run and takes
work; one of the first two is stopped with SIGTERM (Celery's warm shutdown) while it runs
a step, which it finishes before it exits. Every workflow succeeds and every step's
result is stored once.

Which pool ran each step is read from each pool's own log: Celery logs every task it
receives and its outcome, and a step's task id is ``<step run id>-<attempt>``
(app/workflows/dispatch.py); ``'succeeded'`` is what the task returns when its result
was stored (workers/steps.py). The heartbeats in Redis (``steps_done`` of each live
pool process) must agree with the logs.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import redis
from sqlmodel import col, select

from app.core.config import Settings, settings_env, use_settings
from app.scheduler import live
from app.store import db
from app.store.tables import StepRun, StepStatus
from app.workflows.names import STEP_TASK, queue_for
from tests.utils.databases import with_database
from tests.utils.platform import Platform, module_settings, spawn, start_platform
from tests.utils.waiting import until as wait_until
from tests.utils.workflows import gen

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

REDIS_DB = "8"
MODEL = "tiny-chat"
WORKFLOWS = 40
# tiny-chat never stops before max_tokens: 2048 tokens take about a third of a second on
# one core, long enough to stop a pool while it runs one, short enough for 40 of them.
TOKENS = 2048
POOL_ENV = {"CORRAL_WORKER_HEARTBEAT_S": "1", "CORRAL_LOG_LEVEL": "INFO"}

_TASK = re.escape(STEP_TASK)
RECEIVED = re.compile(rf"Task {_TASK}\[(\S+)\] received")
FINISHED = re.compile(
    rf"^(\S+ \S+) \w+ celery\.app\.trace: Task {_TASK}\[(\S+)\] (?:succeeded in \S+: '(\w+)'|.*)",
    re.MULTILINE,
)


@dataclass
class Pool:
    """One `corral worker --model tiny-chat` process and its log."""

    name: str
    proc: subprocess.Popen[bytes]
    log: Path

    @property
    def node(self) -> str:
        """Its Celery node name, up to the host: ``tiny-chat.<pid of corral worker>``."""
        return f"{MODEL}.{self.proc.pid}"

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def received(self) -> list[str]:
        return RECEIVED.findall(self.text())

    def finished(self) -> dict[str, tuple[datetime, str]]:
        """{task id: (when its end was logged, the task's return value or '' if it raised)}."""
        out = {}
        for stamp, task_id, result in FINISHED.findall(self.text()):
            out[task_id] = (datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f"), result)
        return out

    def stored(self) -> list[str]:
        """Task ids whose result this pool stored (every line, duplicates kept)."""
        return [
            task_id for _, task_id, result in FINISHED.findall(self.text()) if result == "succeeded"
        ]

    def in_flight(self) -> set[str]:
        return set(self.received()) - set(self.finished())


def until(check: Callable[[], Any], timeout_s: float, what: str, logs: Callable[[], str]) -> Any:
    """Polled every 10 ms: catching a pool mid-step needs it."""
    return wait_until(check, timeout_s, what, logs, every_s=0.01)


def live_nodes() -> dict[str, dict[str, Any]]:
    """{node up to the host: heartbeat} of every live pool process of the model."""
    return {str(w["node"]).split("@")[0]: w for w in live.live_workers() if w.get("model") == MODEL}


@pytest.fixture(scope="module")
def plat(redis_base_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Platform]:
    root = tmp_path_factory.mktemp("scaling")
    settings = module_settings(root, with_database(redis_base_url, REDIS_DB), [])
    with use_settings(settings):
        (root / "logs").mkdir()
        env = {**POOL_ENV, "CORRAL_HOST": "host-a"}
        platform = start_platform(settings, root / "logs", {MODEL: 1}, extra_env=env)
        try:
            yield platform
        finally:
            platform.stop()


def start_pool(plat: Platform, name: str) -> Pool:
    """Another `corral worker` process for the model, as a second machine would run it:
    the same Redis and database, its own Celery node; stopped with the platform."""
    env = settings_env(plat.settings)
    env.pop("CORRAL_API_KEY", None)
    env.update(POOL_ENV, CORRAL_HOST=f"host-{name}")
    log = plat.log_dir / f"worker-{MODEL}-{name}.log"
    proc = spawn(["worker", "--model", MODEL, "--concurrency", "1"], env, log)
    plat.procs[f"{MODEL}-{name}"] = proc
    return Pool(name, proc, log)


def wait_live(plat: Platform, pool: Pool) -> None:
    def is_live() -> bool:
        assert pool.proc.poll() is None, f"pool {pool.name} exited\n{plat.logs()}"
        return pool.node in live_nodes()

    until(is_live, 90, f"pool {pool.name} ({pool.node}) is live", plat.logs)


def submit_batch(plat: Platform, first: int, count: int) -> list[str]:
    ids = []
    for i in range(first, first + count):
        step = gen("answer", prompt=f"request number {i}", max_tokens=TOKENS)
        resp = plat.submit({"name": f"scale-{i}", "steps": [step]})
        assert resp.status_code == 202, resp.text
        ids.append(resp.json()["id"])
    return ids


def task_ids(settings: Settings, workflow_ids: list[str]) -> list[str]:
    """The task id of each workflow's step's first attempt, in the order given."""
    with use_settings(settings), db.session_scope() as session:
        rows = session.exec(select(StepRun).where(col(StepRun.workflow_id).in_(workflow_ids))).all()
    by_workflow = {row.workflow_id: row.id for row in rows}
    return [f"{by_workflow[w]}-1" for w in workflow_ids]


def unfinished(settings: Settings, workflow_ids: list[str]) -> int:
    """How many of these workflows' steps have not ended yet."""
    with use_settings(settings), db.session_scope() as session:
        rows = session.exec(
            select(StepRun.status).where(col(StepRun.workflow_id).in_(workflow_ids))
        ).all()
    return sum(1 for status in rows if not StepStatus(status).terminal)


def test_pools_share_the_queue_scale_out_and_drain_on_sigterm(plat: Platform) -> None:
    settings = plat.settings
    a = Pool("a", plat.procs[MODEL], plat.log_dir / f"worker-{MODEL}.log")
    b = start_pool(plat, "b")
    wait_live(plat, a)
    wait_live(plat, b)
    assert a.node != b.node
    nodes = live_nodes()
    assert {nodes[p.node]["host"] for p in (a, b)} == {"host-a", "host-b"}
    assert {str(nodes[p.node]["node"]) for p in (a, b)} == {
        f"{a.node}@host-a",
        f"{b.node}@host-b",
    }
    broker = redis.Redis.from_url(settings.broker_url)
    try:
        # Half the work, on two pools.
        first = submit_batch(plat, 0, WORKFLOWS // 2)
        first_tasks = task_ids(settings, first)

        # A third pool joins mid-run: it starts while the first half is being worked off.
        c = start_pool(plat, "c")
        assert unfinished(settings, first), "the first half ended before pool c started"
        wait_live(plat, c)
        left_when_c_joined = unfinished(settings, first)
        # The second half is queued with three pools consuming.
        second = submit_batch(plat, WORKFLOWS // 2, WORKFLOWS // 2)
        second_tasks = task_ids(settings, second)

        # Pool a is stopped with SIGTERM while it runs a step of the second half.
        def a_busy() -> set[str]:
            return a.in_flight() & set(second_tasks)

        running = until(a_busy, 90, "pool a runs a step of the second half", plat.logs)
        stopped_at = datetime.now()
        a.proc.terminate()
        try:
            code = a.proc.wait(60)
        except subprocess.TimeoutExpired as exc:
            raise AssertionError(f"pool a did not stop within 60 s\n{plat.logs()}") from exc
        assert code == 0, (code, a.text()[-3000:])
        assert "Warm shutdown" in a.text(), a.text()[-3000:]
        # Its step ended after the SIGTERM, in pool a: the warm shutdown let it finish.
        (task,) = running
        finished = a.finished()
        assert task in finished, (task, a.text()[-3000:])
        ended_at, result = finished[task]
        assert result == "succeeded", (task, a.text()[-3000:])
        assert ended_at >= stopped_at.replace(microsecond=stopped_at.microsecond // 1000 * 1000)
        # A clean exit leaves the registry: only b and c are live pools now.
        until(
            lambda: set(live_nodes()) == {b.node, c.node},
            30,
            "pool a leaves the live-pool registry",
            plat.logs,
        )

        runs = [plat.wait(w, timeout_s=120) for w in first + second]
        assert [r["status"] for r in runs] == ["succeeded"] * WORKFLOWS, runs

        # Which pool stored each result, from the pools' own logs (a task's end is logged
        # once it returns, just after the result it stored ended the workflow).
        def all_logged() -> dict[str, list[str]] | None:
            by_pool = {p.name: p.stored() for p in (a, b, c)}
            return by_pool if sum(map(len, by_pool.values())) >= WORKFLOWS else None

        stored = until(all_logged, 30, "every stored result is in a pool's log", plat.logs)
        every = [t for tasks in stored.values() for t in tasks]
        assert sorted(every) == sorted(first_tasks + second_tasks), stored  # each once
        assert set(stored["a"]) & set(first_tasks), stored
        assert set(stored["b"]) & set(first_tasks), stored
        # The pool that joined mid-run took work (the message says how many steps of the
        # first half had not ended yet when it went live).
        assert set(stored["c"]), (left_when_c_joined, stored)
        for p in (a, b, c):  # no task was delivered to two pools, nor twice to one
            assert len(p.received()) == len(set(p.received())), p.text()[-3000:]
        received = [t for p in (a, b, c) for t in p.received()]
        assert len(received) == len(set(received)) == WORKFLOWS, received

        # The heartbeats of the live pools count what their logs show.
        def heartbeats_agree() -> bool:
            nodes = live_nodes()
            return all(
                nodes.get(p.node, {}).get("steps_done") == len(stored[p.name]) for p in (b, c)
            )

        until(heartbeats_agree, 30, f"heartbeats count {stored}", plat.logs)

        # The database: each step ran one attempt, and its result was stored.
        with use_settings(settings), db.session_scope() as session:
            rows = session.exec(
                select(StepRun).where(col(StepRun.workflow_id).in_(first + second))
            ).all()
        assert len(rows) == WORKFLOWS
        for row in rows:
            assert row.status == StepStatus.succeeded, row
            assert row.attempts == 1, row
            assert row.output is not None and row.output["completion_tokens"] == TOKENS, row
        assert broker.llen(queue_for(MODEL)) == 0
    finally:
        broker.close()
