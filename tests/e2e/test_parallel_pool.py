"""A parallel pool end to end: `corral worker --parallel 4` runs four steps at once in one
process (one model copy, Celery's threads pool), and when that process is SIGKILLed with
four steps running, a fresh pool hands them all back (workers.inflight) and finishes them.

The platform runs on SQLite and Redis database 3 of the session's Redis.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import redis

from app.core.config import Settings, settings_env, use_settings
from tests.utils.databases import with_database
from tests.utils.platform import FAULTS, Platform, module_settings, spawn, start_platform

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

REDIS_DB = "3"
SLOTS = 4


@pytest.fixture
def parallel_settings(redis_base_url: str, tmp_path: Path) -> Iterator[Settings]:
    with use_settings(
        module_settings(tmp_path / "root", with_database(redis_base_url, REDIS_DB), [])
    ) as s:
        yield s


def start_pool(settings: Settings, log: Path) -> subprocess.Popen[bytes]:
    env = settings_env(settings)
    env.update(CORRAL_FAULT_INJECTION=FAULTS, CORRAL_WORKER_HEARTBEAT_S="1")
    args = ["worker", "--model", "tiny-chat", "--gpu", "none", "--parallel", str(SLOTS)]
    return spawn(args, env, log)


def pool_infos(settings: Settings) -> list[dict[str, Any]]:
    client = redis.Redis.from_url(settings.redis_url or "")
    try:
        raws = [client.get(k) for k in client.scan_iter("corral:worker:tiny-chat@*")]
    finally:
        client.close()
    return [json.loads(r) for r in raws if r]


def wait_for(what: str, check: Any, timeout_s: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        got = check()
        if got:
            return got
        assert time.monotonic() < deadline, f"no {what} after {timeout_s} s"
        time.sleep(0.05)


def long_step(n_tokens: int, i: int) -> dict[str, Any]:
    inp = {"prompt": f"Story {i}", "max_tokens": n_tokens, "ignore_eos": True, "temperature": 0}
    step = {"id": "a", "kind": "generate", "model": "tiny-chat", "input": inp}
    return {"name": f"parallel-{i}", "steps": [step]}


@pytest.fixture
def platform(parallel_settings: Settings, tmp_path: Path) -> Iterator[Platform]:
    plat = start_platform(
        parallel_settings,
        tmp_path,
        workers={"tiny-chat": 1},
        extra_env={"CORRAL_WORKER_PARALLEL": str(SLOTS)},
    )
    try:
        yield plat
    finally:
        plat.stop()


def submit_all(plat: Platform, n_tokens: int) -> list[str]:
    ids = []
    for i in range(SLOTS):
        resp = plat.submit(long_step(n_tokens, i))
        assert resp.status_code == 202, resp.text
        ids.append(resp.json()["id"])
    return ids


def test_four_steps_run_at_once_in_one_process(
    platform: Platform, parallel_settings: Settings
) -> None:
    (info,) = pool_infos(parallel_settings)
    assert info["parallel"] == SLOTS and info["active"] == 0 and not info["busy"]
    ids = submit_all(platform, 400)
    runs = [platform.wait(wid, timeout_s=120) for wid in ids]
    steps = [run["steps"][0] for run in runs]
    assert all(s["status"] == "succeeded" for s in steps), (steps, platform.logs())
    assert len({s["output"]["pool"] for s in steps}) == 1  # one process ran all four
    started = [datetime.fromisoformat(s["started_at"]) for s in steps]
    finished = [datetime.fromisoformat(s["finished_at"]) for s in steps]
    # Every step started before any finished: the four ran at the same time.
    assert max(started) < min(finished), (started, finished)
    assert all(s["output"]["completion_tokens"] == 400 for s in steps)


def test_a_killed_parallel_pool_hands_all_its_steps_back(
    platform: Platform, parallel_settings: Settings, tmp_path: Path
) -> None:
    ids = submit_all(platform, 3000)

    def all_running() -> bool:
        runs = [platform.client.get(f"/v1/workflows/{wid}").json() for wid in ids]
        return all(r["steps"][0]["status"] == "running" for r in runs)

    wait_for("four running steps", all_running)

    def all_active() -> dict[str, Any] | None:  # as the next heartbeat tells it
        (info,) = pool_infos(parallel_settings)
        return info if info["active"] == SLOTS and info["busy"] else None

    info = wait_for("four active steps in the heartbeat", all_active)
    # The one process holding the model and all four steps, mid-generation.
    os.kill(info["pid"], signal.SIGKILL)
    platform.procs["tiny-chat"].wait(10)
    platform.procs["fresh"] = start_pool(parallel_settings, tmp_path / "worker-fresh.log")
    for wid in ids:
        run = platform.wait(wid, timeout_s=180)
        (step,) = run["steps"]
        assert run["status"] == "succeeded", (run, platform.logs())
        # The same attempt, finished by the fresh pool: the message came back.
        assert step["attempts"] == 1
        assert step["output"]["completion_tokens"] == 3000
        assert step["output"]["pool"] != info["worker"]
    # The fresh pool handed the dead one's messages back (not kombu's visibility timeout,
    # an hour away).
    assert "died running" in (tmp_path / "worker-fresh.log").read_text()
