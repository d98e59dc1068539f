"""The system under test, as real processes: Redis, a database, `corral api`, `corral worker`,
and the bare-Celery baseline worker on the same broker with the same concurrency.

Services come from ``CORRAL_BENCH_REDIS_URL`` / ``CORRAL_BENCH_DATABASE_URL`` when set (a
PostgreSQL database the benchmark may migrate and write to); otherwise Redis is an embedded
redis-server and the database a SQLite file, both in a temporary directory.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import redis
import yaml
from celery import Celery

from app.core.config import PACKAGE_ROOT, Settings, settings_env, use_settings
from app.core.embedded import EmbeddedRedis, free_port
from app.store import db, keys
from app.store.migrate import upgrade
from benchmarks import bare, stats
from benchmarks.client import BenchClient, ClientKind, open_client
from models.catalog import CATALOG_PATH, load_catalog
from models.tiny import make_tiny

REDIS_ENV = "CORRAL_BENCH_REDIS_URL"
DATABASE_ENV = "CORRAL_BENCH_DATABASE_URL"
CHAT_MODEL = "tiny-chat"
GPU_MODEL = "bench-gpu"


@dataclass
class GpuModel:
    """A real-size GGUF for the GPU figure, served by its own worker pinned to ``device``."""

    path: Path
    n_ctx: int = 4096
    device: str = "0"  # `corral worker --gpu`: a GPU index ('none' runs the path on CPU)

    @property
    def file_name(self) -> str:
        """Its name in the benchmark's models directory (never one of the tiny models')."""
        return f"bench-gpu-{self.path.name}"


@dataclass
class Stack:
    """Running services and processes, with what a client needs to reach them."""

    settings: Settings
    work_dir: Path
    api_url: str
    workers: int
    backend: str
    bare_app: Celery
    gpu: GpuModel | None = None
    http_client: ClientKind = "stdlib"  # what drives the API (benchmarks/client.py)
    api_workers: int = 1  # `corral api --workers`
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    # The Redis and database servers on this host, by role ("redis", "database"), whether
    # the run started them or not: their CPU is part of what a workflow or a task costs.
    services: dict[str, int] = field(default_factory=dict)
    _exit: ExitStack = field(default_factory=ExitStack)

    @property
    def log_dir(self) -> Path:
        return self.work_dir / "logs"

    @property
    def chat_model_path(self) -> Path:
        return self.settings.models_path / "tiny-chat.gguf"

    def new_key(self, name: str) -> str:
        """A fresh API key: a key sees only its own workflows, so each figure gets one."""
        with use_settings(self.settings), db.session_scope(write=True) as session:
            _row, key = keys.create_key(session, name)
        return key

    def client(self, key: str, timeout: float = 120.0) -> BenchClient:
        """An HTTP client of the API as ``key``, of the kind this run uses."""
        return open_client(
            self.http_client, self.api_url, {"Authorization": f"Bearer {key}"}, timeout
        )

    def purge(self, queue: str) -> None:
        """Drop every message waiting on ``queue`` (the submission figure's leftovers)."""
        with self.bare_app.connection_for_write() as conn:
            conn.default_channel.queue_purge(queue)

    def pids(self, *names: str) -> list[int]:
        """Process ids by role: a spawned process, or a local server (``services``)."""
        found = [self.procs[n].pid for n in names if n in self.procs]
        return found + [self.services[n] for n in names if n in self.services]

    def logs(self, tail: int = 3000) -> str:
        out = []
        for path in sorted(self.log_dir.glob("*.log")):
            out.append(f"--- {path.name}\n{path.read_text(errors='replace')[-tail:]}")
        return "\n".join(out)

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.procs.clear()
        self.bare_app.close()
        db.dispose_engines()
        self._exit.close()


def _spawn(
    args: list[str], env: dict[str, str], log: Path, *, module: str = "app.cli.main"
) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", module, *args],
            env=env,
            cwd=PACKAGE_ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def _write_catalog(path: Path, gpu: GpuModel | None) -> Path:
    """Corral's catalog, plus an entry for the GPU model when there is one."""
    data = yaml.safe_load(CATALOG_PATH.read_text())
    if gpu is not None:
        from models.gguf_info import read_gguf_info

        info = read_gguf_info(gpu.path)
        context = info.context_length or gpu.n_ctx
        data["models"].append(
            {
                "name": GPU_MODEL,
                "kind": "chat",
                "description": f"benchmark model {gpu.path.name}",
                "file": gpu.file_name,
                "context_length": context,
                "n_ctx": min(gpu.n_ctx, context),
            }
        )
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def start_stack(
    *,
    workers: int = 2,
    log_level: str = "INFO",
    gpu: GpuModel | None = None,
    http_client: ClientKind = "stdlib",
    api_workers: int = 1,
) -> Stack:
    """Start everything and wait until each worker pool has loaded its model."""
    exit_stack = ExitStack()
    work_dir = Path(tempfile.mkdtemp(prefix="corral-bench-"))
    exit_stack.callback(shutil.rmtree, work_dir, ignore_errors=True)
    (work_dir / "logs").mkdir()
    try:
        redis_url = os.environ.get(REDIS_ENV)
        if not redis_url:
            server = EmbeddedRedis(work_dir / "redis", persist=False).start()
            exit_stack.callback(server.stop)
            redis_url = server.url
        database_url = os.environ.get(DATABASE_ENV) or f"sqlite:///{work_dir / 'corral.db'}"
        models_dir = work_dir / "models"
        make_tiny(models_dir)
        if gpu is not None:
            (models_dir / gpu.file_name).symlink_to(gpu.path.resolve())
        settings = Settings(
            database_url=database_url,
            redis_url=redis_url,
            models_dir=models_dir,
            data_dir=work_dir / "data",
            catalog_path=_write_catalog(work_dir / "catalog.yaml", gpu),
            log_level=log_level,
        )
        upgrade(settings.sqlalchemy_url)
        load_catalog(settings.catalog_path)  # fail here, not in a child, if it is invalid
        stack = Stack(
            settings=settings,
            work_dir=work_dir,
            api_url="",
            workers=workers,
            backend=settings.sqlalchemy_url.split(":", 1)[0].split("+", 1)[0],
            bare_app=bare.make_app(redis_url),
            gpu=gpu,
            http_client=http_client,
            api_workers=api_workers,
            _exit=exit_stack,
        )
    except BaseException:
        exit_stack.close()
        raise
    try:
        _start_processes(stack, log_level)
    except BaseException:
        stack.stop()
        raise
    stack.services = local_servers(stack.settings)
    return stack


def _is(pid: int, command: str) -> bool:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip().startswith(command)
    except OSError:
        return False


def local_servers(settings: Settings) -> dict[str, int]:
    """The pids of the Redis server and the database server (PostgreSQL's postmaster, whose
    children are the backends) when they run on this host; a SQLite database lives in the
    processes that use it. A server elsewhere is left out: its CPU is not this host's."""
    found: dict[str, int] = {}
    client = redis.Redis.from_url(settings.broker_url)
    try:
        pid = int(client.info("server")["process_id"])
    finally:
        client.close()
    if _is(pid, "redis-server"):
        found["redis"] = pid
    if settings.sqlalchemy_url.startswith("postgresql"):
        with use_settings(settings), db.connection_scope() as conn:
            backend = int(conn.exec_driver_sql("SELECT pg_backend_pid()").scalar_one())
        parent = stats.parent_of(backend)
        if parent is not None and _is(backend, "postgres") and _is(parent, "postgres"):
            found["database"] = parent
    return found


def _start_processes(stack: Stack, log_level: str) -> None:
    env = settings_env(stack.settings)
    env.pop("CORRAL_API_KEY", None)
    env.pop("CORRAL_FAULT_INJECTION", None)
    port = free_port()
    stack.api_url = f"http://127.0.0.1:{port}"
    log_dir = stack.log_dir
    api = ["api", "--port", str(port), "--workers", str(stack.api_workers)]
    stack.procs["api"] = _spawn(api, env, log_dir / "api.log")
    stack.procs["worker"] = _spawn(
        ["worker", "--model", CHAT_MODEL, "--gpu", "none", "--concurrency", str(stack.workers)],
        env,
        log_dir / "worker.log",
    )
    bare_env = {
        **env,
        bare.BROKER_ENV: stack.settings.broker_url,
        bare.MODEL_ENV: str(stack.chat_model_path),
        bare.N_CTX_ENV: str(load_catalog(stack.settings.catalog_path).get(CHAT_MODEL).n_ctx),
    }
    stack.procs["bare"] = _spawn(
        [
            "-A", "benchmarks.bare:app", "worker",
            "-Q", bare.QUEUE,
            "--pool", "prefork",
            "--concurrency", str(stack.workers),
            "-n", f"bare.{os.getpid()}@%h",
            "--loglevel", log_level,
            "--without-gossip", "--without-mingle",
        ],
        bare_env,
        log_dir / "bare.log",
        module="celery",
    )  # fmt: skip
    wanted = {CHAT_MODEL: stack.workers}
    if stack.gpu is not None:
        stack.procs["gpu-worker"] = _spawn(
            ["worker", "--model", GPU_MODEL, "--gpu", stack.gpu.device, "--concurrency", "1"],
            env,
            log_dir / "gpu-worker.log",
        )
        wanted[GPU_MODEL] = 1
    _wait_ready(stack, wanted)


def _wait_ready(stack: Stack, wanted: dict[str, int], timeout_s: float = 180.0) -> None:
    key = stack.new_key("bench-ready")
    deadline = time.monotonic() + timeout_s
    with stack.client(key, timeout=5) as client:
        while True:
            for name, proc in stack.procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited with {proc.returncode}\n{stack.logs()}")
            try:
                live = {m["name"]: m["workers"] for m in client.get("/v1/catalog").json()}
                if all(live.get(m, 0) >= n for m, n in wanted.items()):
                    break
            except (httpx.HTTPError, ValueError, TypeError, KeyError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"Corral not ready in {timeout_s:.0f} s\n{stack.logs()}")
            time.sleep(0.2)
    # The bare pool is ready when every process answers a task (each loads at its start).
    results = [
        stack.bare_app.send_task(bare.GENERATE, args=[{"max_tokens": 1}], queue=bare.QUEUE)
        for _ in range(stack.workers * 2)
    ]
    for result in results:
        result.get(timeout=max(1.0, deadline - time.monotonic()))
