"""The reservation ledger on a real (private) Redis: atomicity, leases, driver figures."""

from __future__ import annotations

import multiprocessing
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from app.core.embedded import EmbeddedRedis
from app.scheduler.inventory import DeclaredInventory, GpuInfo, parse_bytes
from app.scheduler.ledger import Ledger

GIB = 2**30
HEADROOM = 256 * 2**20


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedRedis]:
    srv = EmbeddedRedis(tmp_path_factory.mktemp("ledger-redis"), persist=False).start()
    yield srv
    srv.stop()


@pytest.fixture
def client(server: EmbeddedRedis) -> Iterator[redis.Redis]:
    c = redis.Redis.from_url(server.url)
    c.flushdb()
    yield c
    c.close()


def four_gpus(host: str = "h1") -> list[GpuInfo]:
    return DeclaredInventory("0:24GiB,1:24GiB,2:24GiB,3:24GiB", host).gpus()


def test_declared_inventory_parsing() -> None:
    gpus = DeclaredInventory("0:24GiB,1:16GB:L4", "h").gpus()
    assert [(g.index, g.total_bytes, g.name) for g in gpus] == [
        (0, 24 * GIB, "declared GPU"),
        (1, 16 * 10**9, "L4"),
    ]
    assert parse_bytes("512MiB") == 512 * 2**20
    with pytest.raises(Exception, match="INDEX:SIZE"):
        DeclaredInventory("zero:24GiB")
    with pytest.raises(Exception, match="cannot read"):
        DeclaredInventory("0:lots")
    with pytest.raises(Exception, match="twice"):
        DeclaredInventory("0:1GiB,0:2GiB")


def _racer(url: str, seed: int, rounds: int, out: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    rng = random.Random(seed)
    ledger = Ledger(redis.Redis.from_url(url), headroom_bytes=HEADROOM, lease_ttl_s=300)
    won = []
    for _ in range(rounds):
        gpu = rng.randrange(4)
        size = rng.randrange(1 * GIB, 7 * GIB)
        got = ledger.reserve(f"m{seed}", f"p{seed}", [("h1", gpu, size)])
        if got.ok:
            won.append((gpu, size, got.reservations[0].id))
    out.put(won)


def test_racing_processes_never_over_commit(client: redis.Redis, server: EmbeddedRedis) -> None:
    ledger = Ledger(client, headroom_bytes=HEADROOM)
    ledger.register_gpus(four_gpus(), ttl_s=300)
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    procs = [ctx.Process(target=_racer, args=(server.url, s, 6, out)) for s in range(36)]
    for p in procs:
        p.start()
    won = [w for _ in procs for w in out.get(timeout=60)]
    for p in procs:
        p.join(60)
    per_gpu = {i: sum(size for g, size, _ in won if g == i) for i in range(4)}
    reservations = ledger.reservations()
    # What the winners were told is exactly what the ledger holds...
    assert sorted(r.id for r in reservations) == sorted(rid for _, _, rid in won)
    for i in range(4):
        held = sum(r.bytes for r in reservations if r.gpu == i)
        assert held == per_gpu[i]
        # ...and no GPU is promised more than it has.
        assert held <= 24 * GIB - HEADROOM
    # The race was real: far more asked than fitted.
    assert 8 <= len(won) < 36 * 6


def test_lease_of_a_killed_holder_expires(
    client: redis.Redis, server: EmbeddedRedis, tmp_path: Path
) -> None:
    ledger = Ledger(client, headroom_bytes=HEADROOM, lease_ttl_s=2)
    ledger.register_gpus(four_gpus(), ttl_s=300)
    script = tmp_path / "holder.py"
    script.write_text(
        "import sys, time, redis\n"
        "from app.scheduler.ledger import Ledger\n"
        "l = Ledger(redis.Redis.from_url(sys.argv[1]), lease_ttl_s=2)\n"
        "got = l.reserve('m', 'holder', [('h1', 0, 20 * 2**30)])\n"
        "assert got.ok\n"
        "print('held', flush=True)\n"
        "while True:\n"
        "    l.renew(got.reservations)\n"
        "    time.sleep(0.5)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path.cwd())}
    proc = subprocess.Popen(
        [sys.executable, str(script), server.url], stdout=subprocess.PIPE, env=env, text=True
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "held"
        time.sleep(3)  # longer than the TTL: renewals keep it alive
        assert [r.holder for r in ledger.reservations()] == ["holder"]
        assert not ledger.reserve("other", "o", [("h1", 0, 10 * GIB)]).ok
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        deadline = time.monotonic() + 2.5
        while ledger.reservations() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert ledger.reservations() == []
        assert ledger.reserve("other", "o", [("h1", 0, 10 * GIB)]).ok
    finally:
        proc.kill()
        proc.wait()
        assert proc.stdout is not None
        proc.stdout.close()


def test_driver_reporting_less_free_wins(client: redis.Redis) -> None:
    ledger = Ledger(client, headroom_bytes=HEADROOM)
    gpu = GpuInfo("h1", 0, "u0", "GPU", 24 * GIB, 24 * GIB, "nvml")
    ledger.register_gpus([gpu], ttl_s=300)
    first = ledger.reserve("a", "w1", [("h1", 0, 8 * GIB)])
    assert first.ok
    # Another process (not ours) takes 10 GiB; our 8 GiB lease is not loaded yet.
    ledger.register_gpus([GpuInfo("h1", 0, "u0", "GPU", 24 * GIB, 14 * GIB, "nvml")], ttl_s=300)
    room = ledger.rooms("b", 0, ["h1:0"])["h1:0"]
    assert room == 14 * GIB - HEADROOM - 8 * GIB  # not the ledger's 16 GiB
    assert not ledger.reserve("b", "w2", [("h1", 0, 7 * GIB)]).ok
    # Once our model is loaded, the driver's figure already contains it.
    ledger.mark_loaded(first.reservations)
    ledger.register_gpus([GpuInfo("h1", 0, "u0", "GPU", 24 * GIB, 6 * GIB, "nvml")], ttl_s=300)
    assert ledger.rooms("b", 0, ["h1:0"])["h1:0"] == 6 * GIB - HEADROOM


def test_multi_gpu_reservation_is_all_or_nothing(client: redis.Redis) -> None:
    ledger = Ledger(client, headroom_bytes=HEADROOM)
    ledger.register_gpus(four_gpus(), ttl_s=300)
    assert ledger.reserve("x", "w", [("h1", 1, 20 * GIB)]).ok
    got = ledger.reserve("big", "w2", [("h1", 0, 20 * GIB), ("h1", 1, 20 * GIB)])
    assert not got.ok
    assert got.gpu == "h1:1"
    assert [r.model for r in ledger.reservations("h1:0")] == []
    assert ledger.reserve("big", "w2", [("h1", 0, 20 * GIB), ("h1", 2, 20 * GIB)]).ok


def test_standing_reserve_blocks_lower_priority(client: redis.Redis) -> None:
    ledger = Ledger(client, headroom_bytes=HEADROOM)
    ledger.register_gpus(four_gpus(), ttl_s=300)
    assert ledger.reserve("vip", "catalog", [("h1", 0, 16 * GIB)], priority=10, standing=True).ok
    assert not ledger.reserve("low", "w", [("h1", 0, 10 * GIB)], priority=1).ok
    assert ledger.reserve("low", "w", [("h1", 0, 7 * GIB)], priority=1).ok
    # The reserved model itself uses its reserve instead of adding to it.
    assert ledger.reserve("vip", "w-vip", [("h1", 0, 16 * GIB)], priority=10).ok
    assert ledger.rooms("low", 1, ["h1:0"])["h1:0"] == 24 * GIB - HEADROOM - 16 * GIB - 7 * GIB
    # A higher priority than the reserve's is not blocked by it.
    assert ledger.rooms("vvip", 20, ["h1:1"])["h1:1"] == 24 * GIB - HEADROOM


def test_unknown_gpu_is_refused(client: redis.Redis) -> None:
    ledger = Ledger(client)
    got = ledger.reserve("m", "w", [("nohost", 0, 1)])
    assert not got.ok
    assert "unknown GPU" in got.reason


def test_catalog_standing_reserves_are_synced_once(client: redis.Redis, tmp_path: Path) -> None:
    from app.core.config import Settings
    from app.scheduler.service import sync_standing
    from models.catalog import Catalog, load_catalog

    shipped = load_catalog()
    vip = shipped.get("tiny-chat").model_copy(
        update={"priority": 10, "reserve_gpus": ("0", "other-host:1"), "reserve_bytes": 700 * 2**20}
    )
    catalog = Catalog((vip, shipped.get("tiny-embed")))
    ledger = Ledger(client, headroom_bytes=0)
    ledger.register_gpus(DeclaredInventory("0:1GiB,1:1GiB", "h").gpus(), ttl_s=300)
    made = sync_standing(ledger, catalog, "h", [0, 1], Settings(models_dir=tmp_path))
    assert [(r.gpu_key, r.model, r.bytes, r.standing) for r in made] == [
        ("h:0", "tiny-chat", 700 * 2**20, True)
    ]
    assert sync_standing(ledger, catalog, "h", [0, 1], Settings(models_dir=tmp_path)) == []
    assert not ledger.reserve("tiny-embed", "w", [("h", 0, 500 * 2**20)]).ok
    assert ledger.reserve("tiny-embed", "w", [("h", 1, 500 * 2**20)]).ok
