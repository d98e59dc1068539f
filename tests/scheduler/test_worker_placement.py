"""`corral worker` processes placed by the scheduler on declared GPUs (real Redis, real pools).

Each test has its own redis-server, API and workers. Declared GPUs of 1 GiB with a
600 MiB per-pool overhead make room for exactly one tiny pool per GPU.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from app.core.config import Settings, settings_env
from app.core.embedded import EmbeddedRedis, free_port
from app.store import db, keys
from models.catalog import load_catalog
from tests.utils.platform import spawn
from tests.utils.waiting import until

pytestmark = pytest.mark.e2e


def make_catalog(path: Path) -> Path:
    """The shipped catalog plus a high-priority alias of tiny-chat."""
    data = yaml.safe_load(load_catalog().path.read_text())  # type: ignore[union-attr]
    entries = data["models"] if isinstance(data, dict) else data
    vip = next(e for e in entries if e["name"] == "tiny-chat").copy()
    vip.update(name="tiny-chat-vip", priority=10, description="high-priority tiny-chat")
    entries.append(vip)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@dataclass
class Cluster:
    """A private Redis, an API, and the worker processes a test starts."""

    tmp: Path
    env: dict[str, str]
    client: httpx.Client
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def worker(self, *args: str, name: str, **env: str) -> subprocess.Popen[bytes]:
        proc = spawn(["worker", *args], {**self.env, **env}, self.tmp / f"{name}.log")
        self.procs.append(proc)
        return proc

    def run_cli(self, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "app.cli.main", *args],
            env={**self.env, **env},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    def pools(self) -> dict[str, list[dict[str, Any]]]:
        return {p["model"]: p["workers"] for p in self.client.get("/v1/pools").json()["pools"]}

    def gpus(self) -> dict[str, Any]:
        data: dict[str, Any] = self.client.get("/v1/gpus").json()
        return data

    def log(self, name: str) -> str:
        return (self.tmp / f"{name}.log").read_text(errors="replace")


def kill_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL a worker and its pool processes (it runs in its own session)."""
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


@pytest.fixture
def cluster(settings: Settings, tmp_path: Path) -> Iterator[Cluster]:
    redis_server = EmbeddedRedis(tmp_path / "redis", persist=False).start()
    isolated = settings.model_copy(
        update={
            "redis_url": redis_server.url,
            "catalog_path": make_catalog(tmp_path / "catalog.yaml"),
        }
    )
    env = settings_env(isolated)
    env.update(
        CORRAL_GPUS="0:1GiB,1:1GiB",
        CORRAL_GPU_OVERHEAD_BYTES=str(600 * 2**20),
        CORRAL_GPU_HEADROOM_BYTES="0",
        CORRAL_LEASE_TTL_S="2",
        CORRAL_PLACEMENT_POLL_S="0.3",
        CORRAL_WORKER_HEARTBEAT_S="1",
    )
    port = free_port()
    api = spawn(["api", "--port", str(port)], env, tmp_path / "api.log")
    with db.session_scope(write=True) as session:
        _row, key = keys.create_key(session, "scheduler-test")
    client = httpx.Client(
        base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {key}"}, timeout=30
    )

    def api_up() -> bool:
        try:
            return client.get("/healthz").status_code == 200
        except httpx.HTTPError:
            return False

    until(api_up, what="the API")
    c = Cluster(tmp_path, env, client, [api])
    try:
        yield c
    finally:
        for p in c.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in c.procs:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                kill_group(p)
        client.close()
        redis_server.stop()


# A step that runs until it is cancelled: its pool stays busy.
LONG_STEP = {
    "name": "busy",
    "steps": [
        {
            "id": "long",
            "kind": "generate",
            "model": "tiny-chat",
            "input": {"prompt": "Go", "max_tokens": 8000, "ignore_eos": True},
        }
    ],
}


def workers_on(c: Cluster, model: str) -> list[dict[str, Any]]:
    return c.pools().get(model, [])


def test_pools_are_placed_pinned_and_pending_is_visible(cluster: Cluster) -> None:
    c = cluster
    a = c.worker("--model", "tiny-chat", name="a")
    until(lambda: len(workers_on(c, "tiny-chat")) == 1, what="worker a")
    b = c.worker("--model", "tiny-chat", name="b")
    until(lambda: len(workers_on(c, "tiny-chat")) == 2, what="worker b")
    pinned = sorted(w["gpus"] for w in workers_on(c, "tiny-chat"))
    assert pinned == ["0", "1"]  # CUDA_VISIBLE_DEVICES in each pool process
    view = c.gpus()
    assert [len(g["reservations"]) for g in view["gpus"]] == [1, 1]
    for g in view["gpus"]:
        (r,) = g["reservations"]
        assert r["model"] == "tiny-chat"
        assert r["loaded"] is True
        assert g["free_bytes"] == g["total_bytes"] - r["bytes"]
        assert r["bytes"] > 600 * 2**20

    no_wait = c.run_cli("worker", "--model", "tiny-chat", "--no-wait")
    assert no_wait.returncode == 3, no_wait.stderr
    assert "no room now" in no_wait.stderr

    d = c.worker("--model", "tiny-chat", name="d")
    pending = until(lambda: c.gpus()["pending"], what="a pending placement")
    assert pending[0]["model"] == "tiny-chat"
    assert "free now" in pending[0]["reason"]
    gpus_cli = c.run_cli("gpus")
    assert gpus_cli.returncode == 0
    assert "waiting for room" in gpus_cli.stdout

    kill_group(a)  # SIGKILL: no clean release; the lease must expire by itself
    until(lambda: "GPU 0" in c.log("d") or len(workers_on(c, "tiny-chat")) >= 2, 20, "d placed")
    until(lambda: not c.gpus()["pending"], 20, "pending cleared")
    until(lambda: sorted(w["gpus"] for w in workers_on(c, "tiny-chat")) == ["0", "1"], 20, "d on 0")
    assert d.poll() is None
    assert b.poll() is None

    spec = {
        "name": "on-gpu-pools",
        "steps": [
            {
                "id": "s",
                "kind": "generate",
                "model": "tiny-chat",
                "input": {"prompt": "Hi", "max_tokens": 4},
            }
        ],
    }
    wid = c.client.post("/v1/workflows", json=spec).json()["id"]
    run = until(
        lambda: (r := c.client.get(f"/v1/workflows/{wid}").json())["status"] != "running" and r
    )
    assert run["status"] == "succeeded"


def test_too_big_for_the_host_is_refused(cluster: Cluster) -> None:
    out = cluster.run_cli("worker", "--model", "tiny-chat", CORRAL_GPUS="0:100MiB,1:200MiB")
    assert out.returncode == 2
    assert "no GPU of this host can ever hold it" in out.stderr
    assert "GPU" in out.stderr and "bytes" in out.stderr


def test_priority_evicts_idle_pools_but_never_busy_ones(cluster: Cluster) -> None:
    c = cluster
    one_gpu = {"CORRAL_GPUS": "0:1GiB"}
    low = c.worker("--model", "tiny-chat", name="low", **one_gpu)
    until(lambda: len(workers_on(c, "tiny-chat")) == 1, what="low pool")
    wid = c.client.post("/v1/workflows", json=LONG_STEP).json()["id"]
    until(
        lambda: c.client.get(f"/v1/workflows/{wid}").json()["steps"][0]["status"] == "running",
        what="the long step",
    )
    busy = c.run_cli("worker", "--model", "tiny-chat-vip", "--no-wait", **one_gpu)
    assert busy.returncode == 3, busy.stderr
    assert low.poll() is None  # a pool running a step is never evicted
    assert c.client.post(f"/v1/workflows/{wid}/cancel").status_code == 200
    time.sleep(0.5)
    vip = c.worker("--model", "tiny-chat-vip", name="vip", **one_gpu)
    until(lambda: low.poll() is not None, 30, "the idle low-priority pool to leave")
    until(lambda: len(workers_on(c, "tiny-chat-vip")) == 1, 30, "the vip pool")
    assert "evicted" in c.log("low")
    (r,) = c.gpus()["gpus"][0]["reservations"]
    assert r["model"] == "tiny-chat-vip"
    assert r["priority"] == 10
    assert vip.poll() is None


def test_admission_waiting_for_pool_and_served_context(cluster: Cluster) -> None:
    c = cluster
    spec = {
        "name": "early",
        "steps": [
            {
                "id": "s",
                "kind": "generate",
                "model": "tiny-chat",
                "input": {"prompt": "Hi", "max_tokens": 4},
            }
        ],
    }
    wid = c.client.post("/v1/workflows", json=spec).json()["id"]
    until(
        lambda: (
            c.client.get(f"/v1/workflows/{wid}").json()["steps"][0]["status"] == "waiting_for_pool"
        ),
        what="waiting_for_pool",
    )
    c.worker("--model", "tiny-chat", "--gpu", "none", "--ctx", "256", name="small-ctx")
    run = until(
        lambda: (r := c.client.get(f"/v1/workflows/{wid}").json())["status"] != "running" and r
    )
    assert run["status"] == "succeeded"
    long = {
        "name": "long",
        "steps": [
            {
                "id": "s",
                "kind": "generate",
                "model": "tiny-chat",
                "input": {"prompt": "Hi", "max_tokens": 300},
            }
        ],
    }
    refused = c.client.post("/v1/workflows", json=long)
    assert refused.status_code == 422
    (detail,) = refused.json()["detail"]
    assert detail["loc"] == ["steps", 0, "input", "max_tokens"]
    assert "256 tokens (the most any of its live pools serves)" in detail["msg"]


def test_governance_unload_idle_releases_idle_pools_never_busy_ones(
    cluster: Cluster, settings: Settings
) -> None:
    """Governance's ``unload_idle`` action asks every GPU pool to release: the idle one
    gives its GPU back and exits, the one running a step refuses and keeps running."""
    from app.core.config import use_settings
    from app.governance.actions import _unload_idle
    from app.governance.metrics import gather

    c = cluster
    idle = c.worker("--model", "tiny-chat", "--gpu", "0", name="idle")
    busy = c.worker("--model", "tiny-chat", "--gpu", "1", name="busy")
    until(lambda: len(workers_on(c, "tiny-chat")) == 2, what="two pools")
    wid = c.client.post("/v1/workflows", json=LONG_STEP).json()["id"]
    until(
        lambda: c.client.get(f"/v1/workflows/{wid}").json()["steps"][0]["status"] == "running",
        what="the long step",
    )
    here = settings.model_copy(update={"redis_url": c.env["CORRAL_REDIS_URL"]})
    with use_settings(here):
        before = {s.labels["gpu"]: s.value for s in gather().samples("gpu_reserved_bytes")}
        done = _unload_idle(None, 0.0, "test-rule")
    assert len(done["released"]) == 1 and len(done["refused"]) == 1, done
    until(lambda: (idle.poll() is not None) != (busy.poll() is not None), 30, "one pool to exit")
    gone, kept = (idle, busy) if idle.poll() is not None else (busy, idle)
    assert kept.poll() is None  # the busy pool keeps running its step
    reservations = [r for g in c.gpus()["gpus"] for r in g["reservations"]]
    assert len(reservations) == 1  # the released GPU is free again
    # Governance's snapshot reads the same ledger: both GPUs were reserved, one is now free.
    assert len(before) == 2 and all(v > 0 for v in before.values())
    with use_settings(here):
        after = {s.labels["gpu"]: s.value for s in gather().samples("gpu_reserved_bytes")}
        totals = {s.labels["gpu"]: s.value for s in gather().samples("gpu_total_bytes")}
    assert sorted(after.values())[0] == 0 and sorted(after.values())[1] == max(before.values())
    assert set(totals.values()) == {2**30}
    assert gone.returncode == 0
    assert c.client.post(f"/v1/workflows/{wid}/cancel").status_code == 200
