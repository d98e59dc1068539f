"""GET /metrics: prometheus_client's registry, read at scrape time from the database,
Redis (queues, live workers, the per-model step counters) and this process's garbage
collector; and the Grafana dashboard, which must name only metrics /metrics exports."""

from __future__ import annotations

import asyncio
import gc
import json
import re
from pathlib import Path
from typing import Any

import httpx
from fastapi import FastAPI
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families

from app.api.routes import metrics
from app.core.config import Settings
from app.core.redis import get_redis
from app.governance.metrics import METRICS
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
    live.register_worker("tiny-chat@metrics-test:2", {"model": "tiny-chat", "busy": True}, 30)
    after, _ = scrape(app)

    # The governance snapshot's metrics and the open alerts are gauges beside these.
    governance = {f"corral_{m}" for m in METRICS} - {"corral_queue_depth", "corral_pools_live"}
    assert dict.fromkeys([*governance, "corral_alerts"], "gauge").items() <= types.items()
    assert {k: v for k, v in types.items() if k not in governance | {"corral_alerts"}} == {
        "corral_workflows": "gauge",
        "corral_steps": "gauge",
        "corral_queue_length": "gauge",
        "corral_workers": "gauge",
        "corral_gc_frozen_objects": "gauge",
        "corral_pools": "gauge",
        "corral_step_duration_seconds": "histogram",
        "corral_step_queue_wait_seconds": "histogram",
        "corral_step_time_to_first_token_seconds": "histogram",
        "corral_step_outcomes": "counter",
        "corral_prompt_tokens": "counter",
        "corral_completion_tokens": "counter",
        "corral_pool_loads": "counter",
        "corral_pool_unloads": "counter",
        "corral_pool_evictions": "counter",
        "corral_pool_moves": "counter",
        "corral_pool_cold_start_seconds": "summary",
        "corral_pool_cold_start_last_seconds": "gauge",
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
        assert after[model("corral_workers", name)] == (2 if name == "tiny-chat" else 0)
        for state, n in (("busy", 1), ("idle", 1)):
            key = ("corral_pools", frozenset({("model", name), ("state", state)}))
            assert after[key] == (n if name == "tiny-chat" else 0)
    assert after[("corral_gc_frozen_objects", frozenset())] == gc.get_freeze_count()
    for generation in ("0", "1", "2"):
        key = ("python_gc_collections_total", frozenset({("generation", generation)}))
        assert after[key] >= before[key]


DASHBOARD = Path(__file__).parents[2] / "deploy" / "grafana" / "corral.json"
# A metric name in a PromQL expression: Corral's own and the Python process's.
METRIC_NAME = re.compile(r"\b(?:corral|python)_[a-z0-9_]+\b")
# The sample names each family type exports beside (or instead of) the family's name.
SUFFIXES = {
    "gauge": ("",),
    "counter": ("_total",),
    "histogram": ("_bucket", "_sum", "_count"),
    "summary": ("_sum", "_count"),
}


def dashboard_queries(dashboard: dict[str, Any]) -> list[str]:
    """Every PromQL expression of the dashboard: its panels' targets and its variables'
    queries."""
    out = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            out += [variable["definition"], variable["query"]["query"]]
    return out


def test_the_grafana_dashboard_names_only_metrics_that_metrics_exports(isolated: Settings) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    app = FastAPI()
    app.include_router(metrics.router)
    _samples, types = scrape(app)
    exported = {f"{name}{suffix}" for name, kind in types.items() for suffix in SUFFIXES[kind]}

    queries = dashboard_queries(dashboard)
    used = {name for q in queries for name in METRIC_NAME.findall(q)}
    assert used and used <= exported, sorted(used - exported)
    # Every query reads the Prometheus data source the user picks.
    (variable,) = [v for v in dashboard["templating"]["list"] if v["type"] == "datasource"]
    assert variable["query"] == "prometheus"
    source = {"type": "prometheus", "uid": f"${{{variable['name']}}}"}
    for panel in dashboard["panels"]:
        assert panel["datasource"] == source, panel["title"]
        assert all(t["datasource"] == source for t in panel["targets"]), panel["title"]
    # The latency panels are quantiles over the rate of a histogram's buckets.
    for histogram in (n for n, kind in types.items() if kind == "histogram"):
        pattern = rf"histogram_quantile\(0\.95, sum by \(model, le\) \(rate\({histogram}_bucket"
        assert any(re.search(pattern, q) for q in queries), histogram
    titles = {p["title"] for p in dashboard["panels"]}
    for needed in ("Tokens/s", "Step outcomes", "Tokens rate", "Pools by state", "Open alerts"):
        assert needed in titles
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
