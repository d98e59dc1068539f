"""Where a model's steps go right now: fallback routes and paused queues, kept in Redis.

Governance sets both (``route_to_fallback``, ``pause_queue``), and anyone may read them:

- a **route** (a field of the hash ``corral:routes``) names a model's fallback of the same
  kind; the dispatcher sends new attempts of that model's steps to the fallback's queue and records
  the fallback on the step (``routed_to``) until the route is cleared;
- a **pause** (a field of ``corral:paused``) says the model's pools stop consuming its
  queue: steps wait on the queue, nothing is lost. A pool that starts while its model is paused
  consumes nothing until the pause ends.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from app.core.config import get_settings
from app.core.redis import get_redis

ROUTES_KEY = "corral:routes"
PAUSED_KEY = "corral:paused"
# How old a routes view the dispatcher accepts (it asks on every send).
VIEW_MAX_AGE_S = 1.0
_cache: dict[tuple[str, int], tuple[float, dict[str, str]]] = {}


def set_route(model: str, fallback: str, **why: Any) -> None:
    """Send new steps for ``model`` to ``fallback`` (``why``: the rule and alert)."""
    get_redis().hset(ROUTES_KEY, model, json.dumps({"fallback": fallback, **why}))
    _cache.clear()


def clear_route(model: str) -> bool:
    """Send ``model``'s steps to its own queue again; whether a route was set."""
    _cache.clear()
    return bool(get_redis().hdel(ROUTES_KEY, model))


def route_details() -> dict[str, dict[str, Any]]:
    """Every route in force: model → {fallback, rule, alert, ...}."""
    return _read(ROUTES_KEY)


def routes(max_age_s: float = 0.0) -> dict[str, str]:
    """model → fallback for every route in force (``max_age_s``: accept a view this process
    read that recently; the dispatcher's hot path asks on every send)."""
    view = (get_settings().broker_url, os.getpid())
    now = time.monotonic()
    cached = _cache.get(view)
    if max_age_s > 0 and cached is not None and now - cached[0] < max_age_s:
        return cached[1]
    out = {model: str(d["fallback"]) for model, d in route_details().items()}
    _cache[view] = (now, out)
    return out


def set_paused(model: str, paused: bool, **why: Any) -> None:
    """Record that ``model``'s queue is paused (or no longer)."""
    if paused:
        get_redis().hset(PAUSED_KEY, model, json.dumps({"since": time.time(), **why}))
    else:
        get_redis().hdel(PAUSED_KEY, model)


def is_paused(model: str) -> bool:
    return bool(get_redis().hexists(PAUSED_KEY, model))


def paused() -> dict[str, dict[str, Any]]:
    """Every paused model with when and why."""
    return _read(PAUSED_KEY)


def _read(key: str) -> dict[str, dict[str, Any]]:
    raw: dict[bytes, bytes] = get_redis().hgetall(key)  # type: ignore[assignment]
    return {k.decode(): json.loads(v) for k, v in raw.items()}
