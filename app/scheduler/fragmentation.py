"""Beat's fragmentation cleanup: reclaim dead leases, report stranded memory, plan moves.

``corral.scheduler.cleanup`` (every ``CORRAL_CLEANUP_S``) calls :func:`tick`:

1. reclaims the leases whose holder stopped renewing them (a worker killed with SIGKILL):
   the ledger purges every expired lease it reads, and the tick counts them;
2. takes a snapshot of the ledger as :mod:`app.scheduler.cleanup` sees it: every GPU with
   its leases, a lease *busy* unless a live pool holding it says it is idle (a pool still
   loading, or one whose heartbeat stopped, is never moved), standing reserves as such;
   and the pools waiting for room (``corral:sched:pending``) with their catalog priority
   and whether they may split;
3. reports per GPU and per host the free memory no waiting pool can use, and the plan for
   each waiting pool (fits, split, the fewest moves of idle pools that make a hole, or why
   not).

The report is kept in Redis (``corral:sched:cleanup``) and shown by ``GET /v1/gpus`` and
``corral gpus``; each tick that reclaims leases or plans moves is also appended to a short
log (``corral:sched:cleanup:log``). The host agent (:mod:`app.scheduler.agent`) carries the
moves out: it releases the idle pool and starts it again on the target GPU, and appends
each move to the same log.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from typing import Any, cast

import redis

from app.core.config import Settings, get_settings
from app.core.redis import get_redis
from app.scheduler import live
from app.scheduler.cleanup import GpuState, PoolLease, Waiting, plan, stranded
from app.scheduler.ledger import RES_KEY, Ledger
from app.scheduler.service import make_ledger, pending
from models.catalog import load_catalog

REPORT_KEY = "corral:sched:cleanup"
LOG_KEY = "corral:sched:cleanup:log"
LOG_LENGTH = 200


def snapshot(
    ledger: Ledger, client: redis.Redis, settings: Settings
) -> tuple[list[GpuState], list[Waiting]]:
    """The GPUs with their leases (busy unless an idle live pool holds them), and the
    pools waiting for room, as the planner reads them."""
    idle: set[str] = set()
    for worker in live.live_workers():
        if not worker.get("busy"):
            idle.update(str(r.get("id")) for r in worker.get("reservations") or [])
    by_gpu: dict[str, list[PoolLease]] = {}
    for r in ledger.reservations():
        lease = PoolLease(
            pool_id=r.id,
            model=r.model,
            bytes=r.bytes,
            busy=not r.standing and r.id not in idle,
            standing=r.standing,
        )
        by_gpu.setdefault(r.gpu_key, []).append(lease)
    gpus = [
        GpuState(g["host"], int(g["index"]), int(g["total_bytes"]), tuple(by_gpu.get(g["key"], [])))
        for g in ledger.gpus()
    ]
    catalog = load_catalog(settings.catalog_path)
    known = {e.name: e for e in catalog.entries}
    waiting = []
    for p in pending(client):
        entry = known.get(str(p.get("model")))
        if entry is None or not p.get("need_bytes"):
            continue
        waiting.append(
            Waiting(
                model=entry.name,
                need_bytes=int(p["need_bytes"]),
                split_allowed=entry.split_allowed,
                priority=entry.priority,
                split_overhead_bytes=settings.gpu_overhead_bytes,
            )
        )
    return gpus, waiting


def _leases(client: redis.Redis, ledger: Ledger) -> int:
    pipe = client.pipeline()
    for g in ledger.gpus():
        pipe.hlen(RES_KEY.format(key=g["key"]))
    return sum(int(n) for n in pipe.execute())


def tick() -> dict[str, Any]:
    """One cleanup pass; returns (and stores) its report."""
    settings, client = get_settings(), get_redis()
    ledger = make_ledger(settings, client)
    held = _leases(client, ledger)
    gpus, waiting = snapshot(ledger, client, settings)  # reading purges expired leases
    reclaimed = held - sum(len(g.leases) for g in gpus)
    report = stranded(gpus, waiting, headroom=ledger.headroom)
    plans = plan(gpus, waiting, headroom=ledger.headroom)
    out: dict[str, Any] = {
        "at": time.time(),
        "reclaimed_leases": max(0, reclaimed),
        "free_bytes": report.free,
        "stranded_bytes": report.stranded,
        "gpus": [asdict(g) for g in report.gpus],
        "hosts": [asdict(h) for h in report.hosts],
        "plans": [
            {
                "model": p.model,
                "need_bytes": p.need_bytes,
                "priority": p.priority,
                "action": p.action,
                "placement": [list(x) for x in p.placement],
                "moves": [asdict(m) for m in p.moves],
                "reason": p.reason,
                "state": "proposed" if p.moves else "",
            }
            for p in plans
        ],
    }
    pipe = client.pipeline()
    pipe.set(REPORT_KEY, json.dumps(out))
    if out["reclaimed_leases"] or any(p["moves"] for p in out["plans"]):
        pipe.lpush(LOG_KEY, json.dumps({k: out[k] for k in ("at", "reclaimed_leases", "plans")}))
        pipe.ltrim(LOG_KEY, 0, LOG_LENGTH - 1)
    pipe.execute()
    return out


def record_action(client: redis.Redis, action: dict[str, Any]) -> None:
    """Append an action taken on a plan (an agent's move) to the cleanup log."""
    pipe = client.pipeline()
    pipe.lpush(LOG_KEY, json.dumps({"at": time.time(), **action}))
    pipe.ltrim(LOG_KEY, 0, LOG_LENGTH - 1)
    pipe.execute()


def latest(client: redis.Redis | None = None) -> dict[str, Any] | None:
    """The last cleanup report, or None before beat's first pass."""
    raw = cast(bytes | None, (client or get_redis()).get(REPORT_KEY))
    return json.loads(raw) if raw else None


def history(limit: int = 50, client: redis.Redis | None = None) -> list[dict[str, Any]]:
    """The passes that reclaimed leases or planned moves, newest first."""
    raw = cast(list[bytes], (client or get_redis()).lrange(LOG_KEY, 0, limit - 1))
    return [json.loads(r) for r in raw]
