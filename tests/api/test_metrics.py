"""GET /metrics: prometheus_client's registry, read at scrape time from the database,
Redis (queues and live workers) and this process's garbage collector."""

from __future__ import annotations

import asyncio
import gc

import httpx
from fastapi import FastAPI
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families

from app.api.routes import metrics
from app.core.config import Settings
from app.core.redis import get_redis
from app.scheduler import live
from app.store import db
from app.store.tables import StepRun, StepStatus, WorkflowRun, WorkflowStatus
from app.workflows.names import queue_for
from models.catalog import load_catalog

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(app: FastAPI) -> tuple[Samples, dict[str, str]]:
    """Every sample by (name, labels), and each family's type, from one GET over ASGI."""

    async def get() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://corral") as client:
            return await client.get("/metrics")

    resp = asyncio.run(get())
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"] == CONTENT_TYPE_LATEST
    families = list(text_string_to_metric_families(resp.text))
    samples = {(s.name, frozenset(s.labels.items())): s.value for f in families for s in f.samples}
    return samples, {f.name: f.type for f in families}


def test_metrics_reads_the_database_redis_and_the_collector(isolated: Settings) -> None:
    app = FastAPI()
    app.include_router(metrics.router)
    models = [e.name for e in load_catalog(isolated.catalog_path).entries]
    before, types = scrape(app)
    with db.session_scope(write=True) as session:
        run = WorkflowRun(name="metrics", status=WorkflowStatus.cancelled, spec={})
        session.add(run)
        session.flush()
        for position, step_id in enumerate(("a", "b")):
            session.add(
                StepRun(
                    workflow_id=run.id,
                    step_id=step_id,
                    position=position,
                    kind="generate",
                    model="tiny-chat",
                    status=StepStatus.skipped,
                )
            )
    get_redis().rpush(queue_for("tiny-chat"), "m1", "m2", "m3")
    live.register_worker("tiny-chat@metrics-test:1", {"model": "tiny-chat"}, 30)
    after, _ = scrape(app)

    assert types == {
        "corral_workflows": "gauge",
        "corral_steps": "gauge",
        "corral_queue_length": "gauge",
        "corral_workers": "gauge",
        "corral_gc_frozen_objects": "gauge",
        "python_gc_objects_collected": "counter",
        "python_gc_objects_uncollectable": "counter",
        "python_gc_collections": "counter",
    }

    def status(name: str, value: str) -> tuple[str, frozenset[tuple[str, str]]]:
        return name, frozenset({("status", value)})

    def model(name: str, value: str) -> tuple[str, frozenset[tuple[str, str]]]:
        return name, frozenset({("model", value)})

    # Every status has a series, zero when no run has it.
    for w in WorkflowStatus:
        expected = before[status("corral_workflows", w.value)] + (w is WorkflowStatus.cancelled)
        assert after[status("corral_workflows", w.value)] == expected, w
    for s in StepStatus:
        expected = before[status("corral_steps", s.value)] + 2 * (s is StepStatus.skipped)
        assert after[status("corral_steps", s.value)] == expected, s
    # Every catalog model has a queue and a worker count (this test's Redis database).
    for name in models:
        assert after[model("corral_queue_length", name)] == (3 if name == "tiny-chat" else 0)
        assert after[model("corral_workers", name)] == (1 if name == "tiny-chat" else 0)
    assert after[("corral_gc_frozen_objects", frozenset())] == gc.get_freeze_count()
    for generation in ("0", "1", "2"):
        key = ("python_gc_collections_total", frozenset({("generation", generation)}))
        assert after[key] >= before[key]
