"""What the dashboard's platform pages show, read from the services (no HTTP here)."""

from __future__ import annotations

import time
from typing import Any

from app.core.config import get_settings
from app.governance import service as governance
from app.governance.metrics import Snapshot, gather
from app.memory.keys import tenant_of
from app.memory.service import get_memory
from app.scheduler import pools as pool_view
from app.scheduler.service import gpus_view
from app.workflows import routing
from models.catalog import Catalog, load_catalog


def catalog() -> Catalog:
    return load_catalog(get_settings().catalog_path)


def gpus() -> dict[str, Any]:
    """GPUs with reserved and free shares; fragmentation per host; pools; waiting ones."""
    view = gpus_view()
    hosts: dict[str, dict[str, int]] = {}
    for g in view["gpus"]:
        total = max(1, int(g["total_bytes"]))
        g["reserved_pct"] = round(100 * g["reserved_bytes"] / total, 1)
        g["free_pct"] = round(100 * max(0, g["free_bytes"]) / total, 1)
        h = hosts.setdefault(g["host"], {"free": 0, "largest": 0})
        h["free"] += max(0, g["free_bytes"])
        h["largest"] = max(h["largest"], g["free_bytes"])
    now = time.time()
    pools = []
    agents = pool_view.pools_view()
    for model in agents["pools"]:
        for w in model["workers"]:
            age = round(now - float(w.get("heartbeat_at", now)), 1)
            pools.append({**w, "heartbeat_age_s": age})
        for s in model["starting"]:  # an agent's pool that is not serving yet
            pools.append({"worker": s["node"], "model": s["model"], "host": s["agent"], **s})
    pools.sort(key=lambda w: (str(w.get("model")), str(w.get("worker"))))
    return {
        "gpus": view["gpus"],
        "hosts": hosts,
        "pools": pools,
        "pending": view["pending"],
        "agents": agents["agents"],
        "events": agents["events"][:20],
    }


def _figures(snap: Snapshot, model: str) -> dict[str, float]:
    out = {}
    for metric in (
        "steps_finished",
        "step_error_rate",
        "step_latency_p50_s",
        "step_latency_p95_s",
        "tokens_per_s",
        "queue_depth",
        "queue_oldest_wait_s",
        "pools_live",
    ):
        for s in snap.samples(metric):
            if s.labels.get("model") == model:
                out[metric] = s.value
    return out


def models() -> dict[str, Any]:
    """Catalog entries, whether each file is here, live pools and the window's figures."""
    settings = get_settings()
    cat = catalog()
    present = {e.name for e in cat.present(settings.models_path)}
    snap = gather(settings=settings)
    routes, paused = routing.routes(), routing.paused()
    rows = [
        {
            "entry": e,
            "present": e.name in present,
            "figures": _figures(snap, e.name),
            "routed_to": routes.get(e.name),
            "paused": e.name in paused,
        }
        for e in cat.entries
    ]
    return {"models": rows, "window_s": settings.governance_window_s}


def alerts() -> dict[str, Any]:
    return {"alerts": governance.list_alerts(limit=100), "rules": governance.list_rules()}


def conversations(key_id: int | None) -> dict[str, Any]:
    convs, _ = get_memory().conversations.list_page(tenant_of(key_id), limit=100)
    return {"conversations": convs}


def conversation(key_id: int | None, conversation_id: str) -> dict[str, Any]:
    mem, tenant = get_memory(), tenant_of(key_id)
    conv = mem.conversations.get(tenant, conversation_id)
    messages = mem.conversations.page(tenant, conversation_id, after=0, limit=200)
    blocks = mem.blocks.all(tenant, conv.user_id)
    archive = mem.archive.page(tenant, conv.user_id, limit=50).items
    return {"conv": conv, "messages": messages, "blocks": blocks, "archive": archive}
