"""Nothing is lost when a worker process dies or Redis restarts mid-workflow.

Each test runs its own platform on a private redis-server (so killing and restarting
things never touches the shared services or the session's platform).
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from app.core.config import Settings
from app.core.embedded import EmbeddedRedis
from tests.utils.platform import Platform, start_platform

pytestmark = pytest.mark.e2e


def long_chain(n_tokens: int) -> dict[str, Any]:
    def gen(step_id: str, prompt: str, **kw: Any) -> dict[str, Any]:
        inp = {"prompt": prompt, "max_tokens": 8, "temperature": 0}
        inp.update(kw.pop("input", {}))
        return {"id": step_id, "kind": "generate", "model": "tiny-chat", "input": inp, **kw}

    return {
        "name": "resilience",
        "steps": [
            gen("a", "Start", input={"max_tokens": n_tokens, "ignore_eos": True}),
            gen("b", "{{ steps.a.output.text[:50] }}", depends_on=["a"]),
            gen("c", "{{ steps.b.output.text }}", depends_on=["b"]),
        ],
    }


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[EmbeddedRedis]:
    server = EmbeddedRedis(tmp_path / "redis", persist=True).start()
    yield server
    server.stop()


def _isolated(settings: Settings, server: EmbeddedRedis) -> Settings:
    return settings.model_copy(update={"redis_url": server.url})


def _wait_step(plat: Platform, wid: str, step: str, status: str, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        run = plat.client.get(f"/v1/workflows/{wid}").json()
        if {s["id"]: s for s in run["steps"]}[step]["status"] == status:
            return
        assert time.monotonic() < deadline, run
        time.sleep(0.02)


def test_worker_process_killed_mid_step(
    settings: Settings, private_redis: EmbeddedRedis, tmp_path: Path
) -> None:
    plat = start_platform(_isolated(settings, private_redis), tmp_path, workers={"tiny-chat": 1})
    try:
        resp = plat.submit(long_chain(2000))
        wid = resp.json()["id"]
        _wait_step(plat, wid, "a", "running")
        client = redis.Redis.from_url(private_redis.url)
        (raw,) = [client.get(k) for k in client.scan_iter("corral:worker:*")]
        client.close()
        assert raw is not None
        child = json.loads(raw)["pid"]
        os.kill(child, signal.SIGKILL)  # the pool process holding the model, mid-generation
        run = plat.wait(wid, timeout_s=90)
        assert run["status"] == "succeeded", (run, plat.logs())
        steps = {s["id"]: s for s in run["steps"]}
        # The task came back (acks_late + reject_on_worker_lost) and the same attempt
        # was finished by the replacement process: one result, recorded once.
        assert steps["a"]["attempts"] == 1
        assert steps["a"]["output"]["completion_tokens"] == 2000
        assert all(s["status"] == "succeeded" for s in steps.values())
    finally:
        plat.stop()


def test_redis_restart_loses_nothing(
    settings: Settings, private_redis: EmbeddedRedis, tmp_path: Path
) -> None:
    plat = start_platform(
        _isolated(settings, private_redis),
        tmp_path,
        workers={"tiny-chat": 1},
        beat=True,
        extra_env={"CORRAL_RECONCILE_S": "1", "CORRAL_RECONCILE_AFTER_S": "2"},
    )
    try:
        first = plat.submit(long_chain(2500)).json()["id"]
        _wait_step(plat, first, "a", "running")
        private_redis.stop()
        # Submitted while Redis is down: accepted (the database has it), sent later.
        during = plat.submit(long_chain(16))
        assert during.status_code == 202, during.text
        time.sleep(1.0)
        private_redis.start()
        for wid in (first, during.json()["id"]):
            run = plat.wait(wid, timeout_s=120)
            assert run["status"] == "succeeded", (run, plat.logs())
            assert all(s["attempts"] == 1 for s in run["steps"])
    finally:
        plat.stop()
