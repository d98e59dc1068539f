"""GPUs and pools over HTTP: inventory, reservations, free memory, pending placements,
live workers."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from app.api.deps import ApiKeyDep
from app.scheduler import fragmentation, pools
from app.scheduler.service import gpus_view

router = APIRouter(prefix="/v1", tags=["scheduler"])


@router.get("/gpus")
def list_gpus(_key: ApiKeyDep) -> dict[str, Any]:
    """Inventory per host and GPU, reservations, free memory, pools waiting for room, and
    beat's last fragmentation report (stranded memory per GPU and host, plans)."""
    return {**gpus_view(), "fragmentation": fragmentation.latest()}


@router.get("/pools")
def list_pools(_key: ApiKeyDep) -> dict[str, Any]:
    """Per model: live pool processes with their state (ready, idle and for how long,
    releasing), GPUs and reservations; the host agents' pools still starting or loading;
    why the model waits, per host; the agents, and their latest actions."""
    return pools.pools_view()
