"""The model catalog, with which files are present and which pools are live, and each
model's step figures over a window (OpenAI's model list is ``/v1/models``, in
:mod:`app.api.routes.openai_compat`)."""

from __future__ import annotations

import dataclasses
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Annotated

from fastapi import APIRouter, Query
from pydantic import BaseModel, Field

from app.api.deps import ApiKeyDep, CatalogDep, SettingsDep
from app.governance import model_stats
from app.scheduler import live
from app.workflows.schemas import ModelPublic

router = APIRouter(prefix="/v1/catalog", tags=["models"])


@router.get("", response_model=list[ModelPublic])
def list_models(_key: ApiKeyDep, catalog: CatalogDep, settings: SettingsDep) -> list[ModelPublic]:
    """Every catalog model: kind, context, whether its GGUF is here, live workers."""
    workers = Counter(w.get("model") for w in live.live_workers())
    out = []
    for entry in catalog.entries:
        path = catalog.path_for(entry, settings.models_path)
        out.append(
            ModelPublic(
                name=entry.name,
                kind=entry.kind,
                description=entry.description,
                n_ctx=entry.n_ctx,
                context_length=entry.context_length,
                file=entry.file,
                present=path.is_file(),
                size_bytes=entry.size_bytes,
                workers=workers.get(entry.name, 0),
                queue=f"model.{entry.name}",
            )
        )
    return out


# The widest window GET /v1/catalog/{model}/stats reads: a week.
MAX_STATS_WINDOW_S = 7 * 86400.0


class ModelStats(BaseModel):
    """A model's steps that succeeded or failed within the window, in figures (null where
    no step gives one)."""

    model: str
    window_s: float
    steps_finished: int = Field(description="steps that succeeded or failed")
    succeeded: int
    failed: int
    success_rate: float | None = Field(description="succeeded / finished")
    error_rate: float | None = Field(description="failed / finished")
    latency_p50_s: float | None = Field(description="queued → finished, median")
    latency_p95_s: float | None
    latency_p99_s: float | None
    duration_p50_s: float | None = Field(description="started → finished (last attempt)")
    duration_p95_s: float | None
    queue_wait_p50_s: float | None = Field(description="queued → started (last attempt)")
    ttft_p50_s: float | None = Field(
        description="time to first token: prompt evaluation of generate and chat steps"
    )
    ttft_p95_s: float | None
    tokens_per_s: float | None = Field(
        description="completion tokens / seconds from start to finish of the succeeded steps"
    )
    prompt_tokens: int = Field(description="of the succeeded steps")
    completion_tokens: int = Field(description="of the succeeded steps")


@router.get("/{model}/stats", response_model=ModelStats)
def stats(
    model: str,
    _key: ApiKeyDep,
    catalog: CatalogDep,
    settings: SettingsDep,
    window_s: Annotated[
        float | None,
        Query(
            ge=1,
            le=MAX_STATS_WINDOW_S,
            description="seconds back from now (default CORRAL_GOVERNANCE_WINDOW_S)",
        ),
    ] = None,
) -> ModelStats:
    """The model's steps that finished within the last ``window_s`` seconds, from the
    database: counts, success and error rates, latency, duration, queue wait and time to
    first token percentiles, tokens/s and tokens. 404 for a model not in the catalog."""
    entry = catalog.get(model)
    window = window_s if window_s is not None else settings.governance_window_s
    since = datetime.now(UTC) - timedelta(seconds=window)
    figures = model_stats.step_figures(model_stats.finished_steps(since, entry.name))
    return ModelStats(model=entry.name, window_s=window, **dataclasses.asdict(figures))
