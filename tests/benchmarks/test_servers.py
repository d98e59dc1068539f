"""The benchmark counts the CPU of the Redis and database servers on this host.

Figure 2 reports CPU per workflow by process; a server the run did not spawn (the Redis
and PostgreSQL the tests use) is found by asking it for its pid, and counted with the
processes it forks (PostgreSQL's backends). Real servers, real work, real /proc.
"""

from __future__ import annotations

import time

import psycopg
import redis

from app.core.config import Settings
from benchmarks.stack import local_servers
from benchmarks.stats import CpuMeter, children_of


def _command(pid: int) -> str:
    with open(f"/proc/{pid}/comm") as f:
        return f.read().strip()


def test_the_redis_server_is_found_and_its_work_is_counted(settings: Settings) -> None:
    servers = local_servers(settings)
    pid = servers["redis"]
    assert _command(pid).startswith("redis-server")
    client = redis.Redis.from_url(settings.broker_url)
    try:
        # The kernel counts CPU time in clock ticks (10 ms): enough work that a tick or more
        # is counted however fast the server is (20,000 writes were once counted as 0).
        with CpuMeter([pid]) as cpu:
            pipe = client.pipeline(transaction=False)
            for i in range(100_000):
                pipe.set(f"bench-servers:{i}", "x" * 100)
            pipe.execute()
        client.delete(*(f"bench-servers:{i}" for i in range(100_000)))
    finally:
        client.close()
    assert cpu.used_s is not None and cpu.used_s > 0


def test_the_database_server_is_counted_with_its_backends(settings: Settings) -> None:
    servers = local_servers(settings)
    if not settings.sqlalchemy_url.startswith("postgresql"):
        # SQLite runs in the processes that use it; there is no server to count.
        assert "database" not in servers
        return
    postmaster = servers["database"]
    assert _command(postmaster) == "postgres"
    url = settings.sqlalchemy_url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(url) as conn:
        backend = conn.execute("SELECT pg_backend_pid()").fetchone()
        assert backend is not None
        # A connection opened after the lookup is served by a child of the process found.
        assert backend[0] in children_of(postmaster)
        with CpuMeter([postmaster]) as cpu:
            conn.execute("SELECT count(*) FROM generate_series(1, 3000000)").fetchone()
    assert cpu.used_s is not None and cpu.used_s > 0.05


def test_a_backend_that_exits_inside_the_block_is_still_counted(settings: Settings) -> None:
    """A connection opened, worked and closed within the block: its backend has exited
    (and the server waited for it) by the block's end, and its CPU is in the count."""
    if not settings.sqlalchemy_url.startswith("postgresql"):
        return  # no server: nothing exits
    postmaster = local_servers(settings)["database"]
    url = settings.sqlalchemy_url.replace("postgresql+psycopg://", "postgresql://")
    with CpuMeter([postmaster]) as cpu:
        with psycopg.connect(url) as conn:
            row = conn.execute("SELECT pg_backend_pid()").fetchone()
            assert row is not None
            conn.execute("SELECT count(*) FROM generate_series(1, 3000000)").fetchone()
        deadline = time.monotonic() + 10
        while row[0] in children_of(postmaster) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert row[0] not in children_of(postmaster)  # gone, and waited for
    assert cpu.used_s is not None and cpu.used_s > 0.05
