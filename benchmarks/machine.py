"""The machine a run measured: CPU, cores, memory, GPU, software versions, load."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from sqlalchemy import text


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _ram_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024**2, 1)
    except OSError:
        pass
    return None


def _pkg(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def gpus() -> list[str]:
    """GPU names and memory from nvidia-smi; empty when there is none."""
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in out.splitlines() if line.strip()]


def describe(database_url: str, redis_url: str) -> dict[str, Any]:
    """Everything that lets a reader compare this run with theirs."""
    import redis

    from app.store import db

    engine = db.get_engine(database_url)
    with engine.connect() as conn:
        if engine.dialect.name == "sqlite":
            db_version = "SQLite " + str(conn.execute(text("select sqlite_version()")).scalar())
        else:
            db_version = str(conn.execute(text("select version()")).scalar()).split(",")[0]
    client = redis.Redis.from_url(redis_url)
    try:
        redis_version = str(client.info("server").get("redis_version"))
    finally:
        client.close()
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "ram_gib": _ram_gib(),
        "gpus": gpus(),
        "os": platform.platform(),
        "python": sys.version.split()[0],
        "llama_cpp_python": _pkg("llama_cpp_python"),
        "celery": _pkg("celery"),
        "fastapi": _pkg("fastapi"),
        "uvicorn": _pkg("uvicorn"),
        "sqlalchemy": _pkg("sqlalchemy"),
        "database": f"{engine.dialect.name} ({db_version})",
        "redis": redis_version,
        "load_avg_start": [round(x, 2) for x in os.getloadavg()],
    }
