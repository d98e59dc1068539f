"""Metrics per model, on the real database (SQLite, and PostgreSQL when configured) and
Redis: steps run through the worker's own code path (``run_step`` with llama.cpp on the
tiny models) add to the counters in Redis, /metrics exports them as histograms and
counters that match the steps' rows, and ``GET /v1/catalog/{model}/stats`` computes its
figures from those rows."""

from __future__ import annotations

import asyncio
import logging
import math
import statistics
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from sqlmodel import col, select

from app.api.routes import metrics
from app.core.config import Settings, use_settings
from app.core.redis import get_redis
from app.governance import model_stats
from app.governance.metrics import gather
from app.store import db
from app.store.tables import StepRun, StepStatus
from app.workflows import engine, service
from models.catalog import load_catalog
from tests.api.test_metrics import Samples, scrape
from tests.utils.asgi import api
from tests.utils.workflows import gen, submit
from workers.runtime import LlamaCppRuntime
from workers.steps import run_step

CATALOG = Path(__file__).parents[2] / "models" / "catalog.yaml"
WEEK_S = 7 * 86400
# The most a worker's clock reading may trail the row it just stored (the commit's
# notices and sends come between them).
SLACK_S = 0.5


@pytest.fixture(scope="module")
def runtimes(models_dir: Path) -> Iterator[dict[str, LlamaCppRuntime]]:
    """tiny-chat and tiny-embed loaded in llama.cpp, once per module."""
    catalog = load_catalog(CATALOG)
    out = {
        name: LlamaCppRuntime(catalog.get(name), catalog.path_for(name, models_dir))
        for name in ("tiny-chat", "tiny-embed")
    }
    yield out
    for runtime in out.values():
        runtime.close()


@dataclass(frozen=True)
class Attempt:
    """One attempt as its step's row tells it, read around ``run_step``."""

    model: str
    kind: str
    outcome: str
    queue_wait_s: float  # the row's queued_at (before) → started_at (after)
    duration_s: float  # started_at → finished_at (updated_at while retrying)
    output: dict[str, Any] | None


def row(step_run_id: str) -> StepRun:
    with db.session_scope() as session:
        found = session.get(StepRun, step_run_id)
        assert found is not None
        return found


def step_of(workflow_id: str, step_id: str) -> str:
    _, rows = engine.read(workflow_id, None)
    return next(r.id for r in rows if r.step_id == step_id)


def attempt(step_run_id: str, n: int, runtime: LlamaCppRuntime) -> Attempt:
    """Run attempt ``n`` of a step through the worker's code path; what its row says."""
    queued_at = row(step_run_id).queued_at
    outcome = run_step(step_run_id, n, runtime)
    after = row(step_run_id)
    end = after.finished_at or after.updated_at
    assert queued_at is not None and after.started_at is not None and end is not None
    return Attempt(
        after.model,
        after.kind,
        outcome,
        (after.started_at - queued_at).total_seconds(),
        (end - after.started_at).total_seconds(),
        after.output if outcome == "succeeded" else None,
    )


def chat(step_id: str) -> dict[str, Any]:
    inp = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 6, "temperature": 0}
    return {"id": step_id, "kind": "chat", "model": "tiny-chat", "input": inp}


def embed(step_id: str) -> dict[str, Any]:
    return {"id": step_id, "kind": "embed", "model": "tiny-embed", "input": {"texts": ["a b c"]}}


def run_mix(settings: Settings, runtimes: dict[str, LlamaCppRuntime]) -> list[Attempt]:
    """Steps of every outcome but a cancel: a generate step that succeeds, one that fails
    once (an injected fault) and then succeeds, one that fails for good, a chat step and
    an embed step."""
    chat_rt, embed_rt = runtimes["tiny-chat"], runtimes["tiny-embed"]
    retry = {"max_attempts": 2, "backoff_s": 1, "max_backoff_s": 1}
    a = step_of(submit(settings, gen("a", max_tokens=8)), "a")
    b = step_of(submit(settings, gen("b", retry=retry)), "b")
    c = step_of(submit(settings, gen("c")), "c")
    d = step_of(submit(settings, chat("d")), "d")
    e = step_of(submit(settings, embed("e")), "e")
    with use_settings(settings.model_copy(update={"fault_injection": "b:1,c:1"})):
        done = [
            attempt(a, 1, chat_rt),
            attempt(b, 1, chat_rt),
            attempt(b, 2, chat_rt),
            attempt(c, 1, chat_rt),
            attempt(d, 1, chat_rt),
            attempt(e, 1, embed_rt),
        ]
    outcomes = " ".join(x.outcome for x in done)
    assert outcomes == "succeeded retrying succeeded failed succeeded succeeded"
    return done


METRICS_APP = FastAPI()
METRICS_APP.include_router(metrics.router)


def histogram(samples: Samples, name: str, model: str, kind: str) -> tuple[dict[str, float], float]:
    """A scraped histogram series: its cumulative count per ``le``, and its sum."""
    series = {("model", model), ("kind", kind)}
    buckets = {
        dict(labels)["le"]: value
        for (sample, labels), value in samples.items()
        if sample == f"{name}_bucket" and series <= labels
    }
    assert samples[(f"{name}_count", frozenset(series))] == buckets["+Inf"]
    return buckets, samples[(f"{name}_sum", frozenset(series))]


def cumulative(values: list[float]) -> dict[str, float]:
    """The cumulative bucket counts Prometheus expects of ``values``, "+Inf" last."""
    bounds = ("+Inf" if math.isinf(b) else repr(b) for b in model_stats.BUCKETS)
    return {le: float(sum(v <= float(le) for v in values)) for le in bounds}


def test_steps_are_counted_in_redis_and_exported_as_their_rows_say(
    isolated: Settings, runtimes: dict[str, LlamaCppRuntime]
) -> None:
    done = run_mix(isolated, runtimes)
    samples, types = scrape(METRICS_APP)

    by_series: dict[tuple[str, str], list[Attempt]] = defaultdict(list)
    for x in done:
        by_series[(x.model, x.kind)].append(x)
    assert set(by_series) == {
        ("tiny-chat", "generate"),
        ("tiny-chat", "chat"),
        ("tiny-embed", "embed"),
    }
    for (model, kind), attempts in by_series.items():
        # Queue wait: exactly the rows' queued → started of each attempt.
        waits = [x.queue_wait_s for x in attempts]
        buckets, total = histogram(samples, "corral_step_queue_wait_seconds", model, kind)
        assert buckets == cumulative(waits)
        assert total == pytest.approx(sum(waits), abs=1e-6)
        # Duration: each attempt counted once; the worker reads its clock once the row is
        # stored, so each is at least the row's started → finished, and barely more.
        buckets, total = histogram(samples, "corral_step_duration_seconds", model, kind)
        assert buckets["+Inf"] == len(attempts)
        rows_total = sum(x.duration_s for x in attempts)
        assert rows_total - 1e-6 <= total <= rows_total + SLACK_S * len(attempts)
        # Time to first token: the prompt evaluation of generate and chat steps that
        # succeeded, from their outputs; none for embed steps.
        name = "corral_step_time_to_first_token_seconds"
        if kind == "embed":
            assert not any(s == f"{name}_count" and ("model", model) in ls for s, ls in samples)
        else:
            ttft = [x.output["timings"]["prompt_ms"] / 1000 for x in attempts if x.output]
            assert ttft and all(v > 0 for v in ttft)
            buckets, total = histogram(samples, name, model, kind)
            assert buckets == cumulative(ttft)
            assert total == pytest.approx(sum(ttft), abs=1e-6)
        # Tokens: what the succeeded outputs say.
        for which in ("prompt", "completion"):
            expected = sum(x.output.get(f"{which}_tokens", 0) for x in attempts if x.output)
            key = (f"corral_{which}_tokens_total", frozenset({("model", model), ("kind", kind)}))
            if kind == "embed" and which == "completion":
                assert key not in samples
            else:
                assert expected > 0 and samples[key] == expected

    outcomes = {
        tuple(dict(labels)[k] for k in ("model", "kind", "outcome")): value
        for (name, labels), value in samples.items()
        if name == "corral_step_outcomes_total"
    }
    assert outcomes == {
        ("tiny-chat", "generate", "succeeded"): 2,
        ("tiny-chat", "generate", "retrying"): 1,
        ("tiny-chat", "generate", "failed"): 1,
        ("tiny-chat", "chat", "succeeded"): 1,
        ("tiny-embed", "embed", "succeeded"): 1,
    }
    assert types["corral_step_outcomes"] == "counter"
    assert types["corral_step_duration_seconds"] == "histogram"

    # The counters are cumulative: another step adds to them.
    run_step(step_of(submit(isolated, gen("f")), "f"), 1, runtimes["tiny-chat"])
    again, _ = scrape(METRICS_APP)
    key = (
        "corral_step_outcomes_total",
        frozenset({("model", "tiny-chat"), ("kind", "generate"), ("outcome", "succeeded")}),
    )
    assert again[key] == 3


def test_a_cancelled_attempt_is_counted(
    isolated: Settings, runtimes: dict[str, LlamaCppRuntime]
) -> None:
    long = gen("a", prompt="Go", max_tokens=8000)
    long["input"]["ignore_eos"] = True
    wid = submit(isolated, long)
    sid = step_of(wid, "a")

    def cancel_once_running() -> None:
        deadline = time.monotonic() + 60
        while row(sid).status is not StepStatus.running:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        service.cancel(wid, None)

    canceller = threading.Thread(target=cancel_once_running)
    canceller.start()
    try:
        done = attempt(sid, 1, runtimes["tiny-chat"])
    finally:
        canceller.join()
    assert done.outcome == "cancelled"

    samples, _ = scrape(METRICS_APP)
    series = {("model", "tiny-chat"), ("kind", "generate")}
    assert samples[("corral_step_outcomes_total", frozenset({*series, ("outcome", "cancelled")}))]
    buckets, total = histogram(samples, "corral_step_duration_seconds", "tiny-chat", "generate")
    assert buckets["+Inf"] == 1 and done.duration_s - 1e-6 <= total
    assert not any(name == "corral_prompt_tokens_total" for name, _ in samples)


def test_a_redis_failure_while_counting_is_logged_and_the_result_stands(
    isolated: Settings, runtimes: dict[str, LlamaCppRuntime], caplog: pytest.LogCaptureFixture
) -> None:
    get_redis().set(model_stats.KEY, "not a hash")  # every HINCRBY on it fails: WRONGTYPE
    sid = step_of(submit(isolated, gen("a")), "a")
    with caplog.at_level(logging.WARNING, logger="workers.steps"):
        assert run_step(sid, 1, runtimes["tiny-chat"]) == "succeeded"
    stored = row(sid)
    assert stored.status is StepStatus.succeeded and stored.output is not None
    assert any("could not count step a attempt 1" in r.getMessage() for r in caplog.records)
    # The collector skips what it cannot read; /metrics still answers.
    samples, types = scrape(METRICS_APP)
    assert types["corral_step_outcomes"] == "counter"
    assert not any(name == "corral_step_outcomes_total" for name, _ in samples)


# ---- GET /v1/catalog/{model}/stats ------------------------------------------------------


def nearest_rank(values: list[float], q: float) -> float | None:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)] if ordered else None


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def expected_stats(model: str, since: datetime) -> dict[str, Any]:
    """The figures of ``model``'s steps that succeeded or failed since ``since``, computed
    here from their rows."""
    with db.session_scope() as session:
        rows = session.exec(
            select(StepRun).where(
                StepRun.model == model,
                col(StepRun.finished_at) >= since,
                col(StepRun.status).in_([StepStatus.succeeded, StepStatus.failed]),
            )
        ).all()
    ok = [r for r in rows if r.status is StepStatus.succeeded]

    def spans(start: str, end: str) -> list[float]:
        pairs = [(getattr(r, start), getattr(r, end)) for r in rows]
        return [(b - a).total_seconds() for a, b in pairs if a is not None and b is not None]

    latency = spans("queued_at", "finished_at")
    duration = spans("started_at", "finished_at")
    outputs = [r.output or {} for r in ok]
    ttft = [
        o["timings"]["prompt_ms"] / 1000
        for r, o in zip(ok, outputs, strict=True)
        if r.kind in ("generate", "chat") and "prompt_ms" in o.get("timings", {})
    ]
    gen_s = sum(
        (r.finished_at - r.started_at).total_seconds()
        for r, o in zip(ok, outputs, strict=True)
        if r.finished_at and r.started_at and o.get("completion_tokens")
    )
    completion = sum(o.get("completion_tokens", 0) for o in outputs)
    n = len(rows)
    return {
        "steps_finished": n,
        "succeeded": len(ok),
        "failed": n - len(ok),
        "success_rate": len(ok) / n if n else None,
        "error_rate": (n - len(ok)) / n if n else None,
        "latency_p50_s": median(latency),
        "latency_p95_s": nearest_rank(latency, 0.95),
        "latency_p99_s": nearest_rank(latency, 0.99),
        "duration_p50_s": median(duration),
        "duration_p95_s": nearest_rank(duration, 0.95),
        "queue_wait_p50_s": median(spans("queued_at", "started_at")),
        "ttft_p50_s": median(ttft),
        "ttft_p95_s": nearest_rank(ttft, 0.95),
        "tokens_per_s": completion / gen_s if gen_s > 0 else None,
        "prompt_tokens": sum(o.get("prompt_tokens", 0) for o in outputs),
        "completion_tokens": completion,
    }


def test_the_stats_route_computes_its_figures_from_the_step_rows(
    isolated: Settings, runtimes: dict[str, LlamaCppRuntime]
) -> None:
    run_mix(isolated, runtimes)
    since = datetime.now(UTC) - timedelta(seconds=WEEK_S)

    async def go() -> dict[str, httpx.Response]:
        async with api("stats") as client:
            out = {
                model: await client.get(f"/v1/catalog/{model}/stats?window_s={WEEK_S}")
                for model in ("tiny-chat", "tiny-embed")
            }
            out["default"] = await client.get("/v1/catalog/tiny-chat/stats")
            await asyncio.sleep(1.1)  # nothing finishes in the last second now
            out["recent"] = await client.get("/v1/catalog/tiny-chat/stats?window_s=1")
            return out

    got = asyncio.run(go())
    for model in ("tiny-chat", "tiny-embed"):
        assert got[model].status_code == 200, got[model].text
        body = got[model].json()
        assert body.pop("window_s") == WEEK_S and body.pop("model") == model
        expected = expected_stats(model, since)
        assert body.keys() == expected.keys()
        for figure, value in expected.items():
            if value is None:
                assert body[figure] is None, (model, figure)
            else:
                assert body[figure] == pytest.approx(value, rel=1e-9), (model, figure)
    chat_stats = got["tiny-chat"].json()
    assert chat_stats["failed"] >= 1 and chat_stats["ttft_p50_s"] > 0
    assert got["tiny-embed"].json()["ttft_p50_s"] is None  # embed steps have no first token

    # The default window is governance's, and the snapshot agrees with the route.
    default = got["default"].json()
    assert default["window_s"] == isolated.governance_window_s
    snap = gather(windows={float(WEEK_S)})
    for metric, figure in (
        ("steps_finished", "steps_finished"),
        ("step_error_rate", "error_rate"),
        ("step_latency_p50_s", "latency_p50_s"),
        ("step_latency_p95_s", "latency_p95_s"),
        ("tokens_per_s", "tokens_per_s"),
    ):
        (sample,) = [
            s for s in snap.samples(metric, float(WEEK_S)) if s.labels == {"model": "tiny-chat"}
        ]
        assert sample.value == pytest.approx(chat_stats[figure], rel=1e-9), metric

    recent = got["recent"].json()
    assert recent["steps_finished"] == 0 and recent["prompt_tokens"] == 0
    assert recent["success_rate"] is None and recent["latency_p50_s"] is None


def test_the_stats_route_refuses_an_unknown_model_and_a_bad_window(isolated: Settings) -> None:
    async def go() -> list[httpx.Response]:
        async with api("stats-errors") as client:
            out = [await client.get("/v1/catalog/no-such-model/stats")]
            for window in ("0", "0.5", str(WEEK_S + 1), "abc", "nan", "inf", "-5"):
                out.append(await client.get(f"/v1/catalog/tiny-chat/stats?window_s={window}"))
            client.headers.pop("Authorization")
            out.append(await client.get("/v1/catalog/tiny-chat/stats"))
            return out

    unknown, *bad, anonymous = asyncio.run(go())
    assert unknown.status_code == 404 and "no-such-model" in unknown.json()["detail"]
    for resp in bad:
        assert resp.status_code == 422, (resp.request.url, resp.text)
        assert resp.json()["detail"][0]["loc"] == ["query", "window_s"]
    assert anonymous.status_code == 401
