"""`corral api --workers N`: N API processes serve one port, sharing nothing but the
database and Redis; workflows submitted, waited for, read and listed through it work end to
end."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from app.core.config import Settings, settings_env
from app.core.embedded import free_port
from app.store import db, keys
from tests.utils.platform import spawn, start_platform

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def api_processes(pid: int) -> list[int]:
    """The serving processes uvicorn started (multiprocessing's spawned children; not its
    resource tracker)."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
            if b"spawn_main" in cmdline:
                found.append(int(child))
    return found


def test_two_api_processes_serve_one_port(settings: Settings, tmp_path: Path) -> None:
    with db.session_scope(write=True) as session:
        _row, key = keys.create_key(session, "api-processes")
    port = free_port()
    env = settings_env(settings)
    api = spawn(["api", "--port", str(port), "--workers", "2"], env, tmp_path / "api.log")
    # A worker pool for the steps (its own API on another port is not used here).
    plat = start_platform(settings, tmp_path, workers={"tiny-chat": 1})
    try:
        headers = {"Authorization": f"Bearer {key}"}
        with httpx.Client(
            base_url=f"http://127.0.0.1:{port}", headers=headers, timeout=30
        ) as client:
            deadline = time.monotonic() + 60
            while True:
                assert api.poll() is None, (tmp_path / "api.log").read_text()
                try:
                    up = client.get("/healthz").status_code == 200
                    if up and len(api_processes(api.pid)) >= 2:
                        break
                except httpx.HTTPError:
                    pass
                assert time.monotonic() < deadline, (tmp_path / "api.log").read_text()
                time.sleep(0.2)
            serving = api_processes(api.pid)
            assert len(serving) == 2, serving
            spec = {
                "name": "two-apis",
                "steps": [
                    {"id": "a", "kind": "generate", "model": "tiny-chat", "input": {"prompt": "x"}}
                ],
            }
            # Fresh connections: the kernel spreads them over both processes' accepts.
            ids = []
            for _ in range(6):
                with httpx.Client(
                    base_url=f"http://127.0.0.1:{port}", headers=headers, timeout=30
                ) as fresh:
                    resp = fresh.post("/v1/workflows", json=spec, params={"wait_s": 30})
                    assert resp.status_code == 200, resp.text
                    assert resp.json()["status"] == "succeeded"
                    ids.append(resp.json()["id"])
            for wid in ids:
                run = client.get(f"/v1/workflows/{wid}", params={"wait_s": 5}).json()
                assert run["status"] == "succeeded" and run["steps"][0]["output"]["text"]
            listed = client.get("/v1/workflows", params={"limit": 50}).json()["items"]
            assert {w["id"] for w in listed} >= set(ids)
            assert api_processes(api.pid) == serving  # none of them died on the way
    finally:
        plat.stop()
        if api.poll() is None:
            os.killpg(api.pid, signal.SIGTERM)
        try:
            api.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(api.pid, signal.SIGKILL)
            api.wait()
