"""The fragmentation-cleanup planner: stranded memory and the fewest moves of idle pools.

Pure: hand-made snapshots, and random small hosts checked against a brute force over every
subset of idle leases and every assignment of it to destinations.
"""

from __future__ import annotations

import random
from itertools import combinations, product

import pytest

from app.scheduler.cleanup import (
    GpuState,
    Move,
    Plan,
    PoolLease,
    Waiting,
    apply_plans,
    plan,
    stranded,
)

GIB = 2**30


def idle(pool: str, gib: float) -> PoolLease:
    return PoolLease(pool, f"m-{pool}", int(gib * GIB))


def busy(pool: str, gib: float) -> PoolLease:
    return PoolLease(pool, f"m-{pool}", int(gib * GIB), busy=True)


def standing(pool: str, gib: float) -> PoolLease:
    return PoolLease(pool, f"m-{pool}", int(gib * GIB), standing=True)


def gpu(key: str, total_gib: float, *leases: PoolLease) -> GpuState:
    host, index = key.split(":")
    return GpuState(host, int(index), int(total_gib * GIB), tuple(leases))


def check_valid(gpus: list[GpuState], plans: list[Plan], headroom: int = 0) -> None:
    """Replays ``plans`` independently: only idle, non-standing leases move, within one host,
    and no GPU ever holds more than its total − headroom."""
    free = {g.key: g.total - headroom - sum(x.bytes for x in g.leases) for g in gpus}
    leases = {g.key: list(g.leases) for g in gpus}
    for p in plans:
        for m in p.moves:
            lease = next(x for x in leases[m.from_gpu] if x.pool_id == m.pool_id)
            assert not lease.busy and not lease.standing
            assert lease.bytes == m.bytes and lease.model == m.model
            assert m.from_gpu != m.to_gpu
            assert m.from_gpu.split(":")[0] == m.to_gpu.split(":")[0]
            assert free[m.to_gpu] >= m.bytes
            leases[m.from_gpu].remove(lease)
            leases[m.to_gpu].append(lease)
            free[m.from_gpu] += m.bytes
            free[m.to_gpu] -= m.bytes
        if p.action == "moves":
            assert len(p.placement) == 1
        for key, n in p.placement:
            assert free[key] >= n
            free[key] -= n
            leases[key].append(PoolLease(f"new-{p.model}", p.model, n, busy=True))
        if p.ok:
            assert sum(n for _, n in p.placement) >= p.need_bytes


# Hand-made cases ----------------------------------------------------------------------------
def test_one_move_of_an_idle_pool_makes_the_hole() -> None:
    gpus = [gpu("h:0", 24, idle("a", 6), busy("b", 8)), gpu("h:1", 24, busy("c", 14))]
    [p] = plan(gpus, [Waiting("big", 16 * GIB)])
    assert p.action == "moves"
    assert p.moves == (Move("a", "m-a", 6 * GIB, "h:0", "h:1"),)
    assert p.placement == (("h:0", 16 * GIB),)
    check_valid(gpus, [p])
    after = {g.key: g for g in apply_plans(gpus, [p], place=False)}
    assert after["h:0"].free() == 16 * GIB
    assert after["h:1"].free() == 4 * GIB


def test_nothing_to_plan_when_it_fits() -> None:
    gpus = [gpu("h:0", 24, idle("a", 6)), gpu("h:1", 24, busy("c", 14))]
    [p] = plan(gpus, [Waiting("small", 9 * GIB)])
    assert p.action == "fits" and p.moves == ()
    assert p.placement == (("h:1", 9 * GIB),)  # binpack: the fullest GPU that fits


def test_a_busy_pool_is_never_moved() -> None:
    # Moving the busy 6 GiB pool off h:0 would cost fewer bytes; the idle 8 GiB one moves.
    gpus = [
        gpu("h:0", 24, busy("b", 6), idle("i", 8)),
        gpu("h:1", 24, idle("s", 4), busy("c", 10)),
    ]
    [p] = plan(gpus, [Waiting("big", 16 * GIB)])
    assert p.action == "moves"
    assert [m.pool_id for m in p.moves] == ["i"]
    check_valid(gpus, [p])


def test_no_plan_when_only_busy_pools_could_move() -> None:
    gpus = [gpu("h:0", 24, busy("a", 6), busy("b", 8)), gpu("h:1", 24, busy("c", 14))]
    [p] = plan(gpus, [Waiting("big", 16 * GIB)])
    assert p.action == "none" and p.moves == () and p.placement == ()
    assert p.reason == (
        "needs 16.00 GiB; largest hole after moving every idle pool on host h is 10.00 GiB "
        "(busy pools and standing reservations hold the rest)"
    )


def test_standing_reservations_are_never_moved() -> None:
    gpus = [
        gpu("h:0", 24, standing("s", 6), busy("b", 8)),
        gpu("h:1", 24, idle("i", 6), busy("c", 8)),
    ]
    [p] = plan(gpus, [Waiting("big", 16 * GIB)])
    assert p.action == "moves"
    assert p.moves == (Move("i", "m-i", 6 * GIB, "h:1", "h:0"),)
    assert p.placement == (("h:1", 16 * GIB),)
    only_standing = [gpu("h:0", 24, standing("s", 14)), gpu("h:1", 24, standing("t", 14))]
    [q] = plan(only_standing, [Waiting("big", 16 * GIB)])
    assert q.action == "none"
    assert "largest hole after moving every idle pool on host h is 10.00 GiB" in q.reason


def test_a_split_model_is_not_planned_when_its_split_fits() -> None:
    gpus = [gpu("h:0", 24, idle("a", 6), busy("b", 8)), gpu("h:1", 24, busy("c", 14))]
    [p] = plan(gpus, [Waiting("big", 16 * GIB, split_allowed=True)])
    assert p.action == "split" and p.moves == ()
    assert sorted(k for k, _ in p.placement) == ["h:0", "h:1"]
    assert sum(n for _, n in p.placement) == 16 * GIB
    check_valid(gpus, [p])
    # With 5 GiB per extra GPU the split needs 21 GiB of the 20 free: a hole is planned.
    [q] = plan(gpus, [Waiting("big", 16 * GIB, split_allowed=True, split_overhead_bytes=5 * GIB)])
    assert q.action == "moves" and len(q.moves) == 1


def test_two_waiting_models_never_get_the_same_hole() -> None:
    gpus = [gpu("h:0", 24, idle("a", 6), busy("b", 8)), gpu("h:1", 24, busy("c", 14))]
    waiting = [Waiting("low", 16 * GIB, priority=1), Waiting("high", 16 * GIB, priority=5)]
    first, second = plan(gpus, waiting)
    assert (first.model, first.action) == ("high", "moves")
    assert (second.model, second.action) == ("low", "none")
    assert second.reason.startswith("needs 16.00 GiB; no host has that much free memory")
    check_valid(gpus, [first, second])


def test_two_waiting_models_get_two_holes() -> None:
    gpus = [
        gpu("h:0", 24, idle("a", 6), busy("b", 8)),
        gpu("h:1", 24, idle("c", 6), busy("d", 8)),
        gpu("h:2", 24, busy("e", 12)),
    ]
    plans = plan(gpus, [Waiting("x", 16 * GIB), Waiting("y", 16 * GIB)])
    assert [p.action for p in plans] == ["moves", "moves"]
    holes = [p.placement[0][0] for p in plans]
    assert len(set(holes)) == 2
    assert [len(p.moves) for p in plans] == [1, 2]
    check_valid(gpus, plans)


def test_fewest_moves_then_fewest_bytes() -> None:
    # h:0 needs one move of the 9 GiB pool; h:1 would need three small ones.
    gpus = [
        gpu("h:0", 24, idle("nine", 9), idle("one", 1), busy("b", 4)),
        gpu("h:1", 24, idle("p", 3), idle("q", 3), idle("r", 3), busy("c", 5)),
        gpu("h:2", 24, busy("d", 12)),
    ]
    [p] = plan(gpus, [Waiting("big", 19 * GIB)])
    assert [m.pool_id for m in p.moves] == ["nine"]
    # Among one-move plans the fewest bytes: h:2's hole could also hold it.
    gpus2 = [
        gpu("h:0", 24, idle("a", 8), busy("b", 6)),
        gpu("h:1", 24, idle("c", 7), busy("d", 7)),
        gpu("h:2", 24, busy("e", 16)),
    ]
    [q] = plan(gpus2, [Waiting("big", 16 * GIB)])
    assert [m.pool_id for m in q.moves] == ["c"]
    assert q.placement == (("h:1", 16 * GIB),)


def test_moves_are_packed_exactly_where_best_fit_fails() -> None:
    # 3, 3, 2, 2 GiB into holes of 6 and 4: best-fit decreasing puts a 3 in the 4 and fails;
    # 3 + 3 and 2 + 2 fit.
    gpus = [
        gpu("h:0", 24, idle("a", 3), idle("b", 3), idle("c", 2), idle("d", 2), busy("e", 10)),
        gpu("h:1", 24, busy("f", 18)),
        gpu("h:2", 24, busy("g", 20)),
    ]
    [p] = plan(gpus, [Waiting("big", 14 * GIB)])
    assert p.action == "moves" and len(p.moves) == 4
    assert {m.pool_id: m.to_gpu for m in p.moves} == {
        "a": "h:1",
        "b": "h:1",
        "c": "h:2",
        "d": "h:2",
    }
    check_valid(gpus, [p])


def test_the_exact_search_finds_what_largest_first_misses() -> None:
    # Deficit 9 GiB, one 9 GiB hole to move into: largest first moves the 7 and is stuck;
    # 5 + 4 fits.
    gpus = [
        gpu("h:0", 24, idle("seven", 7), idle("five", 5), idle("four", 4), busy("b", 6)),
        gpu("h:1", 24, busy("c", 15)),
    ]
    [p] = plan(gpus, [Waiting("big", 11 * GIB)])
    assert sorted(m.pool_id for m in p.moves) == ["five", "four"]
    [greedy] = plan(gpus, [Waiting("big", 11 * GIB)], exact_limit=0)
    assert greedy.action == "none"


def test_many_small_pools_are_planned_greedily_past_the_exact_bound() -> None:
    gpus = [
        gpu("h:0", 80, *(idle(f"p{i}", 2) for i in range(30)), busy("b", 10)),
        gpu("h:1", 80, busy("c", 55)),
        gpu("h:2", 80, busy("d", 60)),
    ]
    # 10 GiB free on h:0 and 20 GiB to move out: ten of the thirty 2 GiB pools, C(30, 10)
    # subsets to try exactly, so the greedy search plans it.
    [p] = plan(gpus, [Waiting("big", 30 * GIB)], max_moves=12)
    assert p.action == "moves" and len(p.moves) == 10
    assert p.placement == (("h:0", 30 * GIB),)
    check_valid(gpus, [p])


def test_max_moves_bounds_the_plan_and_says_so() -> None:
    gpus = [
        gpu("h:0", 24, *(idle(f"p{i}", 2) for i in range(5)), busy("b", 10)),
        gpu("h:1", 24, busy("c", 16)),
    ]
    [p] = plan(gpus, [Waiting("big", 10 * GIB)], max_moves=2)
    assert p.action == "none"
    assert "takes 3 moves of idle pools (more than max_moves=2)" in p.reason
    [q] = plan(gpus, [Waiting("big", 10 * GIB)], max_moves=3)
    assert q.action == "moves" and len(q.moves) == 3
    [r] = plan(gpus, [Waiting("big", 10 * GIB)], max_moves=0)
    assert r.action == "none"


def test_reasons_for_models_too_big() -> None:
    gpus = [gpu("h:0", 24, idle("a", 6)), gpu("g:0", 24, idle("b", 20))]
    [p] = plan(gpus, [Waiting("huge", 30 * GIB)])
    assert (
        p.reason == "needs 30.00 GiB; no GPU can ever hold it (largest after headroom: 24.00 GiB)"
    )
    [q] = plan(gpus, [Waiting("big", 20 * GIB)])
    assert q.reason == (
        "needs 20.00 GiB; no host has that much free memory (most: 18.00 GiB on host h)"
    )


def test_a_pool_split_across_gpus_is_not_moved() -> None:
    gpus = [
        gpu("h:0", 24, idle("split", 6), busy("b", 8)),
        gpu("h:1", 24, idle("split", 4), busy("c", 10)),
        gpu("h:2", 24, busy("d", 12)),
    ]
    [p] = plan(gpus, [Waiting("big", 16 * GIB)])
    assert p.action == "none"


def test_apply_plans_refuses_a_busy_move() -> None:
    gpus = [gpu("h:0", 24, busy("b", 6)), gpu("h:1", 24)]
    bad = Plan("x", GIB, 0, "moves", (), (Move("b", "m-b", 6 * GIB, "h:0", "h:1"),))
    with pytest.raises(ValueError, match="not an idle lease"):
        apply_plans(gpus, [bad])


# Stranded memory ----------------------------------------------------------------------------
def test_stranded_report_per_gpu_and_host() -> None:
    gpus = [
        gpu("a:0", 24, busy("x", 14)),  # 10 free: the 8 GiB model fits
        gpu("a:1", 24, busy("y", 21)),  # 3 free: stranded
        gpu("c:0", 24, busy("z", 2)),  # 22 free
        gpu("c:1", 24, busy("w", 19)),  # 5 free: part of the 30 GiB model's split
        gpu("c:2", 24, busy("v", 18)),  # 6 free: part of the split
    ]
    waiting = [
        Waiting("eight", 8 * GIB),
        Waiting("thirty", 30 * GIB, split_allowed=True, split_overhead_bytes=GIB),
    ]
    report = stranded(gpus, waiting)
    by_gpu = {g.key: (g.free // GIB, g.stranded // GIB) for g in report.gpus}
    assert by_gpu == {"a:0": (10, 0), "a:1": (3, 3), "c:0": (22, 0), "c:1": (5, 0), "c:2": (6, 0)}
    hosts = {
        h.host: (h.free // GIB, h.stranded // GIB, h.largest_hole // GIB) for h in report.hosts
    }
    assert hosts == {"a": (13, 3, 10), "c": (33, 0, 22)}
    assert (report.free, report.stranded) == (46 * GIB, 3 * GIB)
    # Without the split model, c:1 and c:2 are stranded; with nothing waiting, everything.
    assert stranded(gpus, waiting[:1]).stranded == 14 * GIB
    assert stranded(gpus, []).stranded == report.free
    # Headroom comes off every GPU's free memory.
    with_headroom = stranded(gpus, waiting[:1], headroom=GIB)
    assert with_headroom.free == 41 * GIB
    assert with_headroom.stranded == (2 + 4 + 5) * GIB


def test_plans_recover_stranded_memory() -> None:
    gpus = [gpu("h:0", 24, idle("a", 6), busy("b", 8)), gpu("h:1", 24, busy("c", 14))]
    waiting = [Waiting("big", 16 * GIB)]
    before = stranded(gpus, waiting)
    after = stranded(apply_plans(gpus, plan(gpus, waiting), place=False), waiting)
    assert (before.stranded, after.stranded) == (20 * GIB, 4 * GIB)


# Fewest moves against a brute force ---------------------------------------------------------
def random_cluster(rng: random.Random) -> list[GpuState]:
    gpus: list[GpuState] = []
    largest_pool = rng.choice([3, 5])  # many small pools on some seeds, fewer larger on others
    for host in ("h", "k")[: rng.randint(1, 2)]:
        totals = [rng.randint(6, 12) for _ in range(rng.randint(2, 4))]
        held: list[list[PoolLease]] = [[] for _ in totals]
        for n in range(rng.randint(3, 6)):
            size = rng.randint(1, largest_pool)
            fits = [i for i, t in enumerate(totals) if t - sum(x.bytes for x in held[i]) >= size]
            if not fits:
                continue
            # One pool on every GPU first (no GPU stays empty), then anywhere it fits.
            where = n if n in fits else rng.choice(fits)
            kind = rng.random()
            held[where].append(
                PoolLease(f"{host}{n}", f"m{n}", size, busy=kind < 0.2, standing=kind > 0.9)
            )
        gpus += [
            GpuState(host, i, t, tuple(h))
            for i, (t, h) in enumerate(zip(totals, held, strict=True))
        ]
    return gpus


def brute_force(gpus: list[GpuState], need: int) -> tuple[int, int, str, int] | None:
    """(moves, bytes, host, index) of the best hole, over every subset and assignment."""
    best = None
    for t in gpus:
        dests = [g for g in gpus if g.host == t.host and g is not t]
        caps = [g.free() for g in dests]
        movable = [x for x in t.leases if not x.busy and not x.standing]
        for k in range(len(movable) + 1):
            for subset in combinations(movable, k):
                moved = sum(x.bytes for x in subset)
                if t.free() + moved < need:
                    continue
                for where in product(range(len(dests)), repeat=k):
                    load = [0] * len(dests)
                    for x, j in zip(subset, where, strict=True):
                        load[j] += x.bytes
                    if all(load[j] <= caps[j] for j in range(len(dests))):
                        rank = (k, moved, t.host, t.index)
                        best = rank if best is None or rank < best else best
                        break
    return best


@pytest.mark.parametrize("seed", range(200))
def test_fewest_moves_matches_brute_force(seed: int) -> None:
    rng = random.Random(seed)
    gpus = random_cluster(rng)
    largest = max(g.free() for g in gpus)
    cap = max(largest + 1, max(g.total for g in gpus))
    need = cap if rng.random() < 0.5 else rng.randint(largest + 1, cap)  # a whole GPU, often
    [p] = plan(gpus, [Waiting("w", need)], max_moves=6)
    best = brute_force(gpus, need)
    check_valid(gpus, [p])
    if best is None:
        assert p.action == "none", p
        return
    assert p.action == "moves", (best, p.reason)
    host, index = p.placement[0][0].split(":")
    assert (len(p.moves), p.bytes_moved, host, int(index)) == best
    # With fewer moves allowed than needed there is no plan.
    if best[0] > 1:
        [q] = plan(gpus, [Waiting("w", need)], max_moves=best[0] - 1)
        assert q.action == "none"


@pytest.mark.parametrize("seed", range(50))
def test_several_waiting_models_plan_validly_and_deterministically(seed: int) -> None:
    rng = random.Random(1000 + seed)
    gpus = random_cluster(rng)
    waiting = [
        Waiting(f"w{i}", rng.randint(2, 16), split_allowed=rng.random() < 0.3, priority=i % 3)
        for i in range(3)
    ]
    plans = plan(gpus, waiting, max_moves=6)
    check_valid(gpus, plans)
    assert [p.priority for p in plans] == sorted((p.priority for p in plans), reverse=True)
    assert plan(gpus, waiting, max_moves=6) == plans
    greedy = plan(gpus, waiting, max_moves=6, exact_limit=0)  # the greedy path everywhere
    check_valid(gpus, greedy)
