"""What the host agents tell everyone else, in Redis: pool states, waiting models, actions.

Each ``corral agent`` writes, every poll:

- ``corral:agent:{host}``: the agent (pid, GPUs) and each pool process it runs, with its
  state (``starting``: placing; ``loading``: room reserved, model loading; ``ready``:
  serving a step; ``idle``, since when; ``releasing``: asked to unload) and why. The key
  expires after a few polls, so a dead agent's record goes with it.
- ``corral:agent:waiting``: per model and host, why the model cannot start there now (the
  bytes it needs, the largest room), which a waiting step's ``waiting_reason`` shows.

Every action (start, load, unload, eviction, move, failed start) is appended to
``corral:agent:events`` (newest first, capped) and counted in ``corral:agent:counters``,
with the seconds from a model's first waiting step to its new pool's first step;
``/metrics`` exports the counters. A start is claimed per model (``SET NX`` with a lease),
so agents on several hosts never start the same model's pool twice at once; the GPU
ledger's atomic reserve decides who gets the last room.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from typing import Any, Literal, cast

import redis

from app.core.redis import get_redis
from app.scheduler import live

AGENTS_KEY = "corral:agents"  # hosts with an agent (each also has its expiring record)
AGENT_KEY = "corral:agent:{host}"
WAITING_KEY = "corral:agent:waiting"
EVENTS_KEY = "corral:agent:events"
COUNTERS_KEY = "corral:agent:counters"
START_KEY = "corral:agent:start:{model}"
EVENTS_KEPT = 500

PoolState = Literal["starting", "loading", "ready", "idle", "releasing"]
# Actions counted per model (the /metrics counters), by event name.
COUNTED = {"load": "loads", "unload": "unloads", "evict": "evictions", "move": "moves"}

_RELEASE_CLAIM = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def publish_agent(client: redis.Redis, host: str, record: dict[str, Any], ttl_s: float) -> None:
    """Announce (or renew) this host's agent and its pools for ``ttl_s`` seconds."""
    pipe = client.pipeline(transaction=False)
    pipe.sadd(AGENTS_KEY, host)
    pipe.set(AGENT_KEY.format(host=host), json.dumps({**record, "at": time.time()}))
    pipe.expire(AGENT_KEY.format(host=host), max(1, int(ttl_s)))
    pipe.execute()


def withdraw_agent(client: redis.Redis, host: str) -> None:
    """A clean exit: the agent's record and its waiting entries go."""
    pipe = client.pipeline(transaction=False)
    pipe.srem(AGENTS_KEY, host)
    pipe.delete(AGENT_KEY.format(host=host))
    pipe.execute()
    for field in cast(list[bytes], client.hkeys(WAITING_KEY)):
        if field.decode().endswith(f"@{host}"):
            client.hdel(WAITING_KEY, field)


def agents(client: redis.Redis | None = None) -> list[dict[str, Any]]:
    """Every live agent's record (hosts whose record expired are forgotten)."""
    client = client or get_redis()
    hosts = sorted(h.decode() for h in cast(set[bytes], client.smembers(AGENTS_KEY)))
    if not hosts:
        return []
    raws = cast(list[bytes | None], client.mget([AGENT_KEY.format(host=h) for h in hosts]))
    gone = [h for h, raw in zip(hosts, raws, strict=True) if raw is None]
    if gone:
        client.srem(AGENTS_KEY, *gone)
    return [json.loads(raw) for raw in raws if raw is not None]


def set_waiting(client: redis.Redis, model: str, host: str, info: dict[str, Any]) -> None:
    """Record why ``model`` cannot start on ``host`` now."""
    key = f"{model}@{host}"
    old = client.hget(WAITING_KEY, key)
    since = json.loads(cast(bytes, old)).get("since") if old else None
    body = {**info, "model": model, "host": host, "since": since or time.time()}
    client.hset(WAITING_KEY, key, json.dumps({**body, "updated_at": time.time()}))


def clear_waiting(client: redis.Redis, model: str, host: str) -> None:
    client.hdel(WAITING_KEY, f"{model}@{host}")


def waiting(client: redis.Redis | None = None, stale_s: float = 30.0) -> dict[str, list[Any]]:
    """Per model, each host's reason it cannot start there (entries not renewed for
    ``stale_s`` seconds are dropped)."""
    client = client or get_redis()
    out: dict[str, list[Any]] = defaultdict(list)
    now = time.time()
    for field, raw in cast(dict[bytes, bytes], client.hgetall(WAITING_KEY)).items():
        info = json.loads(raw)
        if now - float(info.get("updated_at", 0)) > stale_s:
            client.hdel(WAITING_KEY, field)
            continue
        out[str(info["model"])].append(info)
    return dict(out)


def waiting_reason(entries: list[dict[str, Any]]) -> str:
    """One line for a model's waiting steps: what it needs, and the room on each host."""
    parts = [f"{e['host']}: {e['reason']}" for e in sorted(entries, key=lambda e: e["host"])]
    return "waiting for a pool; " + "; ".join(parts)


def record(client: redis.Redis, action: str, host: str, model: str, **fields: Any) -> None:
    """Append an action to the event log and count it."""
    event = {"at": time.time(), "action": action, "host": host, "model": model, **fields}
    pipe = client.pipeline(transaction=False)
    pipe.lpush(EVENTS_KEY, json.dumps(event))
    pipe.ltrim(EVENTS_KEY, 0, EVENTS_KEPT - 1)
    if action in COUNTED:
        pipe.hincrby(COUNTERS_KEY, f"{COUNTED[action]}|{model}", 1)
    pipe.execute()


def observe_cold_start(client: redis.Redis, model: str, seconds: float) -> None:
    """Count one wait from a model's first waiting step to its new pool's first step."""
    pipe = client.pipeline(transaction=False)
    pipe.hincrbyfloat(COUNTERS_KEY, f"cold_start_seconds_sum|{model}", seconds)
    pipe.hincrby(COUNTERS_KEY, f"cold_start_seconds_count|{model}", 1)
    pipe.hset(COUNTERS_KEY, f"cold_start_seconds_last|{model}", seconds)
    pipe.execute()


def counters(client: redis.Redis | None = None) -> dict[str, dict[str, float]]:
    """Every counter, by name then model."""
    raw = cast(dict[bytes, bytes], (client or get_redis()).hgetall(COUNTERS_KEY))
    out: dict[str, dict[str, float]] = defaultdict(dict)
    for field, value in raw.items():
        name, _, model = field.decode().partition("|")
        out[name][model] = float(value)
    return dict(out)


def events(limit: int = 50, client: redis.Redis | None = None) -> list[dict[str, Any]]:
    """The agents' latest actions, newest first."""
    raw = cast(list[bytes], (client or get_redis()).lrange(EVENTS_KEY, 0, limit - 1))
    return [json.loads(r) for r in raw]


def claim_start(client: redis.Redis, model: str, host: str, ttl_s: float) -> bool:
    """Claim the start of ``model``'s pool for ``host``; False if another agent holds it."""
    return bool(client.set(START_KEY.format(model=model), host, nx=True, ex=max(1, int(ttl_s))))


def release_start(client: redis.Redis, model: str, host: str) -> None:
    """Give up ``host``'s claim on starting ``model`` (another host's claim is left)."""
    client.eval(_RELEASE_CLAIM, 1, START_KEY.format(model=model), host)


def pools_view(client: redis.Redis | None = None) -> dict[str, Any]:
    """Every model's pools: live processes with their state (``ready`` or ``idle`` from
    their heartbeat, ``releasing`` when an agent asked them to unload), the agents' pools
    still starting or loading, the models waiting for room and why, and recent actions."""
    client = client or get_redis()
    now = time.time()
    managed: dict[str, tuple[str, dict[str, Any]]] = {}
    hosts = []
    for agent in agents(client):
        hosts.append({k: agent[k] for k in ("host", "pid", "gpus", "at") if k in agent})
        for p in agent.get("pools", []):
            managed[str(p["node"])] = (str(agent["host"]), p)
    workers = live.live_workers()
    serving = {str(w.get("node")) for w in workers}
    starting: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for node, (agent_host, p) in managed.items():
        if node not in serving and p.get("state") in ("starting", "loading"):
            starting[str(p["model"])].append({**p, "agent": agent_host})
    by_model: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for w in workers:
        agent_host, p = managed.get(str(w.get("node")), ("", {}))
        state: str = "ready" if w.get("busy") else "idle"
        if p.get("state") == "releasing":
            state = "releasing"
        view = {**w, "state": state, "agent": agent_host or None}
        if state == "idle" and w.get("idle_since"):
            view["idle_s"] = round(now - float(w["idle_since"]), 1)
        if p:
            view["keep_alive_s"] = p.get("keep_alive_s")
            view["preload"] = p.get("preload", False)
            view["reason"] = p.get("reason", "")
        by_model[str(w.get("model"))].append(view)
    waits = waiting(client)
    models = sorted(set(by_model) | set(starting) | set(waits))
    return {
        "pools": [
            {
                "model": m,
                "workers": by_model.get(m, []),
                "starting": starting.get(m, []),
                "waiting": waits.get(m, []),
            }
            for m in models
        ],
        "agents": hosts,
        "events": events(client=client),
    }
