"""Scheduler at scale: place and release pools on 1,000 declared GPUs over 125 hosts.

    python -m benchmarks.scheduler_sim [--events 3000] [--seed 7] [--json out.json]

50 models (2–70 GiB; the ones over 40 GiB may be split across GPUs of one host) arrive (80%)
and depart (20%) at random; each arrival is placed by the real placement code against the
real Redis
ledger (Lua check-and-reserve), cluster-wide. The same event sequence runs under binpack and
spread. Prints placement latency (median, p99), how many arrivals found room, and memory
utilisation (reserved / total, averaged over the second half of the run).
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import random
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis
from rich.console import Console
from rich.table import Table

from app.core.embedded import EmbeddedRedis
from app.scheduler.estimate import MemoryEstimate, ModelShape, estimate
from app.scheduler.inventory import GpuInfo
from app.scheduler.ledger import Ledger
from app.scheduler.placement import Binpack, Placement, Policy, Spread, place

GIB = 2**30
HOSTS, GPUS_PER_HOST, MODELS = 125, 8, 50
GPU_SIZES = [24 * GIB, 48 * GIB, 80 * GIB]


@dataclass(frozen=True)
class SimModel:
    name: str
    est: MemoryEstimate
    split: bool


def synthetic_model(name: str, size: int) -> SimModel:
    layers = 32
    shape = ModelShape(
        architecture="llama",
        n_layer=layers,
        n_embd=4096,
        n_head=32,
        n_head_kv=8,
        head_dim_k=128,
        head_dim_v=128,
        n_vocab=32000,
        context_length=8192,
        layer_bytes=tuple([size // layers] * layers),
        output_bytes=0,
        host_bytes=0,
    )
    est = estimate(shape, 4096, overhead_bytes=512 * 2**20, flash_attention=True)
    return SimModel(name, est, split=size > 40 * GIB)


def resplit(m: SimModel, split: tuple[int, ...]) -> MemoryEstimate:
    return estimate(
        m.est.shape,
        m.est.n_ctx,
        flash_attention=True,
        overhead_bytes=m.est.overhead_bytes,
        split=split,
    )


def cluster(rng: random.Random) -> list[GpuInfo]:
    gpus = []
    for h in range(HOSTS):
        size = rng.choice(GPU_SIZES)
        for i in range(GPUS_PER_HOST):
            gpus.append(GpuInfo(f"host{h:03d}", i, f"u{h}-{i}", "sim", size, size, "declared"))
    return gpus


def run_policy(
    client: redis.Redis,
    policy: Policy,
    gpus: list[GpuInfo],
    models: list[SimModel],
    events: list[float],
    seed: int,
) -> dict[str, Any]:
    client.flushdb()
    ledger = Ledger(client, headroom_bytes=0, lease_ttl_s=3600)
    ledger.register_gpus(gpus, ttl_s=3600)
    candidates = [(g.host, g.index, g.total_bytes) for g in gpus]
    total = sum(g.total_bytes for g in gpus)
    rng = random.Random(seed)
    live: list[Placement] = []
    latencies: list[float] = []
    placed = refused = 0
    utilisation: list[float] = []
    reserved = 0
    for n, u in enumerate(events):
        if u < 0.8 or not live:
            m = rng.choice(models)
            started = time.perf_counter()
            result = place(
                ledger,
                m.est,
                model=m.name,
                holder=f"pool{n}",
                gpus=candidates,
                policy=policy,
                split_allowed=m.split,
                estimate_split=functools.partial(resplit, m),
            )
            latencies.append((time.perf_counter() - started) * 1000)
            if isinstance(result, Placement):
                placed += 1
                live.append(result)
                reserved += sum(r.bytes for r in result.reservations)
            else:
                refused += 1
        else:
            gone = live.pop(rng.randrange(len(live)))
            ledger.release(gone.reservations)
            reserved -= sum(r.bytes for r in gone.reservations)
        if n >= len(events) // 2:
            utilisation.append(reserved / total)
    # The ledger agrees with the bookkeeping, and nothing is over-committed.
    held: dict[str, int] = {}
    for r in ledger.reservations():
        held[r.gpu_key] = held.get(r.gpu_key, 0) + r.bytes
    capacity = {g.key: g.total_bytes for g in gpus}
    assert sum(held.values()) == reserved
    assert all(b <= capacity[k] for k, b in held.items())
    q = statistics.quantiles(latencies, n=100)
    return {
        "policy": policy.name,
        "arrivals": placed + refused,
        "placed": placed,
        "refused": refused,
        "latency_ms_p50": statistics.median(latencies),
        "latency_ms_p99": q[98],
        "utilisation_mean": statistics.mean(utilisation),
        "live_pools_end": len(live),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    gpus = cluster(rng)
    models = [
        synthetic_model(f"model{i:02d}", int(rng.uniform(2, 70) * GIB)) for i in range(MODELS)
    ]
    events = [rng.random() for _ in range(args.events)]
    with tempfile.TemporaryDirectory() as tmp:
        server = EmbeddedRedis(Path(tmp), persist=False).start()
        client = redis.Redis.from_url(server.url)
        try:
            results = [
                run_policy(client, policy, gpus, models, events, args.seed)
                for policy in (Binpack(), Spread())
            ]
        finally:
            client.close()
            server.stop()
    machine = f"{platform.processor() or platform.machine()}, {platform.python_version()}"
    title = f"scheduler: {len(gpus)} GPUs / {HOSTS} hosts, {MODELS} models, {args.events} events"
    table = Table(title=f"{title} ({machine})")
    for col in ("policy", "placed", "refused", "p50 ms", "p99 ms", "utilisation"):
        table.add_column(col, justify="right")
    for r in results:
        table.add_row(
            r["policy"],
            str(r["placed"]),
            str(r["refused"]),
            f"{r['latency_ms_p50']:.2f}",
            f"{r['latency_ms_p99']:.2f}",
            f"{r['utilisation_mean'] * 100:.1f}%",
        )
    Console().print(table)
    if args.json:
        args.json.write_text(
            json.dumps({"machine": machine, "events": args.events, "results": results}, indent=2)
        )


if __name__ == "__main__":
    main()
