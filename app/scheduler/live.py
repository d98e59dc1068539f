"""The registry of running worker pools in Redis: each worker's heartbeat and model."""

from __future__ import annotations

import json
import os
import time
from typing import Any

from app.core.config import get_settings
from app.core.redis import get_redis

WORKER_KEY = "corral:worker:{hostname}"
# (Redis URL, pid): (read at, workers), the live-pool view last read from that Redis
_live_cache: dict[tuple[str, int], tuple[float, list[dict[str, Any]]]] = {}


def register_worker(hostname: str, info: dict[str, Any], ttl_s: float) -> None:
    """Announce (or renew) a live worker and its loaded model for ``ttl_s`` seconds."""
    get_redis().set(WORKER_KEY.format(hostname=hostname), json.dumps(info), ex=max(1, int(ttl_s)))


def unregister_worker(hostname: str) -> None:
    get_redis().delete(WORKER_KEY.format(hostname=hostname))


# How old a live-pool view the hot paths accept (each submit and each send asks):
# heartbeats are seconds apart, so a second-old view is as good as a fresh one.
VIEW_MAX_AGE_S = 1.0


def live_workers(max_age_s: float = 0.0) -> list[dict[str, Any]]:
    """Every worker whose heartbeat has not expired.

    ``max_age_s`` > 0 accepts an answer read that recently by this process (hot paths: each
    submit and each dispatch asks; heartbeats are seconds apart, so a second-old view
    is as good, and it saves a SCAN of the keyspace and an MGET per call).
    """
    now = time.monotonic()
    view = (get_settings().broker_url, os.getpid())
    cached = _live_cache.get(view)
    if max_age_s > 0 and cached is not None and now - cached[0] < max_age_s:
        return cached[1]
    client = get_redis()
    keys = sorted(client.scan_iter(match=WORKER_KEY.format(hostname="*"), count=500))
    workers = [json.loads(v) for v in client.mget(keys) if v is not None] if keys else []
    _live_cache[view] = (now, workers)
    return workers


def pool_contexts(max_age_s: float = 0.0) -> dict[str, int]:
    """For each model with a live pool, the largest context any of its workers serves."""
    out: dict[str, int] = {}
    for w in live_workers(max_age_s):
        model, n_ctx = w.get("model"), w.get("n_ctx")
        if isinstance(model, str) and isinstance(n_ctx, int):
            out[model] = max(out.get(model, 0), n_ctx)
    return out
