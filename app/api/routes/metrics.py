"""Prometheus metrics, no API key, from prometheus_client's own registry.

:class:`CorralCollector` reads the figures at scrape time: workflow and step runs by
status (the database), messages waiting on each model queue and live worker processes
per model (Redis), and the start-up objects this API process froze. prometheus_client's
:class:`~prometheus_client.GCCollector` adds this process's garbage collector
(``python_gc_*``).
"""

from __future__ import annotations

import gc
from collections import Counter
from collections.abc import Iterator

from fastapi import APIRouter, Response
from fastapi.responses import PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, GCCollector, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry
from sqlalchemy import func
from sqlmodel import select

from app.core.config import get_settings
from app.core.redis import get_redis
from app.scheduler import live
from app.store import db
from app.store.tables import StepRun, StepStatus, WorkflowRun, WorkflowStatus
from app.workflows.names import queue_for
from models.catalog import load_catalog

router = APIRouter(tags=["health"])


class CorralCollector(Collector):
    """Corral's gauges, read from the database and Redis each time it is collected."""

    def describe(self) -> Iterator[Metric]:
        """No families up front: registering this collector reads nothing."""
        return iter(())

    def collect(self) -> Iterator[Metric]:
        """The workflow, step, queue, worker and frozen-object gauges, read now."""
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

        models = [entry.name for entry in load_catalog(get_settings().catalog_path).entries]
        pipe = get_redis().pipeline()
        for model in models:
            pipe.llen(queue_for(model))
        queues = GaugeMetricFamily(
            "corral_queue_length", "Messages waiting on each model queue.", labels=["model"]
        )
        for model, length in zip(models, pipe.execute(), strict=True):
            queues.add_metric([model], length)
        yield queues

        live_by_model = Counter(str(w.get("model")) for w in live.live_workers())
        workers = GaugeMetricFamily(
            "corral_workers", "Live worker processes per model.", labels=["model"]
        )
        for model in models:
            workers.add_metric([model], live_by_model.get(model, 0))
        yield workers

        yield GaugeMetricFamily(
            "corral_gc_frozen_objects",
            "Start-up objects the collector no longer walks.",
            value=gc.get_freeze_count(),
        )


REGISTRY = CollectorRegistry(auto_describe=True)
REGISTRY.register(CorralCollector())
GCCollector(registry=REGISTRY)


@router.get("/metrics", response_class=PlainTextResponse)
def metrics() -> Response:
    """Every collector of :data:`REGISTRY`, in Prometheus' text format."""
    return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)
