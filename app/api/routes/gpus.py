"""GPUs and pools: inventory, reservations, free memory, pending placements, live workers."""

from __future__ import annotations

import time
from dataclasses import asdict
from typing import Any

from fastapi import APIRouter

from app.api.deps import ApiKeyDep
from app.core.config import get_settings
from app.core.redis import get_redis
from app.scheduler import live
from app.scheduler.service import make_ledger, pending

router = APIRouter(prefix="/v1", tags=["scheduler"])


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


@router.get("/gpus")
def list_gpus(_key: ApiKeyDep) -> dict[str, Any]:
    """Inventory per host and GPU, reservations, free memory, and pools waiting for room."""
    return gpus_view()


@router.get("/pools")
def list_pools(_key: ApiKeyDep) -> dict[str, Any]:
    """Live worker processes per model, with their GPUs and reservations."""
    pools: dict[str, list[dict[str, Any]]] = {}
    for w in live.live_workers():
        pools.setdefault(str(w.get("model")), []).append(w)
    return {"pools": [{"model": m, "workers": ws} for m, ws in sorted(pools.items())]}
