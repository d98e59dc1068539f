"""`corral agent`: one per worker host; starts and stops the host's pools on demand.

Every ``CORRAL_AGENT_POLL_S`` the agent:

1. registers the host's GPUs (NVML or ``CORRAL_GPUS``) and its standing reserves;
2. reaps its pool processes that exited, and follows the rest from ``starting`` (placing)
   through ``loading`` (room reserved) to ``ready``/``idle`` (heartbeats);
3. starts ``preload: true`` models, and keeps them;
4. starts a pool for each model whose queue holds steps and which has no pool anywhere:
   it claims the start (one agent per model at a time), checks the ledger's room for the
   model's estimate (weights once, KV for its ``parallel`` slots), evicts idle pools of
   lower priority on this host when that makes room (least recently used first, never a
   busy one, never a standing reserve), and runs ``corral worker --model M --no-wait``;
   the ledger's atomic reserve decides a race for the last room. When no room can be made
   it records why (bytes needed, largest room), which the waiting steps show, and lists the
   model as pending so beat's cleanup plans moves for it;
5. carries out the cleanup plan's moves from this host's GPUs: asks the idle pool to
   release (it refuses while a step runs) and starts it again on the target GPU;
6. asks pools idle past their keep-alive (catalog ``keep_alive``, else
   ``CORRAL_KEEP_ALIVE_S``; 0 at once, -1 never) to release and exit; a running step is
   never interrupted (the pool refuses while busy);
7. publishes its pools' states (:mod:`app.scheduler.pools`).

Pool processes are the agent's children: SIGTERM stops them warmly, and should the agent
die without a word the kernel sends them SIGTERM, so their leases go with them.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import redis
from sqlalchemy import func
from sqlmodel import col, select

from app.core.config import Settings
from app.core.process import parent_death_signal, stop_children
from app.scheduler import control, fragmentation, live, pools
from app.scheduler.inventory import GpuInventory, format_bytes
from app.scheduler.ledger import Reservation
from app.scheduler.service import PENDING_KEY, Pending, estimate_for, make_ledger, sync_standing
from app.store import db
from app.store.queries import SENDABLE
from app.store.tables import StepRun
from app.workflows.names import queue_keys
from models.catalog import Catalog, CatalogEntry

log = logging.getLogger(__name__)

# Seconds a pool process gets between SIGTERM and SIGKILL when the agent stops.
STOP_GRACE_S = 20.0


@dataclass
class Child:
    """A pool process this agent started."""

    model: str
    proc: subprocess.Popen[bytes]
    node: str  # its Celery node name (what remote control and heartbeats name)
    log: Path
    log_offset: int  # where its output starts in the model's log
    gpu: str  # "auto" or the index of a move's target
    started_at: float
    preload: bool = False
    waiting_since: float | None = None  # the first waiting step it was started for
    state: pools.PoolState = "starting"
    state_since: float = field(default_factory=time.time)
    reason: str = ""
    served: bool = False  # its first step has been seen

    def set_state(self, state: pools.PoolState, reason: str = "") -> None:
        if state != self.state:
            self.state, self.state_since = state, time.time()
        self.reason = reason or self.reason


def _as_ts(value: datetime | None) -> float | None:
    if value is None:
        return None
    return (value if value.tzinfo else value.replace(tzinfo=UTC)).timestamp()


@dataclass
class Agent:
    """The host's pool manager (see the module's docstring)."""

    settings: Settings
    catalog: Catalog
    client: redis.Redis
    inventory: GpuInventory
    celery: Any  # a Celery app: remote control of the pools
    models: list[str] | None = None  # the models it may start (default: every present one)
    children: dict[str, Child] = field(default_factory=dict)
    backoff: dict[str, float] = field(default_factory=dict)
    _refused: set[str] = field(default_factory=set)  # pools that refused to go (busy)
    _registered_at: float = 0.0

    def __post_init__(self) -> None:
        self.host = self.settings.host
        self.ledger = make_ledger(self.settings, self.client)
        self.log_dir = self.settings.data_dir / "logs"

    # The loop ---------------------------------------------------------------------------
    def run(self, stop: threading.Event) -> None:
        """Tick until ``stop`` is set, then stop every pool process and withdraw."""
        log.info("agent on %s: GPUs %s", self.host, [g.key for g in self.inventory.gpus()])
        try:
            while not stop.is_set():
                try:
                    self.tick()
                except (redis.RedisError, OSError) as exc:
                    log.warning("agent tick failed, retrying: %s", exc)
                except Exception:  # the agent outlives any one bad tick; its pools depend on it
                    log.exception("agent tick failed, retrying")
                stop.wait(self.settings.agent_poll_s)
        finally:
            self.shutdown()

    def tick(self) -> None:
        now = time.time()
        if now - self._registered_at >= self.settings.lease_ttl_s / 3:
            self._register()
        self._reap()
        workers = live.live_workers()
        self._follow(workers)
        entries = self._entries()
        depths = self._depths(entries)
        for entry in entries:
            if (
                entry.preload
                and not self._mine(entry.name)
                and self.backoff.get(entry.name, 0) <= now
            ):
                self._try_start(entry, depth=0)
        served = {str(w.get("model")) for w in workers}
        starting = self._starting_elsewhere()
        for entry in entries:
            name = entry.name
            if depths.get(name, 0) == 0 or name in served or name in starting:
                self._forget_waiting(name)
                continue
            if self._mine(name) or self.backoff.get(name, 0) > now:
                continue
            self._try_start(entry, depth=depths[name])
        self._carry_out_moves(workers)
        self._keep_alive(workers, depths)
        self._publish()

    def shutdown(self) -> None:
        """Stop the pool processes (each finishes its step) and withdraw the record."""
        procs = [c.proc for c in self.children.values()]
        if procs:
            log.info("stopping %d pool process(es)", len(procs))
            stop_children(procs, grace_s=STOP_GRACE_S)
        for child in self.children.values():
            pools.release_start(self.client, child.model, self.host)
        self.children.clear()
        try:
            pools.withdraw_agent(self.client, self.host)
        except redis.RedisError as exc:
            log.warning("could not withdraw the agent's record: %s", exc)

    # Reading ----------------------------------------------------------------------------
    def _register(self) -> None:
        gpus = self.inventory.gpus()
        if gpus:
            self.ledger.register_gpus(gpus, ttl_s=self.settings.lease_ttl_s)
            sync_standing(
                self.ledger, self.catalog, self.host, [g.index for g in gpus], self.settings
            )
        self._registered_at = time.time()

    def _entries(self) -> list[CatalogEntry]:
        present = self.catalog.present(self.settings.models_path)
        if self.models is not None:
            present = [e for e in present if e.name in self.models]
        return present

    def _depths(self, entries: list[CatalogEntry]) -> dict[str, int]:
        pipe = self.client.pipeline(transaction=False)
        for entry in entries:
            for key in queue_keys(entry.name):
                pipe.llen(key)
        lengths = iter(pipe.execute())
        return {e.name: int(next(lengths)) + int(next(lengths)) for e in entries}

    def _mine(self, model: str) -> bool:
        return any(c.model == model for c in self.children.values())

    def _starting_elsewhere(self) -> set[str]:
        out: set[str] = set()
        for agent in pools.agents(self.client):
            if agent.get("host") == self.host:
                continue
            out.update(
                str(p["model"])
                for p in agent.get("pools", [])
                if p.get("state") in ("starting", "loading")
            )
        return out

    # Pool processes ---------------------------------------------------------------------
    def _reap(self) -> None:
        for node, child in list(self.children.items()):
            code = child.proc.poll()
            if code is None:
                continue
            del self.children[node]
            pools.release_start(self.client, child.model, self.host)
            if child.state in ("starting", "loading"):
                reason = self._last_line(child.log, child.log_offset) or f"exited with {code}"
                log.warning("pool %s did not start: %s", node, reason)
                pools.record(
                    self.client, "failed", self.host, child.model, node=node, reason=reason
                )
                self.backoff[child.model] = time.time() + self.settings.placement_poll_s
            else:
                pools.record(
                    self.client,
                    "exit",
                    self.host,
                    child.model,
                    node=node,
                    code=code,
                    reason=child.reason,
                )

    @staticmethod
    def _last_line(path: Path, offset: int) -> str:
        """The line of a pool's output that says why it exited (its last, by default)."""
        try:
            with path.open("rb") as f:
                f.seek(offset)
                lines = f.read().decode(errors="replace").strip().splitlines()
        except OSError:
            return ""
        for line in reversed(lines):
            if "no room" in line or "error" in line.lower():
                return line.strip()[-500:]
        return lines[-1].strip()[-500:] if lines else ""

    def _follow(self, workers: list[dict[str, Any]]) -> None:
        """Move each child along starting → loading → ready/idle; notice its first step."""
        by_node = {str(w.get("node")): w for w in workers}
        held = {r.holder for r in self.ledger.reservations()} if self.inventory.gpus() else set()
        now = time.time()
        for node, child in self.children.items():
            w = by_node.get(node)
            if child.state == "releasing":
                continue
            if w is None:
                if child.state == "starting" and node in held:
                    child.set_state("loading", "room reserved; loading the model")
                elif child.state == "starting" and not self.inventory.gpus():
                    child.set_state("loading", "loading the model on the CPU")
                if now - child.started_at > self.settings.agent_start_timeout_s:
                    child.set_state("releasing", "did not start in time")
                    child.proc.terminate()
                continue
            if child.state in ("starting", "loading"):
                pools.release_start(self.client, child.model, self.host)
                pools.record(
                    self.client,
                    "load",
                    self.host,
                    child.model,
                    node=node,
                    load_s=round(now - child.started_at, 3),
                    gpu=child.gpu,
                )
            child.set_state("ready" if w.get("busy") else "idle")
            if not child.served and child.waiting_since is not None:
                try:
                    child.served = self._observe_cold_start(child)
                except Exception as exc:  # the database is down: try again next tick
                    log.warning("could not read %s's first step: %s", child.node, exc)

    def _observe_cold_start(self, child: Child) -> bool:
        """Count the seconds from the first waiting step the pool was started for to the
        first step it ran (read from the database, not from its heartbeats, which may lag a
        short step); False while it has run none."""
        assert child.waiting_since is not None
        with db.session_scope() as session:
            first = session.exec(
                select(func.min(StepRun.started_at)).where(
                    StepRun.model == child.model,
                    col(StepRun.started_at) >= datetime.fromtimestamp(child.started_at, UTC),
                )
            ).one()
        started = _as_ts(first)
        if started is None:
            return False
        pools.observe_cold_start(self.client, child.model, started - child.waiting_since)
        return True

    def _oldest_waiting(self, model: str) -> float | None:
        with db.session_scope() as session:
            oldest = session.exec(
                select(func.min(StepRun.queued_at)).where(
                    StepRun.model == model, col(StepRun.status).in_(SENDABLE)
                )
            ).one()
        return _as_ts(oldest)

    def _spawn(self, entry: CatalogEntry, *, gpu: str = "auto", depth: int = 0) -> Child:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        path = self.log_dir / f"worker-{entry.name}.log"
        args = ["worker", "--model", entry.name, "--gpu", gpu, "--no-wait"]
        with path.open("ab") as out:
            offset = out.tell()
            proc = subprocess.Popen(
                [sys.executable, "-m", "app.cli.main", *args],
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=parent_death_signal(),
            )
        node = f"{entry.name}.{proc.pid}@{self.host}"
        waiting_since = None
        if depth:
            try:
                waiting_since = self._oldest_waiting(entry.name) or time.time()
            except Exception as exc:  # the database is down: count from now
                log.warning("could not read %s's oldest waiting step: %s", entry.name, exc)
                waiting_since = time.time()
        child = Child(
            entry.name,
            proc,
            node,
            path,
            offset,
            gpu,
            time.time(),
            entry.preload,
            waiting_since,
            reason="preload" if entry.preload else f"{depth} step(s) waiting" if depth else "",
        )
        self.children[node] = child
        pools.record(
            self.client, "start", self.host, entry.name, node=node, gpu=gpu, reason=child.reason
        )
        log.info("starting a pool for %s (%s) on GPU %s", entry.name, child.reason, gpu)
        return child

    # Placement --------------------------------------------------------------------------
    def _need(self, entry: CatalogEntry) -> int:
        path = self.catalog.path_for(entry, self.settings.models_path)
        return estimate_for(self.settings, path, entry.n_ctx, entry.parallel).total_bytes

    def _try_start(self, entry: CatalogEntry, *, depth: int) -> None:
        """Start ``entry``'s pool here if there is (or eviction makes) room, else say why."""
        if not pools.claim_start(
            self.client, entry.name, self.host, self.settings.agent_start_timeout_s
        ):
            return
        gpus = self.inventory.gpus()
        if not gpus:
            self._spawn(entry, depth=depth)
            return
        need = self._need(entry)
        keys = [g.key for g in gpus]
        rooms = self.ledger.rooms(entry.name, entry.priority, keys)
        if max(rooms.values()) >= need or (entry.split_allowed and sum(rooms.values()) >= need):
            self._forget_waiting(entry.name)
            self._spawn(entry, depth=depth)
            return
        self._refused.clear()
        if self._evict_for(entry, need, rooms):
            self._forget_waiting(entry.name)
            self._spawn(entry, depth=depth)
            return
        pools.release_start(self.client, entry.name, self.host)
        self.backoff[entry.name] = time.time() + self.settings.placement_poll_s
        self._wait(entry, need, rooms, {g.key: g.total_bytes - self.ledger.headroom for g in gpus})

    def _idle_pools_here(self, below: int) -> list[tuple[float, Reservation]]:
        """Leases on this host of idle live pools with priority < ``below``, oldest idle first."""
        idle = {
            str(w.get("node")): float(w.get("idle_since") or 0)
            for w in live.live_workers()
            if not w.get("busy") and w.get("host") == self.host
        }
        leases = [
            (idle[r.holder], r)
            for r in self.ledger.reservations()
            if r.host == self.host and not r.standing and r.priority < below and r.holder in idle
        ]
        return sorted(leases, key=lambda x: (x[0], x[1].id))

    def _evict_for(self, entry: CatalogEntry, need: int, rooms: dict[str, int]) -> bool:
        """Evict idle lower-priority pools (least recently used first) from the one GPU where
        that makes room for ``need``; True if it did."""
        if entry.priority == 0:
            return False
        victims = self._idle_pools_here(entry.priority)
        for key in sorted(rooms, key=lambda k: -rooms[k]):
            here = [r for _, r in victims if r.gpu_key == key]
            if rooms[key] + sum(r.bytes for r in here) < need:
                continue
            room = rooms[key]
            for r in here:
                if room >= need:
                    break
                if not control.release(self.celery, r.holder, f"evicted for {entry.name}"):
                    self._refused.add(r.holder)  # a step arrived since its last heartbeat
                else:
                    room += r.bytes
                    pools.record(
                        self.client,
                        "evict",
                        self.host,
                        r.model,
                        node=r.holder,
                        gpu=key,
                        reason=f"room for {entry.name} (priority {entry.priority})",
                    )
                    self._releasing(r.holder, f"evicted for {entry.name}")
            if room >= need:
                return True
        return False

    def _wait(
        self, entry: CatalogEntry, need: int, rooms: dict[str, int], capacity: dict[str, int]
    ) -> None:
        """Record why ``entry`` cannot start here, for its steps and beat's planner."""
        largest = max(rooms.items(), key=lambda kv: kv[1])
        if max(capacity.values()) < need and not entry.split_allowed:
            reason = (
                f"needs {format_bytes(need)} ({need} bytes); no GPU here can ever hold it "
                f"(largest after headroom {format_bytes(max(capacity.values()))})"
            )
        else:
            idle = [
                r for _, r in self._idle_pools_here(entry.priority) if r.holder not in self._refused
            ]
            idle_bytes = format_bytes(sum(r.bytes for r in idle))
            evictable = (
                f"evicting every idle pool of lower priority ({idle_bytes}) would not make "
                "room on one GPU; busy pools are never evicted"
                if idle
                else "no idle pool of lower priority to evict; busy pools are never evicted"
            )
            reason = (
                f"needs {format_bytes(need)} ({need} bytes); largest room GPU {largest[0]} "
                f"{format_bytes(largest[1])}; {evictable}"
            )
        pools.set_waiting(
            self.client,
            entry.name,
            self.host,
            {
                "need_bytes": need,
                "largest_room_bytes": largest[1],
                "gpu": largest[0],
                "reason": reason,
            },
        )
        Pending(self.client, f"agent:{entry.name}").set(
            model=entry.name,
            host=self.host,
            need_bytes=need,
            need=format_bytes(need),
            reason=reason,
        )

    def _forget_waiting(self, model: str) -> None:
        pools.clear_waiting(self.client, model, self.host)
        self.client.hdel(PENDING_KEY, f"agent:{model}")

    def _releasing(self, node: str, reason: str) -> None:
        child = self.children.get(node)
        if child is not None:
            child.set_state("releasing", reason)

    # Cleanup moves and keep-alive -------------------------------------------------------
    def _carry_out_moves(self, workers: list[dict[str, Any]]) -> None:
        """Do the moves beat's cleanup planned from this host's GPUs: release the idle pool,
        start it again on the target GPU."""
        report = fragmentation.latest(self.client)
        if not report:
            return
        idle = {str(w.get("node")) for w in workers if not w.get("busy")}
        holders = {r.id: r for r in self.ledger.reservations() if r.host == self.host}
        for plan in report.get("plans", []):
            for move in plan.get("moves", []):
                lease = holders.get(str(move["pool_id"]))
                if lease is None or lease.holder not in idle:
                    continue
                if not self.client.set(f"corral:agent:move:{lease.id}", self.host, nx=True, ex=120):
                    continue
                reason = f"cleanup: make room for {plan['model']}"
                if not control.release(self.celery, lease.holder, reason):
                    continue
                self._releasing(lease.holder, reason)
                target = str(move["to_gpu"]).rpartition(":")[2]
                entry = self.catalog.get(lease.model)
                self._spawn(entry, gpu=target)
                event = {
                    "from_gpu": move["from_gpu"],
                    "to_gpu": move["to_gpu"],
                    "for": plan["model"],
                }
                pools.record(
                    self.client, "move", self.host, lease.model, node=lease.holder, **event
                )
                fragmentation.record_action(
                    self.client, {"action": "move", "model": lease.model, **event}
                )

    def _keep_alive(self, workers: list[dict[str, Any]], depths: dict[str, int]) -> None:
        by_node = {str(w.get("node")): w for w in workers}
        now = time.time()
        for node, child in self.children.items():
            w = by_node.get(node)
            if child.preload or child.state != "idle" or w is None or depths.get(child.model):
                continue
            entry = self.catalog.get(child.model)
            keep = entry.keep_alive if entry.keep_alive is not None else self.settings.keep_alive_s
            idle_s = now - float(w.get("idle_since") or now)
            if keep < 0 or idle_s < keep:
                continue
            reason = f"idle {idle_s:.0f} s, keep_alive {keep:g} s"
            if control.release(self.celery, node, reason):
                child.set_state("releasing", reason)
                pools.record(
                    self.client, "unload", self.host, child.model, node=node, reason=reason
                )

    def _publish(self) -> None:
        record = {
            "host": self.host,
            "pid": os.getpid(),
            "gpus": [g.key for g in self.inventory.gpus()],
            "pools": [
                {
                    "model": c.model,
                    "node": c.node,
                    "pid": c.proc.pid,
                    "state": c.state,
                    "since": c.state_since,
                    "reason": c.reason,
                    "gpu": c.gpu,
                    "preload": c.preload,
                    "keep_alive_s": self._keep(c.model),
                }
                for c in self.children.values()
            ],
        }
        pools.publish_agent(
            self.client, self.host, record, ttl_s=max(5.0, self.settings.agent_poll_s * 5)
        )

    def _keep(self, model: str) -> float:
        entry = self.catalog.get(model)
        return entry.keep_alive if entry.keep_alive is not None else self.settings.keep_alive_s
