"""Prometheus metrics, no API key, from prometheus_client's own registry.

:class:`CorralCollector` reads the figures at scrape time: workflow and step runs by
status (the database); governance's snapshot (:mod:`app.governance.metrics`, the figures
the rules read: GPUs, queues, pools, step rates and latencies over
``CORRAL_GOVERNANCE_WINDOW_S``, Redis memory), each as ``corral_<metric>``; the open
alerts per rule (``corral_alerts{rule,severity,state}``); the per-model step counters every
worker adds to in Redis (:mod:`app.governance.model_stats`: histograms of step duration,
queue wait and time to first token, outcomes and tokens); pool processes busy or idle
(``corral_pools{model,state}``, their heartbeats); the host agents' loads, unloads,
evictions, moves and cold starts (``corral_pool_*``); and the start-up objects this API
process froze. prometheus_client's
:class:`~prometheus_client.GCCollector` adds this process's garbage collector
(``python_gc_*``).
"""

from __future__ import annotations

import gc
import logging
from collections import Counter
from collections.abc import Iterator

from fastapi import APIRouter, Response
from fastapi.responses import PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, GCCollector, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
    SummaryMetricFamily,
)
from prometheus_client.registry import Collector, CollectorRegistry
from redis.exceptions import RedisError
from sqlalchemy import func
from sqlmodel import col, select

from app.core.config import get_settings
from app.governance import model_stats
from app.governance.metrics import METRICS, Snapshot, gather
from app.scheduler import live, pools
from app.store import db
from app.store.tables import (
    Alert,
    AlertState,
    GovernanceRule,
    StepRun,
    StepStatus,
    WorkflowRun,
    WorkflowStatus,
)
from models.catalog import load_catalog

log = logging.getLogger(__name__)
router = APIRouter(tags=["health"])


class CorralCollector(Collector):
    """Corral's gauges, read from the database and Redis each time it is collected."""

    def describe(self) -> Iterator[Metric]:
        """No families up front: registering this collector reads nothing."""
        return iter(())

    def collect(self) -> Iterator[Metric]:
        """The workflow, step, snapshot, alert, per-model step, pool and frozen-object
        families, read now."""
        workflows = GaugeMetricFamily(
            "corral_workflows", "Workflow runs by status.", labels=["status"]
        )
        steps = GaugeMetricFamily("corral_steps", "Step runs by status.", labels=["status"])
        with db.session_scope() as session:
            by_workflow = {
                WorkflowStatus(status): n
                for status, n in session.exec(
                    select(WorkflowRun.status, func.count()).group_by(WorkflowRun.status)
                )
            }
            by_step = {
                StepStatus(status): n
                for status, n in session.exec(
                    select(StepRun.status, func.count()).group_by(StepRun.status)
                )
            }
        for wstatus in WorkflowStatus:
            workflows.add_metric([wstatus.value], by_workflow.get(wstatus, 0))
        for sstatus in StepStatus:
            steps.add_metric([sstatus.value], by_step.get(sstatus, 0))
        yield workflows
        yield steps

        snap = gather()
        yield from snapshot_families(snap)
        yield alert_family()
        yield from step_families()
        yield pool_family(snap.errors.get("pools") is None)
        yield from agent_families()

        yield GaugeMetricFamily(
            "corral_gc_frozen_objects",
            "Start-up objects the collector no longer walks.",
            value=gc.get_freeze_count(),
        )


# Snapshot metrics exported under the names /metrics had before governance.
EXPORT_NAMES = {"queue_depth": "corral_queue_length", "pools_live": "corral_workers"}


def snapshot_families(snap: Snapshot) -> Iterator[Metric]:
    """One gauge family per metric of the snapshot (windowed ones over the default window)."""
    for name, spec in METRICS.items():
        family = GaugeMetricFamily(
            EXPORT_NAMES.get(name, f"corral_{name}"), spec.help, labels=list(spec.labels)
        )
        for sample in snap.samples(name):
            family.add_metric([sample.labels.get(label, "") for label in spec.labels], sample.value)
        yield family


def alert_family() -> Metric:
    """Open alerts per rule, severity and state (pending, firing), zeros included."""
    family = GaugeMetricFamily(
        "corral_alerts", "Open alerts per rule.", labels=["rule", "severity", "state"]
    )
    with db.session_scope() as session:
        rules = session.exec(
            select(GovernanceRule).where(col(GovernanceRule.deleted_at).is_(None))
        ).all()
        counts = Counter(
            (rule_id, state)
            for rule_id, state in session.exec(
                select(Alert.rule_id, Alert.state).where(
                    col(Alert.state).in_([AlertState.pending, AlertState.firing])
                )
            )
        )
    for rule in rules:
        if not rule.enabled:
            continue
        for state in (AlertState.pending, AlertState.firing):
            severity = str(rule.body.get("severity", ""))
            family.add_metric([rule.id, severity, state.value], counts.get((rule.id, state), 0))
    return family


# The histograms of model_stats, by their name there: exported name and help.
HISTOGRAMS = {
    "duration": (
        "corral_step_duration_seconds",
        "Seconds from a step attempt's start to its result.",
    ),
    "queue_wait": (
        "corral_step_queue_wait_seconds",
        "Seconds a step attempt waited, from queued to started.",
    ),
    "ttft": (
        "corral_step_time_to_first_token_seconds",
        "Seconds of prompt evaluation before a generate or chat step's first token "
        "(queue wait excluded).",
    ),
}


def step_families(counters: model_stats.Counters | None = None) -> Iterator[Metric]:
    """The per-model step counters (read from Redis unless given): histograms, outcomes
    and tokens. Redis down: the families are empty (and the reason is logged)."""
    if counters is None:
        try:
            counters = model_stats.read_counters()
        except (RedisError, OSError) as exc:
            log.warning("cannot read the model stats from Redis: %s", exc)
            counters = model_stats.Counters()
    for name, (export, help_text) in HISTOGRAMS.items():
        histogram = HistogramMetricFamily(export, help_text, labels=["model", "kind"])
        for (model, kind), h in sorted(counters.histograms.get(name, {}).items()):
            histogram.add_metric([model, kind], h.buckets, h.sum)
        yield histogram
    outcomes = CounterMetricFamily(
        "corral_step_outcomes_total",
        "Step attempts that ended, by outcome (succeeded, failed, retrying, cancelled, discarded).",
        labels=["model", "kind", "outcome"],
    )
    for labels, n in sorted(counters.outcomes.items()):
        outcomes.add_metric(list(labels), n)
    yield outcomes
    for which, by_series in (
        ("prompt", counters.prompt_tokens),
        ("completion", counters.completion_tokens),
    ):
        tokens = CounterMetricFamily(
            f"corral_{which}_tokens_total",
            f"{which.capitalize()} tokens of the steps that succeeded.",
            labels=["model", "kind"],
        )
        for (model, kind), n in sorted(by_series.items()):
            tokens.add_metric([model, kind], n)
        yield tokens


def pool_family(readable: bool = True) -> Metric:
    """Live pool processes per model, busy (running a step) or idle, as of their last
    heartbeat; every catalog model has both series. Empty when ``readable`` is False or
    Redis cannot be read."""
    family = GaugeMetricFamily(
        "corral_pools", "Live pool processes, busy or idle.", labels=["model", "state"]
    )
    if not readable:
        return family
    try:  # the view gather() read just now
        workers = live.live_workers(max_age_s=live.VIEW_MAX_AGE_S)
    except (RedisError, OSError) as exc:
        log.warning("cannot read the live pools from Redis: %s", exc)
        return family
    counts = Counter((str(w.get("model")), bool(w.get("busy"))) for w in workers)
    models = [e.name for e in load_catalog(get_settings().catalog_path).entries]
    models += sorted({m for m, _ in counts} - set(models))
    for model in models:
        family.add_metric([model, "busy"], counts.get((model, True), 0))
        family.add_metric([model, "idle"], counts.get((model, False), 0))
    return family


# The host agents' counters (app.scheduler.pools): exported name and help.
AGENT_COUNTERS = {
    "loads": ("corral_pool_loads_total", "Pools an agent started that loaded their model."),
    "unloads": ("corral_pool_unloads_total", "Idle pools an agent unloaded (keep-alive)."),
    "evictions": (
        "corral_pool_evictions_total",
        "Idle pools an agent evicted for a waiting model of higher priority.",
    ),
    "moves": ("corral_pool_moves_total", "Idle pools an agent moved for fragmentation cleanup."),
}


def agent_families() -> Iterator[Metric]:
    """The host agents' counters per model, and the seconds from a model's first waiting
    step to its new pool's first step (a summary: sum and count, and the last one)."""
    try:
        counts = pools.counters()
    except (RedisError, OSError) as exc:
        log.warning("cannot read the agents' counters from Redis: %s", exc)
        counts = {}
    for name, (export, help_text) in AGENT_COUNTERS.items():
        family = CounterMetricFamily(export, help_text, labels=["model"])
        for model, n in sorted(counts.get(name, {}).items()):
            family.add_metric([model], n)
        yield family
    cold = SummaryMetricFamily(
        "corral_pool_cold_start_seconds",
        "Seconds from a model's first waiting step to the first step of the pool an agent "
        "started for it.",
        labels=["model"],
    )
    last = GaugeMetricFamily(
        "corral_pool_cold_start_last_seconds",
        "The latest of corral_pool_cold_start_seconds.",
        labels=["model"],
    )
    sums = counts.get("cold_start_seconds_sum", {})
    for model, n in sorted(counts.get("cold_start_seconds_count", {}).items()):
        cold.add_metric([model], count_value=int(n), sum_value=sums.get(model, 0.0))
        last.add_metric([model], counts.get("cold_start_seconds_last", {}).get(model, 0.0))
    yield cold
    yield last


REGISTRY = CollectorRegistry(auto_describe=True)
REGISTRY.register(CorralCollector())
GCCollector(registry=REGISTRY)


@router.get("/metrics", response_class=PlainTextResponse)
def metrics() -> Response:
    """Every collector of :data:`REGISTRY`, in Prometheus' text format."""
    return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)
