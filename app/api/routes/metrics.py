"""Prometheus metrics (text exposition format), no API key: workflow and step counts by
status, queue lengths per model queue, live workers per model, and this API process's
submits by where they ran and its garbage collector."""

from __future__ import annotations

from collections import Counter

from fastapi import APIRouter
from fastapi.responses import PlainTextResponse
from sqlalchemy import func
from sqlmodel import select

from app.scheduler import live
from app.api.deps import CatalogDep, SessionDep
from app.api.routes.workflows import SUBMIT_PATHS
from app.core.process import gc_metrics
from app.store.tables import StepRun, StepStatus, WorkflowRun, WorkflowStatus

router = APIRouter(tags=["health"])


@router.get("/metrics", response_class=PlainTextResponse)
def metrics(session: SessionDep, catalog: CatalogDep) -> str:
    """Counters and gauges for Prometheus."""
    lines = [
        "# HELP corral_workflows Workflow runs by status.",
        "# TYPE corral_workflows gauge",
    ]
    for status, n in session.exec(
        select(WorkflowRun.status, func.count()).group_by(WorkflowRun.status)
    ):
        lines.append(f'corral_workflows{{status="{WorkflowStatus(status).value}"}} {n}')
    lines += ["# HELP corral_steps Step runs by status.", "# TYPE corral_steps gauge"]
    for status, n in session.exec(select(StepRun.status, func.count()).group_by(StepRun.status)):
        lines.append(f'corral_steps{{status="{StepStatus(status).value}"}} {n}')
    client = live.get_redis()
    workers = Counter(str(w.get("model")) for w in live.live_workers())
    lines += [
        "# HELP corral_queue_length Messages waiting on each model queue.",
        "# TYPE corral_queue_length gauge",
    ]
    pipe = client.pipeline()
    for entry in catalog.entries:
        pipe.llen(f"model.{entry.name}")
    for entry, length in zip(catalog.entries, pipe.execute(), strict=True):
        lines.append(f'corral_queue_length{{model="{entry.name}"}} {length}')
    lines += [
        "# HELP corral_workers Live worker processes per model.",
        "# TYPE corral_workers gauge",
    ]
    for entry in catalog.entries:
        lines.append(f'corral_workers{{model="{entry.name}"}} {workers.get(entry.name, 0)}')
    lines += [
        "# HELP corral_api_submits_total Submits this API process handled, by where they "
        "ran: on its event loop (nothing had to wait) or in its thread pool.",
        "# TYPE corral_api_submits_total counter",
    ]
    for path in ("event_loop", "thread_pool"):
        lines.append(f'corral_api_submits_total{{path="{path}"}} {SUBMIT_PATHS[path]}')
    lines += gc_metrics()
    return "\n".join(lines) + "\n"
