"""The figures governance watches, gathered in one snapshot from their real sources.

=========================  ==============  ================================================
metric                     labels          source
=========================  ==============  ================================================
gpu_reserved_bytes         gpu             the ledger: live and standing reservations
gpu_total_bytes            gpu             the ledger's inventory (NVML or declared)
gpu_utilization            gpu             reserved / total
gpu_driver_used_bytes      gpu             total − the driver-reported free (NVML)
queue_depth                model           messages on ``model.<name>``, low list too (Redis)
queue_oldest_wait_s        model           the longest a queued step of the model has waited
queue_paused               model           1 while the model's queue is paused
pools_live                 model           live worker processes (heartbeats)
pool_heartbeat_age_s       model,pool,host  seconds since a pool's last heartbeat
step_error_rate            model           failed / (succeeded + failed) steps, windowed
steps_finished             model           succeeded + failed steps, windowed
step_latency_p50_s         model           queued → finished, windowed
step_latency_p95_s         model           queued → finished, windowed
tokens_per_s               model           completion tokens / generation time, windowed
workflow_success_rate      (none)          succeeded / (succeeded + failed) workflows
handoff_success_rate       (none)          steps fed by an upstream step that succeeded
redis_used_bytes           (none)          Redis INFO memory
redis_utilization          (none)          used / maxmemory (only when maxmemory is set)
=========================  ==============  ================================================

Windowed metrics count what finished within the window (a condition's ``window_s``, or
``CORRAL_GOVERNANCE_WINDOW_S``); a window in which nothing finished has no sample, so a
rate condition is neither true nor false there. :func:`gather` reads every source once;
``/metrics`` and the rules read the same :class:`Snapshot`. The step figures come from
:func:`app.governance.model_stats.step_figures`, as those of
``GET /v1/catalog/{model}/stats`` do.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from redis.exceptions import RedisError
from sqlalchemy import func, select

from app.core.config import Settings, get_settings
from app.core.errors import ServiceUnavailable
from app.core.redis import get_redis
from app.governance import model_stats
from app.scheduler import live
from app.scheduler.service import make_ledger
from app.store import db
from app.store.queries import STEP, WORKFLOW
from app.store.tables import StepStatus, WorkflowStatus
from app.workflows import routing
from app.workflows.names import queue_keys
from models.catalog import load_catalog


@dataclass(frozen=True)
class MetricDef:
    """A metric rules may name: its labels, whether it is windowed, and what it means."""

    labels: tuple[str, ...]
    help: str
    source: str  # what gather reads it from: gpus, queues, pools, redis, database
    windowed: bool = False


METRICS: dict[str, MetricDef] = {
    "gpu_reserved_bytes": MetricDef(("gpu",), "Bytes reserved on each GPU.", source="gpus"),
    "gpu_total_bytes": MetricDef(("gpu",), "Each GPU's memory.", source="gpus"),
    "gpu_utilization": MetricDef(
        ("gpu",), "Reserved / total memory of each GPU (0-1).", source="gpus"
    ),
    "gpu_driver_used_bytes": MetricDef(
        ("gpu",), "Memory in use as the driver reports it.", source="gpus"
    ),
    "queue_depth": MetricDef(
        ("model",), "Messages waiting on each model's queue.", source="queues"
    ),
    "queue_oldest_wait_s": MetricDef(
        ("model",),
        "Seconds the longest-waiting queued step of each model has waited.",
        source="database",
    ),
    "queue_paused": MetricDef(("model",), "1 while the model's queue is paused.", source="queues"),
    "pools_live": MetricDef(("model",), "Live worker processes of each model.", source="pools"),
    "pool_heartbeat_age_s": MetricDef(
        ("model", "pool", "host"),
        "Seconds since each pool process's last heartbeat.",
        source="pools",
    ),
    "step_error_rate": MetricDef(
        ("model",), "Failed / finished steps in the window.", source="database", windowed=True
    ),
    "steps_finished": MetricDef(
        ("model",), "Steps that ended in the window.", source="database", windowed=True
    ),
    "step_latency_p50_s": MetricDef(
        ("model",),
        "Median seconds from queued to finished in the window.",
        source="database",
        windowed=True,
    ),
    "step_latency_p95_s": MetricDef(
        ("model",),
        "95th percentile seconds from queued to finished.",
        source="database",
        windowed=True,
    ),
    "tokens_per_s": MetricDef(
        ("model",),
        "Completion tokens per second of generation in the window.",
        source="database",
        windowed=True,
    ),
    "workflow_success_rate": MetricDef(
        (),
        "Succeeded / (succeeded + failed) workflows in the window.",
        source="database",
        windowed=True,
    ),
    "handoff_success_rate": MetricDef(
        (),
        "Steps fed by an upstream step that then succeeded, in the window.",
        source="database",
        windowed=True,
    ),
    "redis_used_bytes": MetricDef((), "Memory Redis uses.", source="redis"),
    "redis_utilization": MetricDef(
        (), "Redis used / maxmemory (0-1), when maxmemory is set.", source="redis"
    ),
}


@dataclass(frozen=True)
class Sample:
    """One value of one metric for one label set."""

    metric: str
    labels: dict[str, str]
    value: float


@dataclass
class Snapshot:
    """Every sample read at ``at``: instant ones, and windowed ones per window."""

    at: float
    instant: list[Sample] = field(default_factory=list)
    windowed: dict[float, list[Sample]] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)  # source → why it was not read

    def samples(self, metric: str, window_s: float | None = None) -> list[Sample]:
        """The samples of ``metric`` (over ``window_s`` for a windowed one: the default
        window when None)."""
        if METRICS[metric].windowed:
            window = window_s or get_settings().governance_window_s
            return [s for s in self.windowed.get(window, []) if s.metric == metric]
        return [s for s in self.instant if s.metric == metric]


def gather(windows: set[float] | None = None, settings: Settings | None = None) -> Snapshot:
    """Read every source once; windowed metrics for each of ``windows`` and the default.

    A source that cannot be read (Redis or the database down) leaves its metrics out and
    says why in :attr:`Snapshot.errors`.
    """
    settings = settings or get_settings()
    snap = Snapshot(at=time.time())
    wanted = sorted({settings.governance_window_s, *(windows or set())})
    models = [e.name for e in load_catalog(settings.catalog_path).entries]
    sources: list[tuple[str, Callable[[], list[Sample]]]] = [
        ("gpus", lambda: _gpus(settings)),
        ("queues", lambda: _queues(models)),
        ("pools", lambda: _pools(models, settings, snap.at)),
        ("redis", _redis),
        ("database", lambda: _waiting(models, snap.at)),
    ]
    for source, read in sources:
        try:
            snap.instant += read()
        except (RedisError, OSError, ServiceUnavailable) as exc:
            snap.errors[source] = str(exc)
    try:
        snap.windowed = _windowed(wanted, snap.at)
    except ServiceUnavailable as exc:
        snap.errors["database"] = str(exc)
    return snap


def _gpus(settings: Settings) -> list[Sample]:
    ledger = make_ledger(settings, get_redis())
    usage = ledger.usage()
    out = []
    for g in ledger.gpus():
        key, total = str(g["key"]), int(g["total_bytes"])
        reserved = int(usage.get(key, {}).get("reserved", 0))
        labels = {"gpu": key}
        out += [
            Sample("gpu_total_bytes", labels, total),
            Sample("gpu_reserved_bytes", labels, reserved),
            Sample("gpu_utilization", labels, reserved / total if total else 0.0),
        ]
        if g.get("source") == "nvml":
            out.append(
                Sample("gpu_driver_used_bytes", labels, total - int(g["reported_free_bytes"]))
            )
    return out


def _queues(models: list[str]) -> list[Sample]:
    pipe = get_redis().pipeline(transaction=False)
    keys = [queue_keys(model) for model in models]
    for key in (k for ks in keys for k in ks):
        pipe.llen(key)
    lengths = iter(pipe.execute())
    depths = [sum(next(lengths) for _ in ks) for ks in keys]  # normal + low priority
    paused = routing.paused()
    out = [
        Sample("queue_depth", {"model": m}, float(n)) for m, n in zip(models, depths, strict=True)
    ]
    out += [Sample("queue_paused", {"model": m}, float(m in paused)) for m in models]
    return out


def _pools(models: list[str], settings: Settings, now: float) -> list[Sample]:
    by_model: dict[str, int] = defaultdict(int)
    for w in live.live_workers():
        by_model[str(w.get("model"))] += 1
    out = [Sample("pools_live", {"model": m}, float(by_model.get(m, 0))) for m in models]
    for w in live.seen_workers(settings.governance_forget_s):
        labels = {
            "model": str(w.get("model")),
            "pool": str(w.get("worker")),
            "host": str(w.get("host")),
        }
        out.append(Sample("pool_heartbeat_age_s", labels, now - float(w["heartbeat_at"])))
    return out


def _redis() -> list[Sample]:
    info = get_redis().info("memory")
    used, cap = float(info["used_memory"]), float(info.get("maxmemory", 0) or 0)
    out = [Sample("redis_used_bytes", {}, used)]
    if cap > 0:
        out.append(Sample("redis_utilization", {}, used / cap))
    return out


_WAITING = (StepStatus.queued, StepStatus.waiting_for_pool)


def _waiting(models: list[str], now: float) -> list[Sample]:
    """The longest wait of a queued step per model (0 where none waits)."""
    s = STEP.c
    query = select(s.model, func.min(s.queued_at)).where(s.status.in_(_WAITING)).group_by(s.model)
    with db.session_scope() as session:
        oldest = {m: t for m, t in session.execute(query) if t is not None}
    return [
        Sample(
            "queue_oldest_wait_s",
            {"model": m},
            max(0.0, now - oldest[m].timestamp()) if m in oldest else 0.0,
        )
        for m in models
    ]


def _windowed(windows: list[float], now: float) -> dict[float, list[Sample]]:
    """Step and workflow figures over each window, from one read of the widest."""
    since = datetime.fromtimestamp(now, UTC) - timedelta(seconds=max(windows))
    w = WORKFLOW.c
    runs_q = select(w.status, w.finished_at).where(
        w.finished_at >= since, w.status.in_((WorkflowStatus.succeeded, WorkflowStatus.failed))
    )
    steps = model_stats.finished_steps(since)
    with db.session_scope() as session:
        runs = [tuple(r) for r in session.execute(runs_q)]
    return {
        window: _step_figures([r for r in steps if r.finished_at.timestamp() >= now - window])
        + _run_figures([r for r in runs if r[1].timestamp() >= now - window])
        for window in windows
    }


def _step_figures(rows: list[model_stats.FinishedStep]) -> list[Sample]:
    by_model: dict[str, list[model_stats.FinishedStep]] = defaultdict(list)
    for row in rows:
        by_model[row.model].append(row)
    out = []
    for model, items in sorted(by_model.items()):
        labels = {"model": model}
        figures = model_stats.step_figures(items)
        out += [
            Sample("steps_finished", labels, float(figures.steps_finished)),
            Sample("step_error_rate", labels, figures.error_rate or 0.0),
        ]
        if figures.latency_p50_s is not None and figures.latency_p95_s is not None:
            out += [
                Sample("step_latency_p50_s", labels, figures.latency_p50_s),
                Sample("step_latency_p95_s", labels, figures.latency_p95_s),
            ]
        if figures.tokens_per_s is not None:
            out.append(Sample("tokens_per_s", labels, figures.tokens_per_s))
    fed = [r for r in rows if r.fed]
    if fed:
        ok = sum(1 for r in fed if r.status is StepStatus.succeeded)
        out.append(Sample("handoff_success_rate", {}, ok / len(fed)))
    return out


def _run_figures(rows: list[tuple[Any, ...]]) -> list[Sample]:
    if not rows:
        return []
    ok = sum(1 for r in rows if r[0] == WorkflowStatus.succeeded)
    return [Sample("workflow_success_rate", {}, ok / len(rows))]
