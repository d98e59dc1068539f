"""`corral agent` on declared GPUs: pools started on demand, unloaded when idle, evicted for
higher priorities, moved by fragmentation cleanup (real Redis, API, agents and pools).

Each test has its own redis-server and API. GPUs are declared 100 MiB each with no
per-pool overhead or headroom; the catalog's tiny aliases declare contexts that make their
reservations big: ``tiny-a``/``tiny-b``/``tiny-quick`` 43 MiB (n_ctx 4096), ``tiny-big``,
``tiny-vip`` and ``tiny-c`` 85 MiB (8192), ``tiny-huge`` 169 MiB (16384, never fits).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from app.core.config import Settings, settings_env
from app.core.embedded import EmbeddedRedis, free_port
from app.store import db, keys
from models.catalog import load_catalog
from tests.scheduler.test_worker_placement import Cluster, kill_group
from tests.utils.platform import spawn
from tests.utils.waiting import until

pytestmark = pytest.mark.e2e

MiB = 2**20


def make_catalog(path: Path) -> Path:
    """The shipped catalog plus tiny-chat aliases whose contexts make big reservations."""
    data = yaml.safe_load(load_catalog().path.read_text())  # type: ignore[union-attr]
    entries = data["models"] if isinstance(data, dict) else data
    base = next(e for e in entries if e["name"] == "tiny-chat")
    aliases = {
        "tiny-a": {"n_ctx": 4096, "keep_alive": -1},
        "tiny-b": {"n_ctx": 4096, "keep_alive": -1},
        "tiny-big": {"n_ctx": 8192, "keep_alive": -1},
        "tiny-vip": {"n_ctx": 8192, "priority": 10, "keep_alive": -1},
        "tiny-huge": {"n_ctx": 16384, "context_length": 16384},
        "tiny-quick": {"n_ctx": 4096, "keep_alive": 1},
        "tiny-c": {"n_ctx": 8192},  # the agent's CORRAL_KEEP_ALIVE_S
    }
    for name, extra in aliases.items():
        entries.append({**base, "name": name, "description": f"tiny-chat as {name}", **extra})
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


class Agents(Cluster):
    """A cluster whose pools only agents start."""

    def agent(self, host: str, gpus: str = "0:100MiB", **env: str) -> subprocess.Popen[bytes]:
        data = self.tmp / f"agent-{host}"
        data.mkdir(exist_ok=True)
        extra = {"CORRAL_HOST": host, "CORRAL_GPUS": gpus, "CORRAL_DATA_DIR": str(data), **env}
        proc = spawn(["agent"], {**self.env, **extra}, self.tmp / f"agent-{host}.log")
        self.procs.append(proc)
        until(
            lambda: host in self.agent_hosts(),
            30,
            f"agent {host}",
            lambda: self.log(f"agent-{host}"),
        )
        return proc

    def agent_hosts(self) -> list[str]:
        return [a["host"] for a in self.client.get("/v1/pools").json()["agents"]]

    def submit(self, model: str, max_tokens: int = 4, **extra: Any) -> str:
        spec = {
            "name": f"on-{model}",
            "steps": [
                {
                    "id": "s",
                    "kind": "generate",
                    "model": model,
                    "input": {"prompt": "Hi", "max_tokens": max_tokens, **extra},
                }
            ],
        }
        resp = self.client.post("/v1/workflows", json=spec)
        assert resp.status_code == 202, resp.text
        return str(resp.json()["id"])

    def step(self, wid: str) -> dict[str, Any]:
        data: dict[str, Any] = self.client.get(f"/v1/workflows/{wid}").json()["steps"][0]
        return data

    def finished(self, wid: str, timeout_s: float = 60.0) -> dict[str, Any]:
        run: dict[str, Any] = until(
            lambda: (
                (r := self.client.get(f"/v1/workflows/{wid}").json())["status"]
                not in ("pending", "running")
                and r
            ),
            timeout_s,
            f"workflow {wid}",
            lambda: "\n".join(self.log(p.stem) for p in sorted(self.tmp.glob("agent-*.log"))),
        )
        return run

    def view(self) -> dict[str, Any]:
        data: dict[str, Any] = self.client.get("/v1/pools").json()
        return data

    def workers(self, model: str) -> list[dict[str, Any]]:
        return next((p["workers"] for p in self.view()["pools"] if p["model"] == model), [])

    def events(self, action: str | None = None, model: str | None = None) -> list[dict[str, Any]]:
        return [
            e
            for e in self.view()["events"]
            if (action is None or e["action"] == action) and (model is None or e["model"] == model)
        ]

    def reservations(self) -> list[dict[str, Any]]:
        return [r for g in self.gpus()["gpus"] for r in g["reservations"]]


@pytest.fixture
def agents(settings: Settings, tmp_path: Path) -> Iterator[Agents]:
    redis_server = EmbeddedRedis(tmp_path / "redis", persist=False).start()
    isolated = settings.model_copy(
        update={
            "redis_url": redis_server.url,
            "catalog_path": make_catalog(tmp_path / "catalog.yaml"),
        }
    )
    env = settings_env(isolated)
    env.update(
        CORRAL_MODELS_DIR=str(settings.models_path),
        CORRAL_GPU_OVERHEAD_BYTES="0",
        CORRAL_GPU_HEADROOM_BYTES="0",
        CORRAL_LEASE_TTL_S="2",
        CORRAL_PLACEMENT_POLL_S="0.3",
        CORRAL_WORKER_HEARTBEAT_S="1",
        CORRAL_AGENT_POLL_S="0.2",
        CORRAL_KEEP_ALIVE_S="-1",
    )
    port = free_port()
    api = spawn(["api", "--port", str(port)], env, tmp_path / "api.log")
    with db.session_scope(write=True) as session:
        _row, key = keys.create_key(session, "agent-test")
    client = httpx.Client(
        base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {key}"}, timeout=30
    )

    def api_up() -> bool:
        try:
            return client.get("/healthz").status_code == 200
        except httpx.HTTPError:
            return False

    until(api_up, what="the API")
    c = Agents(tmp_path, env, client, [api])
    try:
        yield c
    finally:
        for p in c.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in c.procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                kill_group(p)
        client.close()
        redis_server.stop()


def metric(text: str, name: str, model: str) -> float | None:
    found = re.search(rf'^{name}\{{model="{re.escape(model)}"\}} (\S+)$', text, re.M)
    return float(found.group(1)) if found else None


def test_a_waiting_step_starts_a_pool_that_unloads_when_idle_but_never_while_busy(
    agents: Agents,
) -> None:
    c = agents
    c.agent("h1", gpus="0:100MiB,1:100MiB", CORRAL_KEEP_ALIVE_S="2")
    assert c.workers("tiny-a") == []
    wid = c.submit("tiny-a")
    seen: list[str] = []

    def served() -> bool:
        pool = next((p for p in c.view()["pools"] if p["model"] == "tiny-a"), None)
        if pool:
            seen.extend(s["state"] for s in pool["starting"])
            seen.extend(w["state"] for w in pool["workers"])
        return c.step(wid)["status"] == "succeeded"

    until(served, 60, "the step, served by a pool nobody started by hand", every_s=0.05)
    assert seen and seen[0] in ("starting", "loading"), seen
    (worker,) = until(lambda: c.workers("tiny-a"), what="the pool's heartbeat")
    assert worker["agent"] == "h1" and worker["host"] == "h1"
    (lease,) = c.reservations()
    assert lease["model"] == "tiny-a" and lease["bytes"] > 40 * MiB
    until(lambda: c.events("load", "tiny-a"), 10, "the agent to see the pool serve")
    assert [e["action"] for e in c.events(model="tiny-a")][::-1][:2] == ["start", "load"]

    # Idle past its keep-alive (tiny-a's catalog entry says never): it stays.
    quick = c.submit("tiny-quick")  # catalog keep_alive: 1 s
    c.finished(quick)
    until(lambda: c.events("unload", "tiny-quick"), 30, "tiny-quick's keep-alive unload")
    until(lambda: not c.workers("tiny-quick"), 30, "tiny-quick's pool to exit")
    assert [r["model"] for r in c.reservations()] == ["tiny-a"]
    assert c.workers("tiny-a")  # keep_alive -1: never unloaded

    # A pool running a step is never unloaded, however long past its keep-alive.
    long = c.submit("tiny-c", max_tokens=8000, ignore_eos=True)
    until(lambda: c.step(long)["status"] == "running", 60, "the long step")
    time.sleep(4)  # twice the agent's keep-alive (2 s)
    (busy,) = c.workers("tiny-c")
    assert c.step(long)["status"] == "running"
    assert busy["state"] == "ready"
    assert not c.events("unload", "tiny-c")
    assert c.client.post(f"/v1/workflows/{long}/cancel").status_code == 200
    until(lambda: c.events("unload", "tiny-c"), 30, "the unload once idle")
    until(lambda: not c.workers("tiny-c"), 30, "tiny-c's pool to exit")

    text = httpx.get(f"{c.client.base_url}/metrics").text
    assert metric(text, "corral_pool_loads_total", "tiny-a") == 1
    assert metric(text, "corral_pool_unloads_total", "tiny-quick") == 1
    assert metric(text, "corral_pool_unloads_total", "tiny-c") == 1
    assert metric(text, "corral_pool_cold_start_seconds_count", "tiny-a") == 1
    cold = metric(text, "corral_pool_cold_start_seconds_sum", "tiny-a")
    assert cold is not None and 0 < cold < 60

    status = c.run_cli("status")
    assert status.returncode == 0, status.stderr
    assert re.search(r"tiny-a .*idle \d+ s", status.stdout), status.stdout


def test_priority_evicts_the_idle_lower_pool_never_a_busy_one_and_says_why_it_waits(
    agents: Agents,
) -> None:
    c = agents
    c.agent("h1")  # one GPU of 100 MiB: tiny-a (43 MiB) and tiny-vip (85 MiB) cannot share it
    long = c.submit("tiny-a", max_tokens=4000, ignore_eos=True)
    until(lambda: c.step(long)["status"] == "running", 60, "tiny-a's long step")
    vip = c.submit("tiny-vip")
    reason = until(
        lambda: "never evicted" in (r := c.step(vip)["waiting_reason"] or "") and r,
        60,
        "the vip step's reason",
        lambda: f"{c.step(vip)}\n{c.step(long)}\n{c.view()}\n{c.log('agent-h1')}",
    )
    assert "needs 85.04 MiB" in reason and "largest room GPU h1:0 56.96 MiB" in reason, reason
    pool = next(p for p in c.view()["pools"] if p["model"] == "tiny-vip")
    (why,) = pool["waiting"]
    assert why["need_bytes"] > why["largest_room_bytes"] > 0
    assert not c.events("evict")  # busy: never evicted
    assert c.client.post(f"/v1/workflows/{long}/cancel").status_code == 200
    assert c.finished(vip)["status"] == "succeeded"
    (evicted,) = c.events("evict")
    assert evicted["model"] == "tiny-a" and "tiny-vip" in evicted["reason"]
    assert [r["model"] for r in c.reservations()] == ["tiny-vip"]
    assert c.step(vip)["waiting_reason"] is None

    huge = c.submit("tiny-huge")
    reason = until(lambda: c.step(huge)["waiting_reason"], 30, "the huge step's reason")
    assert "no GPU here can ever hold it" in reason and "bytes" in reason, reason


def test_fragmentation_cleanup_moves_an_idle_pool_and_the_waiting_model_loads(
    agents: Agents,
) -> None:
    c = agents
    c.agent("h1", gpus="0:100MiB,1:100MiB", CORRAL_PLACEMENT_POLICY="spread")
    for model in ("tiny-a", "tiny-b"):
        assert c.finished(c.submit(model))["status"] == "succeeded"
    by_gpu = {r["gpu"]: r["model"] for r in c.reservations()}
    assert sorted(by_gpu) == [0, 1]  # spread: one 43 MiB pool per GPU, 57 MiB free on each
    big = c.submit("tiny-big")  # 85 MiB: fits the host's 114 MiB free, on no single GPU
    until(lambda: c.step(big)["waiting_reason"], 30, "tiny-big waiting")
    beat = spawn(["beat"], {**c.env, "CORRAL_CLEANUP_S": "1"}, c.tmp / "beat.log")
    c.procs.append(beat)
    assert c.finished(big, 90)["status"] == "succeeded"
    (move,) = c.events("move")
    assert move["for"] == "tiny-big" and move["from_gpu"] != move["to_gpu"]
    final = {}
    for r in c.reservations():
        final.setdefault(r["gpu"], []).append(r["model"])
    assert sorted(map(sorted, final.values())) == [["tiny-a", "tiny-b"], ["tiny-big"]]
    log = c.gpus()["fragmentation"]
    assert log is not None
    from app.core.config import use_settings
    from app.scheduler import fragmentation

    here = c.env["CORRAL_REDIS_URL"]
    with use_settings(Settings(redis_url=here)):
        actions = [h for h in fragmentation.history() if h.get("action") == "move"]
    assert actions and actions[0]["for"] == "tiny-big"


def test_two_agents_start_one_pool_between_them(agents: Agents) -> None:
    c = agents
    c.agent("h1")
    c.agent("h2")
    wids = [c.submit("tiny-chat") for _ in range(3)]
    for wid in wids:
        assert c.finished(wid)["status"] == "succeeded"
    starts = c.events("start", "tiny-chat")
    assert len(starts) == 1, starts
    (lease,) = c.reservations()
    assert lease["host"] == starts[0]["host"]


def test_sigkill_of_an_agent_leaves_no_reservation_once_the_lease_expires(agents: Agents) -> None:
    c = agents
    agent = c.agent("h1")
    assert c.finished(c.submit("tiny-a"))["status"] == "succeeded"
    (lease,) = c.reservations()
    pool_pid = int(c.workers("tiny-a")[0]["pid"])
    os.kill(agent.pid, signal.SIGKILL)
    agent.wait()
    until(lambda: not c.reservations(), 30, "the pool's lease to go")
    until(lambda: not c.agent_hosts(), 30, "the agent's record to expire")

    def gone() -> bool:
        try:
            os.kill(pool_pid, 0)
        except ProcessLookupError:
            return True
        return False

    until(gone, 30, "the pool process to exit with its agent")
    assert lease["model"] == "tiny-a"


def test_agent_refuses_an_unknown_model(agents: Agents) -> None:
    out = agents.run_cli("agent", "--model", "nope")
    assert out.returncode == 2
    assert "nope" in out.stderr and "tiny-chat" in out.stderr


def test_a_preload_model_starts_with_the_agent_and_stays(agents: Agents) -> None:
    c = agents
    path = Path(c.env["CORRAL_CATALOG_PATH"])
    data = yaml.safe_load(path.read_text())
    base = next(e for e in data["models"] if e["name"] == "tiny-chat")
    data["models"].append({**base, "name": "tiny-pre", "n_ctx": 1024, "preload": True})
    preloading = c.tmp / "preload.yaml"
    preloading.write_text(yaml.safe_dump(data, sort_keys=False))
    c.agent("h1", CORRAL_CATALOG_PATH=str(preloading), CORRAL_KEEP_ALIVE_S="0")
    (pool,) = until(lambda: c.workers("tiny-pre"), 60, "the preloaded pool")
    assert pool["preload"] is True and pool["agent"] == "h1"
    (start,) = c.events("start", "tiny-pre")
    assert start["reason"] == "preload"
    time.sleep(3)  # keep-alive 0: any other idle pool would be gone by now
    assert c.workers("tiny-pre") and not c.events("unload")
