"""The reservation ledger in Redis: an atomic check-and-reserve across one or more GPUs.

Per GPU two hashes: ``corral:sched:gpu:{host}:{index}`` (inventory: total, driver-reported
free, heartbeat) and ``corral:sched:res:{host}:{index}`` (reservation id → JSON). One Lua
script checks and reserves on every GPU of a placement at once, so live reservations on a
GPU never exceed ``total − headroom``; and where the driver reports less free memory than
the ledger believes (another process took it), the smaller figure wins.

Reservations are leases: the holder renews them; one whose holder died (SIGKILL) expires
after its TTL and is purged by the next ledger operation. *Standing* reservations (from the
catalog: memory kept for a high-priority model even when no worker holds it) never expire
and block lower-priority models; the model's own workers use them instead of adding to them.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Any

import redis

from app.scheduler.inventory import GpuInfo

GPU_KEY = "corral:sched:gpu:{key}"
RES_KEY = "corral:sched:res:{key}"
GPU_SET = "corral:sched:gpus"

# KEYS: gpu hash, res hash for each GPU (2 per GPU).
# ARGV: now, headroom, model, priority, dry_run, then one reservation JSON per GPU.
# A dry run reserves nothing and reports the room on every GPU.
_RESERVE = """
local now = tonumber(ARGV[1])
local headroom = tonumber(ARGV[2])
local model = ARGV[3]
local priority = tonumber(ARGV[4])
local dry = ARGV[5] == '1'
local n = #KEYS / 2
local report = {}
for i = 1, n do
  local gpu, res = KEYS[2 * i - 1], KEYS[2 * i]
  local want = cjson.decode(ARGV[5 + i])
  local total = tonumber(redis.call('HGET', gpu, 'total') or '-1')
  if total < 0 then
    if dry then total = 0 else
      return cjson.encode({ok = false, gpu = i, reason = 'unknown GPU ' .. gpu})
    end
  end
  local reported = tonumber(redis.call('HGET', gpu, 'free') or tostring(total))
  local leases, unloaded, own = 0, 0, 0
  local standing = {}
  local entries = redis.call('HGETALL', res)
  for j = 1, #entries, 2 do
    local r = cjson.decode(entries[j + 1])
    if r.expires_at > 0 and r.expires_at < now then
      redis.call('HDEL', res, entries[j])
    elseif r.expires_at == 0 then
      table.insert(standing, r)
    else
      leases = leases + r.bytes
      if not r.loaded then unloaded = unloaded + r.bytes end
      if r.model == model then own = own + r.bytes end
    end
  end
  local held = leases
  for _, s in ipairs(standing) do
    local used_by_model = 0
    for j = 1, #entries, 2 do
      local r = cjson.decode(entries[j + 1])
      if r.expires_at > 0 and r.expires_at >= now and r.model == s.model then
        used_by_model = used_by_model + r.bytes
      end
    end
    if s.model == model then
      -- our own reserve: the new lease may use what is left of it
      held = held + math.max(0, s.bytes - used_by_model - want.bytes)
    elseif s.priority >= priority then
      held = held + math.max(0, s.bytes - used_by_model)
    end
  end
  local room = total - headroom - held
  local driver_room = reported - headroom - unloaded
  if driver_room < room then room = driver_room end
  report[i] = {room = room, total = total, held = held, reported = reported}
  if not dry and want.bytes > room then
    return cjson.encode({ok = false, gpu = i, need = want.bytes, room = room, total = total,
                         held = held, reported = reported, reason = 'no room'})
  end
end
if dry then return cjson.encode({ok = true, report = report}) end
for i = 1, n do
  local want = cjson.decode(ARGV[5 + i])
  redis.call('HSET', KEYS[2 * i], want.id, ARGV[5 + i])
end
return cjson.encode({ok = true, report = report})
"""

# KEYS: res hashes; ARGV: now, ttl, ids (one per key). Returns how many were renewed.
_RENEW = """
local now, ttl = tonumber(ARGV[1]), tonumber(ARGV[2])
local renewed = 0
for i = 1, #KEYS do
  local raw = redis.call('HGET', KEYS[i], ARGV[2 + i])
  if raw then
    local r = cjson.decode(raw)
    if r.expires_at > 0 and r.expires_at >= now then
      r.expires_at = now + ttl
      redis.call('HSET', KEYS[i], ARGV[2 + i], cjson.encode(r))
      renewed = renewed + 1
    end
  end
end
return renewed
"""

_MARK_LOADED = """
for i = 1, #KEYS do
  local raw = redis.call('HGET', KEYS[i], ARGV[i])
  if raw then
    local r = cjson.decode(raw)
    r.loaded = true
    redis.call('HSET', KEYS[i], ARGV[i], cjson.encode(r))
  end
end
return 1
"""


@dataclass
class Reservation:
    """Memory held on one GPU for one model's worker (or a standing reserve)."""

    id: str
    host: str
    gpu: int
    model: str
    holder: str
    bytes: int
    priority: int = 0
    expires_at: float = 0.0  # 0: standing, never expires
    loaded: bool = False

    @property
    def gpu_key(self) -> str:
        return f"{self.host}:{self.gpu}"

    @property
    def standing(self) -> bool:
        return self.expires_at == 0


@dataclass
class ReserveResult:
    """What the ledger said to a placement: reserved, or why not."""

    ok: bool
    reservations: list[Reservation]
    gpu: str | None = None
    need: int = 0
    room: int = 0
    reason: str = ""


class Ledger:
    """Reservations of GPU memory, shared by every host through Redis."""

    def __init__(self, client: redis.Redis, *, headroom_bytes: int = 0, lease_ttl_s: float = 30.0):
        self.r = client
        self.headroom = headroom_bytes
        self.ttl = lease_ttl_s
        self._reserve = client.register_script(_RESERVE)
        self._renew = client.register_script(_RENEW)
        self._loaded = client.register_script(_MARK_LOADED)

    # Inventory -----------------------------------------------------------------------
    def register_gpus(self, gpus: list[GpuInfo], ttl_s: float) -> None:
        """Publish (or refresh) a host's GPUs; they vanish if not refreshed within ``ttl_s``."""
        pipe = self.r.pipeline()
        for g in gpus:
            key = GPU_KEY.format(key=g.key)
            pipe.hset(
                key,
                mapping={
                    "host": g.host,
                    "index": g.index,
                    "uuid": g.uuid,
                    "name": g.name,
                    "total": g.total_bytes,
                    "free": g.free_bytes,
                    "source": g.source,
                    "seen_at": time.time(),
                },
            )
            pipe.expire(key, max(1, int(ttl_s)))
            pipe.sadd(GPU_SET, g.key)
        pipe.execute()

    def gpus(self) -> list[dict[str, Any]]:
        """Every registered, live GPU (dropping ones whose host stopped heartbeating)."""
        keys = sorted(
            k.decode() if isinstance(k, bytes) else str(k) for k in self.r.smembers(GPU_SET)
        )
        pipe = self.r.pipeline()
        for k in keys:
            pipe.hgetall(GPU_KEY.format(key=k))
        out = []
        for k, raw in zip(keys, pipe.execute(), strict=True):
            if not raw:
                self.r.srem(GPU_SET, k)
                continue
            d = {a.decode(): b.decode() for a, b in raw.items()}
            out.append(
                {
                    "key": k,
                    "host": d["host"],
                    "index": int(d["index"]),
                    "uuid": d["uuid"],
                    "name": d["name"],
                    "total_bytes": int(d["total"]),
                    "reported_free_bytes": int(d["free"]),
                    "source": d["source"],
                }
            )
        return out

    # Reservations ----------------------------------------------------------------------
    def reserve(
        self,
        model: str,
        holder: str,
        parts: list[tuple[str, int, int]],
        *,
        priority: int = 0,
        standing: bool = False,
    ) -> ReserveResult:
        """Atomically reserve ``bytes`` on every ``(host, gpu, bytes)`` of ``parts``, or none."""
        now = time.time()
        res = [
            Reservation(
                id=f"{'standing' if standing else 'lease'}-{uuid.uuid4().hex[:12]}",
                host=host,
                gpu=gpu,
                model=model,
                holder=holder,
                bytes=int(n),
                priority=priority,
                expires_at=0.0 if standing else now + self.ttl,
            )
            for host, gpu, n in parts
        ]
        keys: list[str] = []
        for r in res:
            keys += [GPU_KEY.format(key=r.gpu_key), RES_KEY.format(key=r.gpu_key)]
        args: list[str | int | float] = [now, self.headroom, model, priority, 0]
        args += [json.dumps(asdict(r)) for r in res]
        answer = json.loads(self._reserve(keys=keys, args=args))
        if answer["ok"]:
            return ReserveResult(True, res)
        i = int(answer["gpu"]) - 1
        return ReserveResult(
            False,
            [],
            gpu=res[i].gpu_key,
            need=int(answer.get("need", res[i].bytes)),
            room=int(answer.get("room", 0)),
            reason=str(answer["reason"]),
        )

    def rooms(self, model: str, priority: int, gpu_keys: list[str]) -> dict[str, int]:
        """Bytes a new lease of ``model`` could take on each GPU now (the reserve rule, dry)."""
        if not gpu_keys:
            return {}
        keys: list[str] = []
        for k in gpu_keys:
            keys += [GPU_KEY.format(key=k), RES_KEY.format(key=k)]
        probe = json.dumps({"id": "probe", "bytes": 0})
        args: list[str | int | float] = [time.time(), self.headroom, model, priority, 1]
        args += [probe] * len(gpu_keys)
        report = json.loads(self._reserve(keys=keys, args=args))["report"]
        return {k: int(r["room"]) for k, r in zip(gpu_keys, report, strict=True)}

    def renew(self, reservations: list[Reservation]) -> int:
        """Extend leases by the TTL; returns how many still existed."""
        keys = [RES_KEY.format(key=r.gpu_key) for r in reservations]
        return int(
            self._renew(keys=keys, args=[time.time(), self.ttl, *[r.id for r in reservations]])
        )

    def mark_loaded(self, reservations: list[Reservation]) -> None:
        """The model is in GPU memory now: the driver's free figure already counts it."""
        keys = [RES_KEY.format(key=r.gpu_key) for r in reservations]
        self._loaded(keys=keys, args=[r.id for r in reservations])

    def release(self, reservations: list[Reservation]) -> None:
        pipe = self.r.pipeline()
        for r in reservations:
            pipe.hdel(RES_KEY.format(key=r.gpu_key), r.id)
        pipe.execute()

    def reservations(self, gpu_key: str | None = None) -> list[Reservation]:
        """Live reservations (all GPUs, or one), purging expired leases on the way."""
        keys = [gpu_key] if gpu_key else [g["key"] for g in self.gpus()]
        now = time.time()
        pipe = self.r.pipeline()
        for k in keys:
            pipe.hgetall(RES_KEY.format(key=k))
        out, expired = [], []
        for k, entries in zip(keys, pipe.execute(), strict=True):
            for rid, raw in entries.items():
                r = Reservation(**json.loads(raw))
                if not r.standing and r.expires_at < now:
                    expired.append((RES_KEY.format(key=k), rid))
                    continue
                out.append(r)
        if expired:
            pipe = self.r.pipeline()
            for key, rid in expired:
                pipe.hdel(key, rid)
            pipe.execute()
        return out

    def usage(self) -> dict[str, dict[str, int]]:
        """Per GPU: total, reserved (leases + standing), and what the ledger considers free."""
        by_gpu: dict[str, int] = {}
        for r in self.reservations():
            by_gpu[r.gpu_key] = by_gpu.get(r.gpu_key, 0) + r.bytes
        out = {}
        for g in self.gpus():
            reserved = by_gpu.get(g["key"], 0)
            free = min(
                g["total_bytes"] - self.headroom - reserved,
                g["reported_free_bytes"] - self.headroom,
            )
            out[g["key"]] = {"total": g["total_bytes"], "reserved": reserved, "free": max(0, free)}
        return out
