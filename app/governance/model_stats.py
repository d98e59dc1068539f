"""Per-model step figures: cumulative counters in Redis, and windowed ones from the database.

**Counters** (:func:`record_step`, :func:`read_counters`). When a step attempt ends, its
worker adds it to the hash ``corral:model_stats`` in one MULTI/EXEC, whatever host or
process ran it, so every API process exports the same figures on ``/metrics``:

- the attempt's outcome (``succeeded``, ``failed``, ``retrying``, ``cancelled``,
  ``discarded``) by model and kind;
- the prompt and completion tokens of a succeeded attempt;
- histogram buckets and sums of the attempt's duration (started → finished), its queue
  wait (queued → started) and its time to first token (the output's ``prompt_ms``:
  prompt evaluation, the queue wait excluded; generate and chat steps).

A field is a JSON list: ``["outcome", model, kind, outcome]``, ``["tokens", model, kind,
"prompt"|"completion"]``, ``[histogram, model, kind, le]`` (the count of observations in
that bucket alone; :func:`read_counters` accumulates them) and ``[histogram, model, kind,
"sum"]``. Nothing is ever reset, so Prometheus' ``rate()`` applies; a step counts for the
model its row names (a routed step's output says which model answered).

**Windows** (:func:`finished_steps`, :func:`step_figures`). The steps that finished
(succeeded or failed) within a window, read from the database, and what governance and
``GET /v1/catalog/{model}/stats`` compute from them: counts, rates, percentiles, tokens.
"""

from __future__ import annotations

import json
import math
import statistics
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import select

from app.core.redis import get_redis
from app.store import db
from app.store.queries import STEP
from app.store.tables import StepStatus

KEY = "corral:model_stats"

# Upper bounds (seconds) of every histogram's buckets: from a tiny model's prompt to a
# long generation on a loaded GPU; 3 s is the built-in response-time rule's threshold.
BUCKETS: tuple[float, ...] = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.0,
    3.0,
    5.0,
    10.0,
    20.0,
    30.0,
    60.0,
    120.0,
    300.0,
    600.0,
    math.inf,
)
# The bucket labels, as Prometheus writes them: "0.005" … "600.0", "+Inf".
_LE = ["+Inf" if math.isinf(b) else repr(b) for b in BUCKETS]

# The histograms, by their name in Redis.
HISTOGRAMS = ("duration", "queue_wait", "ttft")

# The step kinds whose output's prompt_ms is a time to first token.
_TTFT_KINDS = ("generate", "chat")


def _field(*parts: str) -> str:
    return json.dumps(parts, separators=(",", ":"))


def _bucket(value: float) -> str:
    """The label of the first bucket whose upper bound holds ``value``."""
    for bound, le in zip(BUCKETS, _LE, strict=True):
        if value <= bound:
            return le
    return _LE[-1]  # NaN


def record_step(
    *,
    model: str,
    kind: str,
    outcome: str,
    duration_s: float,
    queue_wait_s: float,
    output: Mapping[str, Any] | None = None,
) -> None:
    """Add one ended step attempt to the counters, in one MULTI/EXEC.

    ``output`` is the attempt's output when it succeeded: its tokens and, for generate and
    chat steps, its ``timings.prompt_ms`` (the time to first token) count too. Raises
    RedisError or OSError when Redis cannot be written.
    """
    observed = {"duration": max(0.0, duration_s), "queue_wait": max(0.0, queue_wait_s)}
    pipe = get_redis().pipeline(transaction=True)
    pipe.hincrby(KEY, _field("outcome", model, kind, outcome), 1)
    if output is not None:
        for which in ("prompt", "completion"):
            tokens = output.get(f"{which}_tokens")
            if isinstance(tokens, int) and tokens >= 0:
                pipe.hincrby(KEY, _field("tokens", model, kind, which), tokens)
        prompt_ms = (output.get("timings") or {}).get("prompt_ms")
        if kind in _TTFT_KINDS and isinstance(prompt_ms, int | float):
            observed["ttft"] = max(0.0, float(prompt_ms) / 1000)
    for name, value in observed.items():
        pipe.hincrby(KEY, _field(name, model, kind, _bucket(value)), 1)
        pipe.hincrbyfloat(KEY, _field(name, model, kind, "sum"), value)
    pipe.execute()


@dataclass(frozen=True)
class Histogram:
    """One (model, kind)'s histogram: cumulative counts per upper bound (``+Inf`` last, the
    count of every observation) and the sum of the observations."""

    buckets: list[tuple[str, int]]
    sum: float

    @property
    def count(self) -> int:
        """How many observations it holds."""
        return self.buckets[-1][1]


@dataclass
class Counters:
    """Everything :func:`record_step` counted, keyed by (model, kind[, outcome])."""

    outcomes: dict[tuple[str, str, str], int] = field(default_factory=dict)
    prompt_tokens: dict[tuple[str, str], int] = field(default_factory=dict)
    completion_tokens: dict[tuple[str, str], int] = field(default_factory=dict)
    histograms: dict[str, dict[tuple[str, str], Histogram]] = field(default_factory=dict)


def read_counters() -> Counters:
    """The counters as they stand now (one HGETALL). Raises RedisError or OSError."""
    raw: dict[bytes | str, bytes | str] = get_redis().hgetall(KEY)
    out = Counters(histograms={name: {} for name in HISTOGRAMS})
    per_bucket: dict[tuple[str, str, str], dict[str, int]] = defaultdict(dict)
    sums: dict[tuple[str, str, str], float] = {}
    for key, value in raw.items():
        parts = json.loads(key)
        if len(parts) != 4:
            continue
        name, model, kind, last = (str(p) for p in parts)
        if name == "outcome":
            out.outcomes[(model, kind, last)] = int(value)
        elif name == "tokens":
            which = out.prompt_tokens if last == "prompt" else out.completion_tokens
            which[(model, kind)] = int(value)
        elif name in out.histograms and last == "sum":
            sums[(name, model, kind)] = float(value)
        elif name in out.histograms:
            per_bucket[(name, model, kind)][last] = int(value)
    for (name, model, kind), counts in per_bucket.items():
        total, buckets = 0, []
        for le in _LE:
            total += counts.get(le, 0)
            buckets.append((le, total))
        out.histograms[name][(model, kind)] = Histogram(buckets, sums.get((name, model, kind), 0.0))
    return out


# ---- windows, from the database ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FinishedStep:
    """What the windowed figures read of one step that succeeded or failed."""

    model: str
    kind: str
    status: StepStatus
    fed: bool  # it depends on another step
    queued_at: datetime | None
    started_at: datetime | None
    finished_at: datetime
    prompt_tokens: int | None
    completion_tokens: int | None
    prompt_ms: float | None


def finished_steps(since: datetime, model: str | None = None) -> list[FinishedStep]:
    """The steps (of ``model``, or every model) that succeeded or failed at ``since`` or
    later, in one query. Raises ServiceUnavailable when the database is down."""
    s = STEP.c
    query = select(
        s.model,
        s.kind,
        s.status,
        s.depends_on,
        s.queued_at,
        s.started_at,
        s.finished_at,
        s.output["prompt_tokens"].as_integer(),
        s.output["completion_tokens"].as_integer(),
        s.output[("timings", "prompt_ms")].as_float(),
    ).where(s.finished_at >= since, s.status.in_((StepStatus.succeeded, StepStatus.failed)))
    if model is not None:
        query = query.where(s.model == model)
    with db.session_scope() as session:
        return [
            FinishedStep(r[0], r[1], StepStatus(r[2]), bool(r[3]), *r[4:])
            for r in session.execute(query)
        ]


@dataclass(frozen=True)
class StepFigures:
    """A set of finished steps in figures (None where no step gives the figure)."""

    steps_finished: int
    succeeded: int
    failed: int
    success_rate: float | None
    error_rate: float | None
    latency_p50_s: float | None  # queued → finished
    latency_p95_s: float | None
    latency_p99_s: float | None
    duration_p50_s: float | None  # started → finished
    duration_p95_s: float | None
    queue_wait_p50_s: float | None  # queued → started
    ttft_p50_s: float | None  # prompt evaluation (generate and chat steps that succeeded)
    ttft_p95_s: float | None
    tokens_per_s: float | None  # completion tokens / (finished − started), succeeded steps
    prompt_tokens: int
    completion_tokens: int


def step_figures(steps: Iterable[FinishedStep]) -> StepFigures:
    """The figures of ``steps``: medians are :func:`statistics.median`, other percentiles
    are nearest-rank (:func:`percentile`)."""
    steps = list(steps)
    ok = [r for r in steps if r.status is StepStatus.succeeded]
    failed = len(steps) - len(ok)
    latency = _spans(steps, "queued_at", "finished_at")
    duration = _spans(steps, "started_at", "finished_at")
    queue_wait = _spans(steps, "queued_at", "started_at")
    ttft = sorted(
        r.prompt_ms / 1000 for r in ok if r.prompt_ms is not None and r.kind in _TTFT_KINDS
    )
    tokens = sum(r.completion_tokens or 0 for r in ok)
    gen_s = sum(
        (r.finished_at - r.started_at).total_seconds()
        for r in ok
        if r.started_at is not None and r.completion_tokens
    )
    return StepFigures(
        steps_finished=len(steps),
        succeeded=len(ok),
        failed=failed,
        success_rate=len(ok) / len(steps) if steps else None,
        error_rate=failed / len(steps) if steps else None,
        latency_p50_s=statistics.median(latency) if latency else None,
        latency_p95_s=percentile(latency, 0.95),
        latency_p99_s=percentile(latency, 0.99),
        duration_p50_s=statistics.median(duration) if duration else None,
        duration_p95_s=percentile(duration, 0.95),
        queue_wait_p50_s=statistics.median(queue_wait) if queue_wait else None,
        ttft_p50_s=statistics.median(ttft) if ttft else None,
        ttft_p95_s=percentile(ttft, 0.95),
        tokens_per_s=tokens / gen_s if gen_s > 0 else None,
        prompt_tokens=sum(r.prompt_tokens or 0 for r in ok),
        completion_tokens=tokens,
    )


def _spans(steps: list[FinishedStep], start: str, end: str) -> list[float]:
    """The seconds from ``start`` to ``end`` of each step that has both, ascending."""
    out = []
    for r in steps:
        a, b = getattr(r, start), getattr(r, end)
        if a is not None and b is not None:
            out.append((b - a).total_seconds())
    return sorted(out)


def percentile(ordered: list[float], q: float) -> float | None:
    """The nearest-rank ``q`` percentile of an ascending list (None when it is empty)."""
    if not ordered:
        return None
    rank = max(1, min(len(ordered), math.ceil(q * len(ordered))))
    return ordered[rank - 1]
