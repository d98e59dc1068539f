"""Beat's fragmentation cleanup on a real Redis: the ledger, live pools and waiting pools as
the workers write them; the tick reclaims dead leases, reports stranded memory and plans
the fewest moves of idle pools, never a busy one; ``GET /v1/gpus`` shows the report."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import httpx
import pytest

from app.api.main import create_app
from app.core.config import Settings, use_settings
from app.core.redis import get_redis
from app.scheduler import fragmentation, live
from app.scheduler.inventory import DeclaredInventory, format_bytes
from app.scheduler.ledger import Ledger
from app.scheduler.service import Pending, make_ledger
from app.store import db, keys

GIB = 2**30


@pytest.fixture
def cluster(isolated: Settings) -> Iterator[Settings]:
    """Host h1 with two 24 GiB GPUs: GPU 0 holds idle pool A (10 GiB) and busy pool B
    (6 GiB), GPU 1 idle pool C (12 GiB); a dead holder's lease on GPU 1 has expired;
    tiny-chat waits for 16 GiB, which no GPU has free."""
    with use_settings(isolated.model_copy(update={"gpu_headroom_bytes": 0})) as s:
        client = get_redis()
        ledger = make_ledger(s, client)
        ledger.register_gpus(DeclaredInventory("0:24GiB,1:24GiB", "h1").gpus(), ttl_s=300)
        held = {}
        for name, gpu, size in [("A", 0, 10), ("B", 0, 6), ("C", 1, 12)]:
            got = ledger.reserve(f"model-{name}", f"pool-{name}", [("h1", gpu, size * GIB)])
            assert got.ok, got.reason
            held[name] = got.reservations[0]
        dead = Ledger(client, lease_ttl_s=0.2).reserve("gone", "dead", [("h1", 1, 1 * GIB)])
        assert dead.ok
        for name, busy in [("A", False), ("B", True), ("C", False)]:
            r = held[name]
            info = {"model": r.model, "busy": busy, "reservations": [{"id": r.id}]}
            live.register_worker(f"pool-{name}", info, 30)
        Pending(client, "waiter").set(  # as a worker waiting for room writes it
            model="tiny-chat",
            host="h1",
            need_bytes=16 * GIB,
            need=format_bytes(16 * GIB),
            reason="no GPU has 16.0 GiB free",
        )
        time.sleep(0.3)  # the dead holder's lease runs out
        yield s


def test_the_tick_reclaims_reports_and_plans_one_move_of_an_idle_pool(cluster: Settings) -> None:
    report = fragmentation.tick()
    assert report["reclaimed_leases"] == 1
    free = {g["key"]: g["free"] for g in report["gpus"]}
    assert free == {"h1:0": 8 * GIB, "h1:1": 12 * GIB}
    # Neither hole fits the waiting 16 GiB: all of it is stranded.
    assert report["stranded_bytes"] == report["free_bytes"] == 20 * GIB
    [host] = report["hosts"]
    assert host["largest_hole"] == 12 * GIB
    [planned] = report["plans"]
    assert planned["model"] == "tiny-chat" and planned["action"] == "moves"
    # One move: idle A (10 GiB) from GPU 0 to GPU 1 leaves 18 GiB on GPU 0; busy B stays.
    [move] = planned["moves"]
    assert (move["model"], move["from_gpu"], move["to_gpu"]) == ("model-A", "h1:0", "h1:1")
    assert planned["placement"] == [["h1:0", 16 * GIB]] and planned["state"] == "proposed"
    assert fragmentation.latest() == report
    [logged] = fragmentation.history()
    assert logged["reclaimed_leases"] == 1 and logged["plans"][0]["moves"] == [move]


def test_a_busy_pool_is_never_planned_away(cluster: Settings) -> None:
    for name in ("A", "C"):  # now every pool serves a step
        r = next(
            x
            for x in make_ledger(cluster, get_redis()).reservations()
            if x.holder == f"pool-{name}"
        )
        info = {"model": r.model, "busy": True, "reservations": [{"id": r.id}]}
        live.register_worker(f"pool-{name}", info, 30)
    live._live_cache.clear()
    [planned] = fragmentation.tick()["plans"]
    assert planned["action"] == "none" and planned["moves"] == []
    assert "16.00 GiB" in planned["reason"]
    # Reading the ledger above purged the dead lease already: this pass reclaimed nothing
    # and moved nothing, so it is not logged.
    assert fragmentation.history() == []


def test_gpus_route_shows_the_last_report(cluster: Settings) -> None:
    fragmentation.tick()
    with db.session_scope(write=True) as session:
        _row, key = keys.create_key(session, "fragmentation")

    async def get() -> httpx.Response:
        transport = httpx.ASGITransport(app=create_app())
        async with httpx.AsyncClient(transport=transport, base_url="http://corral") as client:
            return await client.get("/v1/gpus", headers={"Authorization": f"Bearer {key}"})

    resp = asyncio.run(get())
    assert resp.status_code == 200, resp.text
    frag = resp.json()["fragmentation"]
    assert frag["stranded_bytes"] == 20 * GIB and frag["plans"][0]["action"] == "moves"


def test_corral_gpus_prints_the_report(cluster: Settings) -> None:
    from rich.console import Console

    from app.cli.views import print_gpus

    console = Console(record=True, width=200)
    print_gpus(console)
    assert "no fragmentation report yet" in console.export_text()
    fragmentation.tick()
    print_gpus(console)
    text = console.export_text()
    assert "fragmentation (beat's last cleanup pass)" in text
    assert "tiny-chat (16.00 GiB): moves after moving model-A h1:0→h1:1: h1:0" in text
