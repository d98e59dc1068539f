"""This process's Redis client (the broker's Redis: memory, notices, ledger, registry)."""

from __future__ import annotations

import os
import threading

import redis
from redis.exceptions import RedisError

from app.core.config import get_settings
from app.core.errors import ServiceUnavailable

_clients: dict[tuple[str, int], redis.Redis] = {}
_lock = threading.Lock()


def get_redis() -> redis.Redis:
    """The client for the settings' URL in this process (a new one after a fork)."""
    url = get_settings().broker_url
    key = (url, os.getpid())
    with _lock:
        client = _clients.get(key)
        if client is None:
            client = _clients[key] = redis.Redis.from_url(
                url, socket_timeout=5, socket_connect_timeout=5, health_check_interval=30
            )
        return client


def ping() -> None:
    """Raise ServiceUnavailable unless Redis answers PING."""
    try:
        get_redis().ping()
    except (RedisError, OSError) as exc:
        raise ServiceUnavailable(f"Redis is unavailable: {exc}") from exc
