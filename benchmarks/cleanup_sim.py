"""Fragmentation cleanup at scale: stranded memory and the planner's moves on 1,000 GPUs.

    python -m benchmarks.cleanup_sim [--seed 7] [--events 4000] [--waiting 40] [--reps 10]
                                     [--fill binpack,spread,random] [--max-moves 4]
                                     [--splittable 0] [--json out.json]

125 hosts of 8 GPUs (24, 48 or 80 GiB per host, as in ``benchmarks.scheduler_sim``) are
filled by a random churn of pools of 50 models (2–70 GiB): arrivals (75%) placed on one GPU,
departures (25%) of a random live pool; 40% of the pools are busy, 5% standing reservations.
The churn runs once per fill policy, from the same seed: ``binpack`` (the fullest GPU that
fits), ``spread`` (the emptiest) and ``random`` (any that fits). Then a batch of waiting
models, each bigger than every hole in the cluster (none fits one GPU as things stand) and no
bigger than the largest GPU, is planned by ``app.scheduler.cleanup.plan``. ``--splittable``
is the share of them the catalog lets split (0 by default: one such model makes the free
memory of nearly every host usable as part of a split, so little counts as stranded).

One row per fill policy: the stranded memory (free memory no model of the batch can use)
before and after the planned moves (before the waiting models take their holes), how much of
it the moves recover, the waiting models placed with no moves and with them, the moves, and
the planner's time over ``--reps`` repetitions of the whole batch (median, p99 and total).
In memory: no Redis.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from app.scheduler.cleanup import (
    GpuState,
    Plan,
    PoolLease,
    Waiting,
    apply_plans,
    plan,
    stranded,
)

GIB = 2**30
HOSTS, GPUS_PER_HOST, MODELS = 125, 8, 50
GPU_SIZES = [24 * GIB, 48 * GIB, 80 * GIB]
BUSY, STANDING = 0.40, 0.05


def churn(rng: random.Random, events: int, fill: str) -> list[GpuState]:
    """A fragmented cluster: ``events`` random arrivals (one GPU each) and departures."""
    keys: list[tuple[str, int, int]] = []
    for h in range(HOSTS):
        size = rng.choice(GPU_SIZES)
        keys += [(f"host{h:03d}", i, size) for i in range(GPUS_PER_HOST)]
    models = [(f"model{i:02d}", int(rng.uniform(2, 70) * GIB)) for i in range(MODELS)]
    free = [total for _, _, total in keys]
    leases: list[list[PoolLease]] = [[] for _ in keys]
    live: list[tuple[int, PoolLease]] = []
    for n in range(events):
        if rng.random() < 0.75 or not live:
            name, need = rng.choice(models)
            fits = [j for j, f in enumerate(free) if f >= need]
            if not fits:
                continue
            if fill == "binpack":
                j = min(fits, key=lambda j: free[j])
            elif fill == "spread":
                j = max(fits, key=lambda j: free[j])
            else:
                j = rng.choice(fits)
            u = rng.random()
            lease = PoolLease(f"pool{n}", name, need, busy=u < BUSY, standing=u > 1 - STANDING)
            leases[j].append(lease)
            free[j] -= need
            live.append((j, lease))
        else:
            j, lease = live.pop(rng.randrange(len(live)))
            leases[j].remove(lease)
            free[j] += lease.bytes
    return [GpuState(h, i, t, tuple(x)) for (h, i, t), x in zip(keys, leases, strict=True)]


def waiting_batch(
    rng: random.Random, gpus: list[GpuState], n: int, splittable: float
) -> list[Waiting]:
    """``n`` models bigger than every hole now, none bigger than the largest GPU."""
    hole = max(g.free() for g in gpus)
    cap = max(g.total for g in gpus)
    out = []
    for i in range(n):
        need = int(rng.uniform(hole + GIB, min(cap, hole + 24 * GIB)))
        out.append(
            Waiting(
                f"waiting{i:02d}",
                need,
                split_allowed=rng.random() < splittable,
                priority=rng.randint(0, 3),
                split_overhead_bytes=GIB,
            )
        )
    return out


def timed(fn: Any, reps: int) -> tuple[Any, list[float]]:
    times, result = [], None
    for _ in range(reps):
        started = time.perf_counter()
        result = fn()
        times.append((time.perf_counter() - started) * 1000)
    return result, times


def timing(times: list[float]) -> dict[str, float]:
    p99 = statistics.quantiles(times, n=100, method="inclusive")[98] if len(times) > 1 else times[0]
    return {"median_ms": statistics.median(times), "p99_ms": p99, "total_ms": sum(times)}


def run(
    seed: int,
    events: int,
    fill: str,
    n_waiting: int,
    splittable: float,
    reps: int,
    max_moves: int,
) -> dict[str, Any]:
    rng = random.Random(seed)
    gpus = churn(rng, events, fill)
    waiting = waiting_batch(rng, gpus, n_waiting, splittable)
    report_before, t_report = timed(lambda: stranded(gpus, waiting), reps)
    plans: list[Plan]
    plans, t_plan = timed(lambda: plan(gpus, waiting, max_moves=max_moves), reps)
    as_is = plan(gpus, waiting, max_moves=0)
    report_after = stranded(apply_plans(gpus, plans, place=False), waiting)
    leases = [x for g in gpus for x in g.leases]
    moves = [m for p in plans for m in p.moves]
    total = sum(g.total for g in gpus)
    recovered = report_before.stranded - report_after.stranded
    return {
        "gpus": len(gpus),
        "hosts": HOSTS,
        "pools": len(leases),
        "busy": sum(x.busy for x in leases),
        "standing": sum(x.standing for x in leases),
        "utilisation": sum(x.bytes for x in leases) / total,
        "largest_hole_gib": max(g.free() for g in gpus) / GIB,
        "waiting": len(waiting),
        "waiting_split_allowed": sum(w.split_allowed for w in waiting),
        "free_gib": report_before.free / GIB,
        "stranded_before_gib": report_before.stranded / GIB,
        "stranded_after_gib": report_after.stranded / GIB,
        "recovered_gib": recovered / GIB,
        "recovered_pct": 100 * recovered / report_before.stranded if report_before.stranded else 0,
        "placed_before": sum(p.ok for p in as_is),
        "placed_after": sum(p.ok for p in plans),
        "actions": {
            a: sum(p.action == a for p in plans) for a in ("fits", "split", "moves", "none")
        },
        "moves": len(moves),
        "max_moves_in_a_plan": max((len(p.moves) for p in plans), default=0),
        "moved_gib": sum(m.bytes for m in moves) / GIB,
        "plan": timing(t_plan),
        "stranded_report": timing(t_report),
        "reps": reps,
        "reasons": [p.reason for p in plans if not p.ok][:5],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--events", type=int, default=4000)
    parser.add_argument("--fill", default="binpack,spread,random")
    parser.add_argument("--waiting", type=int, default=40)
    parser.add_argument("--splittable", type=float, default=0.0)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--max-moves", type=int, default=4)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    fills = [f.strip() for f in args.fill.split(",") if f.strip()]
    if not fills or set(fills) - {"binpack", "spread", "random"}:
        parser.error("--fill takes binpack, spread and/or random, comma-separated")
    results = [
        {"fill": fill}
        | run(
            args.seed,
            args.events,
            fill,
            args.waiting,
            args.splittable,
            args.reps,
            args.max_moves,
        )
        for fill in fills
    ]
    machine = f"{platform.processor() or platform.machine()}, {platform.python_version()}"
    title = (
        f"cleanup: {HOSTS * GPUS_PER_HOST} GPUs / {HOSTS} hosts, {args.events} churn events, "
        f"{args.waiting} waiting, max {args.max_moves} moves ({machine})"
    )
    table = Table(title=title)
    columns = ("fill", "reserved", "stranded GiB", "recovered", "placed", "moves", "plan ms")
    for col in columns:
        table.add_column(col, justify="right")
    for r in results:
        t = r["plan"]
        table.add_row(
            r["fill"],
            f"{r['utilisation'] * 100:.1f}%",
            f"{r['stranded_before_gib']:.0f} → {r['stranded_after_gib']:.0f}",
            f"{r['recovered_gib']:.0f} GiB ({r['recovered_pct']:.1f}%)",
            f"{r['placed_before']} → {r['placed_after']} / {r['waiting']}",
            f"{r['moves']} ({r['moved_gib']:.0f} GiB)",
            f"{t['median_ms']:.0f} / {t['p99_ms']:.0f} / {t['total_ms']:.0f}",
        )
    console = Console(width=max(Console().width, 110))
    console.print(table)
    console.print(
        "stranded GiB: before → after the moves; placed: with no moves → with them; "
        f"plan ms: median / p99 / total of {args.reps} runs over the whole batch"
    )
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "machine": machine,
                    "seed": args.seed,
                    "args": vars(args) | {"json": None},
                    "results": results,
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
