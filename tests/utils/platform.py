"""Starting the real platform (API and worker processes) for end-to-end tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from app.core.config import Settings, settings_env
from app.core.embedded import free_port
from app.store import db, keys

# Steps with these ids fail their first N attempts inside the worker (chaos testing).
FAULTS = "flaky:1,doomed:99"


@dataclass
class Platform:
    """A running API and workers, with an authenticated client."""

    url: str
    key: str
    client: httpx.Client
    settings: Settings
    log_dir: Path
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def submit(self, spec: dict[str, Any], **headers: str) -> httpx.Response:
        return self.client.post("/v1/workflows", json=spec, headers=headers)

    def wait(self, workflow_id: str, timeout_s: float = 60.0) -> dict[str, Any]:
        """Long-poll (``?wait_s=``) until the workflow is no longer running."""
        deadline = time.monotonic() + timeout_s
        while True:
            wait_s = max(0.0, min(10.0, deadline - time.monotonic()))
            run: dict[str, Any] = self.client.get(
                f"/v1/workflows/{workflow_id}", params={"wait_s": wait_s}
            ).json()
            if run["status"] != "running":
                return run
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"workflow still running after {timeout_s}s: {run}\n{self.logs()}"
                )

    def run(self, spec: dict[str, Any], timeout_s: float = 60.0) -> dict[str, Any]:
        resp = self.submit(spec)
        assert resp.status_code == 202, resp.text
        return self.wait(resp.json()["id"], timeout_s)

    def logs(self, tail: int = 3000) -> str:
        out = []
        for path in sorted(self.log_dir.glob("*.log")):
            out.append(f"--- {path.name}\n{path.read_text(errors='replace')[-tail:]}")
        return "\n".join(out)

    def stop(self) -> None:
        self.client.close()
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def spawn(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "app.cli.main", *args],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def start_platform(
    settings: Settings,
    log_dir: Path,
    workers: dict[str, int] | None = None,
    *,
    beat: bool = False,
    extra_env: dict[str, str] | None = None,
) -> Platform:
    """Start `corral api` and `corral worker` processes for ``settings``; wait until ready."""
    workers = workers or {"tiny-chat": 2, "tiny-embed": 1}
    env = settings_env(settings)
    env["CORRAL_FAULT_INJECTION"] = FAULTS
    env["CORRAL_WORKER_HEARTBEAT_S"] = "1"
    env.pop("CORRAL_API_KEY", None)
    env.update(extra_env or {})
    port = free_port()
    procs = {"api": spawn(["api", "--port", str(port)], env, log_dir / "api.log")}
    for model, concurrency in workers.items():
        procs[model] = spawn(
            ["worker", "--model", model, "--concurrency", str(concurrency)],
            env,
            log_dir / f"worker-{model}.log",
        )
    if beat:
        procs["beat"] = spawn(["beat"], env, log_dir / "beat.log")
    with db.session_scope(write=True) as session:
        _row, key = keys.create_key(session, f"test-{os.getpid()}", admin=True)
    url = f"http://127.0.0.1:{port}"
    client = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=30)
    plat = Platform(url, key, client, settings, log_dir, procs)
    deadline = time.monotonic() + 90
    while True:
        for name, proc in procs.items():
            if proc.poll() is not None:
                plat.stop()
                raise RuntimeError(f"{name} exited with {proc.returncode}\n{plat.logs()}")
        try:
            models = {m["name"]: m["workers"] for m in client.get("/v1/catalog").json()}
            if all(models.get(m, 0) >= n for m, n in workers.items()):
                return plat
        except (httpx.HTTPError, ValueError, TypeError):
            pass
        if time.monotonic() > deadline:
            plat.stop()
            raise RuntimeError(f"platform not ready in 90 s\n{plat.logs()}")
        time.sleep(0.2)


def module_settings(root: Path, redis_url: str, pulled: list[str]) -> Settings:
    """Settings of a platform of its own: SQLite under ``root`` (migrated), the Redis
    database ``redis_url`` (emptied), the tiny models and the catalog models ``pulled``."""
    import redis

    from app.store.migrate import upgrade
    from models.catalog import load_catalog
    from models.pull import pull
    from models.tiny import make_tiny

    models = root / "models"
    make_tiny(models, ["tiny-chat", "tiny-embed"])
    for name in pulled:
        pull(load_catalog().get(name), models, progress=False)
    url = f"sqlite:///{root / 'corral.db'}"
    upgrade(url)
    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    client.close()
    return Settings(
        database_url=url, redis_url=redis_url, models_dir=models, data_dir=root / "data"
    )
