"""The registry of running worker pools in Redis: each worker's heartbeat and model.

A live worker's key expires three heartbeats after its last one. Each heartbeat is also
kept in the hash ``corral:workers:seen`` (a clean exit removes it), so that a pool whose
heartbeat stopped stays visible, with the age of its last one, until governance forgets it.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from app.core.config import get_settings
from app.core.redis import get_redis

WORKER_KEY = "corral:worker:{hostname}"
SEEN_KEY = "corral:workers:seen"
# (Redis URL, pid): (read at, workers), the live-pool view last read from that Redis
_live_cache: dict[tuple[str, int], tuple[float, list[dict[str, Any]]]] = {}


def register_worker(hostname: str, info: dict[str, Any], ttl_s: float) -> None:
    """Announce (or renew) a live worker and its loaded model for ``ttl_s`` seconds."""
    body = json.dumps({**info, "heartbeat_at": time.time()})
    pipe = get_redis().pipeline(transaction=False)
    pipe.set(WORKER_KEY.format(hostname=hostname), body, ex=max(1, int(ttl_s)))
    pipe.hset(SEEN_KEY, hostname, body)
    pipe.execute()


def unregister_worker(hostname: str) -> None:
    """A clean exit: the worker is neither live nor missed."""
    pipe = get_redis().pipeline(transaction=False)
    pipe.delete(WORKER_KEY.format(hostname=hostname))
    pipe.hdel(SEEN_KEY, hostname)
    pipe.execute()


def seen_workers(forget_after_s: float) -> list[dict[str, Any]]:
    """Every worker that sent a heartbeat in the last ``forget_after_s`` seconds and did
    not exit cleanly, live or not, each with its ``heartbeat_at``; older ones are dropped."""
    client = get_redis()
    now = time.time()
    out, stale = [], []
    for worker, raw in client.hgetall(SEEN_KEY).items():
        info = json.loads(raw)
        if now - float(info.get("heartbeat_at", 0)) > forget_after_s:
            stale.append(worker)
        else:
            out.append(info)
    if stale:
        client.hdel(SEEN_KEY, *stale)
    return out


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
