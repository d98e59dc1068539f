"""The system health view (``GET /v1/health``, ``corral health``): one status overall and
one per component, from the same snapshot the rules read.

=========  =====================================================================
component  degraded when
=========  =====================================================================
database   (down when it does not answer)
redis      (down when it does not answer)
beat       it has not evaluated the rules within three intervals (or ever)
models     a model's steps wait with no live pool, or its queue is paused
gpus       a GPU is more than 90% reserved
alerts     a critical alert is firing
=========  =====================================================================

Overall: ``down`` when the database or Redis is down, else ``degraded`` when any
component is, else ``ok``.
"""

from __future__ import annotations

import time
from typing import Any

from sqlmodel import col, func, select

from app.core.config import get_settings
from app.core.errors import ServiceUnavailable
from app.core.redis import ping
from app.governance.evaluate import last_tick
from app.governance.metrics import Snapshot, gather
from app.store import db
from app.store.tables import Alert, AlertState
from app.workflows import routing
from models.catalog import load_catalog

GPU_DEGRADED = 0.9


def _timed(probe: Any) -> dict[str, Any]:
    start = time.perf_counter()
    try:
        probe()
    except ServiceUnavailable as exc:
        return {"status": "down", "error": str(exc)}
    return {"status": "ok", "latency_ms": round((time.perf_counter() - start) * 1000, 2)}


def _by_label(snap: Snapshot, metric: str, label: str) -> dict[str, float]:
    return {s.labels[label]: s.value for s in snap.samples(metric)}


def health() -> dict[str, Any]:
    """Every component's status and figures, and the overall status (the API adds itself
    when it answers)."""
    settings = get_settings()
    components: dict[str, Any] = {
        "database": _timed(db.ping),
        "redis": _timed(ping),
    }
    snap = gather(settings=settings)
    if "redis" not in snap.errors and snap.samples("redis_used_bytes"):
        components["redis"]["used_bytes"] = int(snap.samples("redis_used_bytes")[0].value)
    components["beat"] = _beat(settings.governance_interval_s)
    components["models"] = _models(snap)
    components["gpus"] = _gpus(snap)
    components["alerts"] = _alerts()
    if snap.errors:
        components["unread"] = snap.errors
    statuses = [
        c["status"] for c in (components[k] for k in ("database", "redis", "beat", "alerts"))
    ]
    statuses += [m["status"] for m in components["models"].values()]
    statuses += [g["status"] for g in components["gpus"].values()]
    down = "down" in (components["database"]["status"], components["redis"]["status"])
    overall = "down" if down else "degraded" if "degraded" in statuses else "ok"
    return {"status": overall, "at": snap.at, "components": components}


def _beat(interval_s: float) -> dict[str, Any]:
    try:
        at = last_tick()
    except ServiceUnavailable as exc:
        return {"status": "unknown", "error": str(exc)}
    if at is None:
        return {"status": "degraded", "reason": "beat has never evaluated the rules"}
    age = time.time() - at.timestamp()
    out: dict[str, Any] = {"status": "ok", "last_tick": at.isoformat(), "age_s": round(age, 1)}
    if age > 3 * interval_s:
        out.update(status="degraded", reason=f"no evaluation for {age:.0f} s (beat stopped?)")
    return out


def _models(snap: Snapshot) -> dict[str, Any]:
    pools = _by_label(snap, "pools_live", "model")
    depth = _by_label(snap, "queue_depth", "model")
    wait = _by_label(snap, "queue_oldest_wait_s", "model")
    paused = _by_label(snap, "queue_paused", "model")
    try:
        routes = routing.routes()
    except Exception:  # Redis down: already said under redis
        routes = {}
    present = {
        e.name
        for e in load_catalog(get_settings().catalog_path).present(get_settings().models_path)
    }
    out: dict[str, Any] = {}
    for model in sorted(set(pools) | set(depth) | set(wait)):
        live, queued = int(pools.get(model, 0)), int(depth.get(model, 0))
        waited = wait.get(model, 0.0)
        if not (live or queued or waited or model in present or model in routes):
            continue
        entry: dict[str, Any] = {
            "status": "ok",
            "pools_live": live,
            "queue_depth": queued,
            "oldest_wait_s": round(waited, 1),
            "paused": bool(paused.get(model)),
            "routed_to": routes.get(model),
            "present": model in present,
        }
        if entry["paused"]:
            entry.update(status="degraded", reason="its queue is paused")
        elif not live and (queued or waited):
            entry.update(status="degraded", reason="steps wait and no pool serves the model")
        out[model] = entry
    return out


def _gpus(snap: Snapshot) -> dict[str, Any]:
    reserved = _by_label(snap, "gpu_reserved_bytes", "gpu")
    total = _by_label(snap, "gpu_total_bytes", "gpu")
    out = {}
    for gpu in sorted(total):
        ratio = reserved.get(gpu, 0) / total[gpu] if total[gpu] else 0.0
        out[gpu] = {
            "status": "degraded" if ratio > GPU_DEGRADED else "ok",
            "reserved_bytes": int(reserved.get(gpu, 0)),
            "total_bytes": int(total[gpu]),
            "utilization": round(ratio, 4),
        }
    return out


def _alerts() -> dict[str, Any]:
    try:
        with db.session_scope() as session:
            rows = session.exec(
                select(Alert.severity, func.count())
                .where(col(Alert.state) == AlertState.firing)
                .group_by(Alert.severity)
            ).all()
    except ServiceUnavailable as exc:
        return {"status": "unknown", "error": str(exc)}
    firing = {str(severity): int(n) for severity, n in rows}
    status = "degraded" if firing.get("critical") else "ok"
    return {"status": status, "firing": firing}
