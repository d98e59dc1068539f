"""What `corral worker` asks of the scheduler: a place for its model, kept alive by a lease.

acquire ── inventory → register the host's GPUs (heartbeat) → standing reserves
        ── estimate from the GGUF header → place (policy, pinned, split)
        ── no room: evict idle lower-priority pools, else wait in the visible pending
           queue (or fail with --no-wait); never too big: refuse with the numbers
keeper  ── renews the lease and the host's GPUs every TTL/3 until release
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import redis

from app.core.config import Settings, get_settings
from app.core.errors import PlacementError
from app.core.redis import get_redis
from app.scheduler.estimate import MemoryEstimate, estimate, read_shape
from app.scheduler.inventory import GpuInventory, format_bytes
from app.scheduler.ledger import Ledger, Reservation
from app.scheduler.placement import POLICIES, Pinned, Placement, Policy, Refusal, place
from models.catalog import Catalog, CatalogEntry

log = logging.getLogger(__name__)

PENDING_KEY = "corral:sched:pending"

# Asks the worker holding a reservation to give it up if idle; returns whether it did.
Evictor = Callable[[Reservation], bool]


def make_ledger(settings: Settings, client: redis.Redis) -> Ledger:
    return Ledger(
        client, headroom_bytes=settings.gpu_headroom_bytes, lease_ttl_s=settings.lease_ttl_s
    )


def estimate_for(settings: Settings, path: Path, n_ctx: int, parallel: int = 1) -> MemoryEstimate:
    """The memory estimate of the model at ``path`` with the settings' cache and overhead."""
    return estimate(
        read_shape(path),
        n_ctx,
        parallel=parallel,
        cache_type=settings.kv_cache_type,
        flash_attention=settings.flash_attention,
        overhead_bytes=settings.gpu_overhead_bytes,
    )


def sync_standing(
    ledger: Ledger, catalog: Catalog, host: str, gpus: list[int], settings: Settings
) -> list[Reservation]:
    """Create the catalog's standing reserves that belong on this host's GPUs."""
    have = {(r.model, r.gpu_key) for r in ledger.reservations() if r.standing}
    made = []
    for entry in catalog.entries:
        for spec in entry.reserve_gpus:
            where_host, _, idx = spec.rpartition(":")
            if (where_host and where_host != host) or not idx.isdigit() or int(idx) not in gpus:
                continue
            if (entry.name, f"{host}:{idx}") in have:
                continue
            size = entry.reserve_bytes
            path = catalog.path_for(entry, settings.models_path)
            if size is None and path.is_file():
                size = estimate_for(settings, path, entry.n_ctx).total_bytes
            if size is None:
                log.warning(
                    "standing reserve for %s skipped: no reserve_bytes, no file", entry.name
                )
                continue
            got = ledger.reserve(
                entry.name,
                "catalog",
                [(host, int(idx), size)],
                priority=entry.priority,
                standing=True,
            )
            if got.ok:
                made += got.reservations
            else:
                log.warning("standing reserve for %s on GPU %s: %s", entry.name, idx, got.reason)
    return made


@dataclass
class Pending:
    """The visible record of a pool waiting for room."""

    client: redis.Redis
    holder: str
    info: dict[str, Any] = field(default_factory=dict)

    def set(self, **info: Any) -> None:
        self.info.setdefault("since", time.time())
        self.info.update(info, holder=self.holder, updated_at=time.time())
        self.client.hset(PENDING_KEY, self.holder, json.dumps(self.info))

    def clear(self) -> None:
        self.client.hdel(PENDING_KEY, self.holder)


def pending(client: redis.Redis, stale_s: float = 60.0) -> list[dict[str, Any]]:
    """Pools waiting for room now, with their reason (stale entries of dead waiters dropped)."""
    out = []
    for holder, raw in client.hgetall(PENDING_KEY).items():
        info = json.loads(raw)
        if time.time() - float(info.get("updated_at", 0)) > stale_s:
            client.hdel(PENDING_KEY, holder)
            continue
        out.append(info)
    return sorted(out, key=lambda i: float(i["since"]))


def _evict_for(
    ledger: Ledger, refusal: Refusal, est: MemoryEstimate, host: str, priority: int, evict: Evictor
) -> bool:
    """Ask idle lower-priority pools on one GPU to leave if that makes room; True if any did."""
    leases = [
        r
        for r in ledger.reservations()
        if r.host == host and not r.standing and r.priority < priority
    ]
    by_gpu: dict[str, list[Reservation]] = {}
    for r in leases:
        by_gpu.setdefault(r.gpu_key, []).append(r)
    for key, victims in sorted(by_gpu.items()):
        room = refusal.rooms.get(key, 0)
        if room + sum(v.bytes for v in victims) < est.total_bytes:
            continue
        freed = False
        for v in sorted(victims, key=lambda v: (v.priority, -v.bytes)):
            if evict(v):
                log.info("evicted idle pool %s (%s) from GPU %s", v.holder, v.model, key)
                room += v.bytes
                freed = True
            if room >= est.total_bytes:
                break
        if freed:
            return True
    return False


@dataclass
class PoolScheduler:
    """Places one worker's model and keeps its lease alive."""

    settings: Settings
    client: redis.Redis
    inventory: GpuInventory
    catalog: Catalog
    evict: Evictor | None = None
    ledger: Ledger = field(init=False)
    _stop: threading.Event = field(default_factory=threading.Event, init=False)

    def __post_init__(self) -> None:
        self.ledger = make_ledger(self.settings, self.client)

    def register(self) -> list[int]:
        gpus = self.inventory.gpus()
        self.ledger.register_gpus(gpus, ttl_s=self.settings.lease_ttl_s)
        return [g.index for g in gpus]

    def acquire(
        self,
        entry: CatalogEntry,
        path: Path,
        *,
        holder: str,
        gpu: str = "auto",
        n_ctx: int | None = None,
        wait: bool = True,
        timeout_s: float | None = None,
        parallel: int = 1,
    ) -> Placement | None:
        """Reserve GPUs for ``entry`` (None: this host has no GPU, run on the CPU): the
        weights once, and the KV cache of ``parallel`` slots of ``n_ctx`` tokens."""
        gpus = self.inventory.gpus()
        if not gpus:
            if gpu.isdigit():
                raise PlacementError(f"--gpu {gpu}: this host has no GPU", permanent=True)
            return None
        host = gpus[0].host
        self.ledger.register_gpus(gpus, ttl_s=self.settings.lease_ttl_s)
        sync_standing(self.ledger, self.catalog, host, [g.index for g in gpus], self.settings)
        if gpu.isdigit() and int(gpu) not in {g.index for g in gpus}:
            raise PlacementError(
                f"--gpu {gpu}: this host has GPUs {sorted(g.index for g in gpus)}", permanent=True
            )
        ctx = n_ctx or entry.n_ctx
        est = estimate_for(self.settings, path, ctx, parallel)
        policy: Policy = (
            Pinned(int(gpu)) if gpu.isdigit() else POLICIES[self.settings.placement_policy]()
        )
        waiting = Pending(self.client, holder)
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        try:
            while True:
                result = place(
                    self.ledger,
                    est,
                    model=entry.name,
                    holder=holder,
                    gpus=[(g.host, g.index, g.total_bytes) for g in gpus],
                    policy=policy,
                    priority=entry.priority,
                    split_allowed=entry.split_allowed,
                    estimate_split=lambda split: estimate(
                        est.shape,
                        ctx,
                        parallel=parallel,
                        cache_type=est.cache_type,
                        flash_attention=est.flash_attention,
                        overhead_bytes=est.overhead_bytes,
                        split=split,
                    ),
                )
                if isinstance(result, Placement):
                    return result
                if result.permanent:
                    raise PlacementError(
                        f"model {entry.name!r} at n_ctx {ctx} × {parallel} slot(s): "
                        f"{result.reason}",
                        permanent=True,
                        need_bytes=result.need,
                    )
                if (
                    self.evict
                    and entry.priority > 0
                    and _evict_for(self.ledger, result, est, host, entry.priority, self.evict)
                ):
                    time.sleep(0.2)
                    continue
                if not wait or (deadline is not None and time.monotonic() > deadline):
                    raise PlacementError(
                        f"model {entry.name!r}: no room now: {result.reason}",
                        permanent=False,
                        need_bytes=result.need,
                    )
                waiting.set(
                    model=entry.name,
                    host=host,
                    need_bytes=result.need,
                    need=format_bytes(result.need),
                    reason=result.reason,
                )
                time.sleep(self.settings.placement_poll_s)
                gpus = self.inventory.gpus() or gpus
                self.ledger.register_gpus(gpus, ttl_s=self.settings.lease_ttl_s)
        finally:
            waiting.clear()

    def keep(self, placement: Placement) -> threading.Thread:
        """Renew the lease and the host's GPUs every TTL/3 until :meth:`release`."""

        def run() -> None:
            period = self.settings.lease_ttl_s / 3
            while not self._stop.wait(period):
                try:
                    self.register()
                    if self.ledger.renew(placement.reservations) < len(placement.reservations):
                        log.error(
                            "the lease of %s was lost (expired or evicted)", placement.indices
                        )
                except redis.RedisError as exc:
                    log.warning("lease renewal failed, retrying: %s", exc)

        thread = threading.Thread(target=run, name="corral-lease", daemon=True)
        thread.start()
        return thread

    def release(self, placement: Placement | None) -> None:
        self._stop.set()
        if placement is not None:
            self.ledger.release(placement.reservations)


def gpus_view() -> dict[str, Any]:
    """Every registered GPU with its reservations and free bytes, and the pending pools."""
    client = get_redis()
    ledger = make_ledger(get_settings(), client)
    usage = ledger.usage()
    by_gpu: dict[str, list[dict[str, Any]]] = {}
    for r in ledger.reservations():
        by_gpu.setdefault(r.gpu_key, []).append({**asdict(r), "standing": r.standing})
    gpus = []
    for g in ledger.gpus():
        u = usage.get(g["key"], {"reserved": 0, "free": 0})
        gpus.append(
            {
                **g,
                "headroom_bytes": ledger.headroom,
                "reserved_bytes": u["reserved"],
                "free_bytes": u["free"],
                "reservations": by_gpu.get(g["key"], []),
            }
        )
    now = time.time()
    waiting = [{**p, "waiting_s": now - float(p["since"])} for p in pending(client)]
    return {"gpus": gpus, "pending": waiting}
