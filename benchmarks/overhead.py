"""Figures 1 to 4: Corral against llama.cpp direct and bare Celery, interleaved in one run.

Every figure alternates Corral and its baseline (which goes first alternates too), so slow
moments of a shared machine fall on both; medians and ratios are what the report shows.
"""

from __future__ import annotations

import dataclasses
import itertools
import statistics
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from functools import partial
from typing import Any

from celery import chain, chord

from benchmarks import bare
from benchmarks.client import BenchClient
from benchmarks.stack import CHAT_MODEL, Stack
from benchmarks.stats import CpuMeter, pct, ratio, summary
from benchmarks.work import GenCall, complete

WAIT_S = 30.0  # one long-poll request's wait
Cpu = dict[str, float | None]  # CPU seconds by process group


def wait_done(client: BenchClient, workflow_id: str, timeout_s: float = 300.0) -> dict[str, Any]:
    """Block (long-poll) until the workflow has ended; its final state."""
    deadline = time.monotonic() + timeout_s
    while True:
        remaining = max(0.0, deadline - time.monotonic())
        resp = client.get(f"/v1/workflows/{workflow_id}", params={"wait_s": min(WAIT_S, remaining)})
        resp.raise_for_status()
        run: dict[str, Any] = resp.json()
        if run["status"] != "running":
            return run
        if time.monotonic() >= deadline:
            raise TimeoutError(f"workflow {workflow_id} still running after {timeout_s:.0f} s")


def _submit(client: BenchClient, spec: dict[str, Any]) -> str:
    resp = client.post("/v1/workflows", json=spec)
    if resp.status_code != 202:
        raise RuntimeError(f"submit refused: HTTP {resp.status_code} {resp.text[:500]}")
    wid: str = resp.json()["id"]
    return wid


def _count(client: BenchClient, status: str) -> int:
    """How many of this key's workflows have ``status``."""
    total, cursor = 0, None
    while True:
        params: dict[str, Any] = {"status": status, "limit": 200}
        if cursor:
            params["cursor"] = cursor
        page = client.get("/v1/workflows", params=params).raise_for_status().json()
        total += len(page["items"])
        cursor = page["next_cursor"]
        if not cursor:
            return total


def _ts(value: str) -> float:
    return datetime.fromisoformat(value).timestamp()


def _alternate(i: int, a: Callable[[], None], b: Callable[[], None]) -> None:
    for fn in (a, b) if i % 2 == 0 else (b, a):
        fn()


# ---- 1. Step overhead ------------------------------------------------------------------


SEGMENTS = ("accept", "to_claim", "model", "worker_rest", "to_client")


def step_overhead(
    stack: Stack, llm: Any, call: GenCall, n: int, warmup: int, *, with_bare: bool = True
) -> dict[str, Any]:
    """One ``generate`` step through the whole path against the same call on ``llm``.

    Corral, two ways a client can take: a submit then a long-poll read (two requests), and
    a submit that waits (``POST …?wait_s=``, one request). Each is HTTP submit → commit →
    Redis → worker → llama.cpp → DB → the final state over HTTP, timed by the client from
    the submit's first byte to the final state's last byte. Direct: the same
    ``create_completion`` on a ``Llama`` loaded in this process. Added latency is Corral
    minus direct, per interleaved round. For scale, the same call as one bare Celery task
    (``send_task`` → worker → Redis result backend → ``get``) is timed alongside.
    """
    key = stack.new_key("bench-step")
    spec = {"name": "bench-step", "steps": [call.step("gen", CHAT_MODEL)]}
    paths = ("two_requests", "one_request")
    corral: dict[str, list[float]] = {p: [] for p in paths}
    segments: dict[str, dict[str, list[float]]] = {p: {s: [] for s in SEGMENTS} for p in paths}
    direct: list[float] = []
    bare_ms: list[float] = []
    args = [dataclasses.asdict(call)]
    submit_ms: list[float] = []

    with stack.client(key) as client:

        def run_corral(path: str, record: bool) -> None:
            wall0, t0 = time.time(), time.perf_counter()
            if path == "one_request":
                resp = client.post("/v1/workflows", json=spec, params={"wait_s": WAIT_S})
                if resp.status_code != 200:
                    raise RuntimeError(f"submit with wait: HTTP {resp.status_code} {resp.text}")
                run = resp.json()
                t1 = t2 = time.perf_counter()
            else:
                wid = _submit(client, spec)
                t1 = time.perf_counter()
                run = wait_done(client, wid)
                t2 = time.perf_counter()
            step = run["steps"][0]
            if run["status"] != "succeeded":
                raise RuntimeError(f"benchmark step did not succeed: {run}")
            if not record:
                return
            corral[path].append((t2 - t0) * 1000)
            if path == "two_requests":
                submit_ms.append((t1 - t0) * 1000)
            model_ms = step["output"]["timings"]["total_ms"]
            queued, started, finished = (
                _ts(step["queued_at"]),
                _ts(step["started_at"]),
                _ts(step["finished_at"]),
            )
            into = segments[path]
            into["accept"].append((queued - wall0) * 1000)
            into["to_claim"].append((started - queued) * 1000)
            into["model"].append(model_ms)
            into["worker_rest"].append((finished - started) * 1000 - model_ms)
            into["to_client"].append((wall0 + (t2 - t0) - finished) * 1000)

        def run_bare(record: bool) -> None:
            t0 = time.perf_counter()
            result = stack.bare_app.send_task(bare.GENERATE, args=args, queue=bare.QUEUE)
            out = result.get(timeout=60)
            elapsed = (time.perf_counter() - t0) * 1000
            result.forget()
            if out["usage"]["completion_tokens"] != call.max_tokens:
                raise RuntimeError(f"bare task made {out['usage']} tokens")
            if record:
                bare_ms.append(elapsed)

        def run_direct(record: bool) -> None:
            t0 = time.perf_counter()
            out = complete(llm, call)
            elapsed = (time.perf_counter() - t0) * 1000
            if out["usage"]["completion_tokens"] != call.max_tokens:
                raise RuntimeError(f"direct call made {out['usage']} tokens")
            if record:
                direct.append(elapsed)

        for i in range(warmup + n):
            record = i >= warmup
            runs = [
                partial(run_corral, "two_requests", record),
                partial(run_corral, "one_request", record),
                partial(run_direct, record),
            ]
            if with_bare:
                runs.append(partial(run_bare, record))
            for fn in runs[i % len(runs) :] + runs[: i % len(runs)]:  # rotate the order
                fn()

    def added(values: list[float]) -> dict[str, Any]:
        return summary([c - d for c, d in zip(values, direct, strict=True)])

    def breakdown(path: str) -> dict[str, float]:
        return {k: round(statistics.median(v), 3) for k, v in segments[path].items()}

    return {
        "n": n,
        # Submit, then a long-poll read (GET …?wait_s=): the figure's first row.
        "corral_ms": summary(corral["two_requests"]),
        "added_ms": added(corral["two_requests"]),
        # A submit that waits for the end (POST …?wait_s=): one request.
        "one_request_ms": summary(corral["one_request"]),
        "one_request_added_ms": added(corral["one_request"]),
        "direct_ms": summary(direct),
        "bare_celery_ms": summary(bare_ms),
        "bare_celery_added_ms": summary([b - d for b, d in zip(bare_ms, direct, strict=True)])
        if bare_ms
        else {"n": 0},
        "submit_http_ms": summary(submit_ms),
        # Where Corral's time goes, from its own timestamps (contiguous, sum to the total):
        # accept = client send → step marked queued (API, before the commit);
        # to_claim = queued → the worker takes the step (commit, publish, Redis, worker;
        # until the step's started_at);
        # model = the runtime's llama.cpp call; worker_rest = the rest of the worker's
        # step until its result is written; to_client = result written → client has it
        # (commit, notify, long-poll wake-up, read, HTTP).
        "breakdown_median_ms": breakdown("two_requests"),
        "one_request_breakdown_median_ms": breakdown("one_request"),
    }


# ---- 2. Dispatch throughput ------------------------------------------------------------


class _Clients:
    """One HTTP client per thread (connections are not shared across threads)."""

    def __init__(self, stack: Stack, key: str) -> None:
        self._local = threading.local()
        self._all: list[BenchClient] = []
        self._lock = threading.Lock()
        self.stack, self.key = stack, key

    def get(self) -> BenchClient:
        client: BenchClient | None = getattr(self._local, "client", None)
        if client is None:
            client = self._local.client = self.stack.client(self.key)
            with self._lock:
                self._all.append(client)
        return client

    def close(self) -> None:
        for client in self._all:
            client.close()


def corral_batch(stack: Stack, call: GenCall, n: int, concurrency: int) -> tuple[float, Cpu]:
    """Submit ``n`` one-step workflows over HTTP and wait for all; (seconds, CPU seconds)."""
    key = stack.new_key("bench-dispatch")
    spec = {"name": "bench-dispatch", "steps": [call.step("gen", CHAT_MODEL)]}
    clients = _Clients(stack, key)
    try:
        with (
            ThreadPoolExecutor(concurrency) as pool,
            CpuMeter(stack.pids("api")) as api,
            CpuMeter(stack.pids("worker")) as worker,
            CpuMeter(stack.pids("redis")) as redis_server,
            CpuMeter(stack.pids("database")) as database,
            CpuMeter() as own,
        ):
            t0 = time.perf_counter()
            ids = list(pool.map(lambda _: _submit(clients.get(), spec), range(n)))
            client = clients.get()
            wait_done(client, ids[-1])
            while True:  # steps run FIFO; anything still running is waited for here
                page = client.get("/v1/workflows", params={"status": "running", "limit": 1})
                items = page.raise_for_status().json()["items"]
                if not items:
                    break
                wait_done(client, items[0]["id"])
            elapsed = time.perf_counter() - t0
        done = _count(client, "succeeded")
    finally:
        clients.close()
    if done != n:
        raise RuntimeError(f"{n - done} of {n} dispatch workflows did not succeed")
    return elapsed, {
        "api": api.used_s,
        "worker": worker.used_s,
        "client": own.used_s,
        **_servers(stack, redis_server, database),
    }


def _servers(stack: Stack, redis_server: CpuMeter, database: CpuMeter) -> Cpu:
    """The local servers' CPU (absent for a server elsewhere, or SQLite's in-process one)."""
    return {
        name: meter.used_s
        for name, meter in (("redis", redis_server), ("database", database))
        if name in stack.services
    }


def _bare_batch(stack: Stack, call: GenCall, n: int) -> tuple[float, Cpu]:
    """``apply_async`` ``n`` bare tasks and collect every result; (seconds, CPU seconds)."""
    args = [dataclasses.asdict(call)]
    with (
        CpuMeter(stack.pids("bare")) as worker,
        CpuMeter(stack.pids("redis")) as redis_server,
        CpuMeter(stack.pids("database")) as database,
        CpuMeter() as own,
    ):
        t0 = time.perf_counter()
        results = [
            stack.bare_app.send_task(bare.GENERATE, args=args, queue=bare.QUEUE) for _ in range(n)
        ]
        outputs = [r.get(timeout=300) for r in results]
        elapsed = time.perf_counter() - t0
    for r in results:
        r.forget()
    if any(o["usage"]["completion_tokens"] != call.max_tokens for o in outputs):
        raise RuntimeError("a bare task generated a different number of tokens")
    return elapsed, {
        "worker": worker.used_s,
        "client": own.used_s,
        **_servers(stack, redis_server, database),
    }


def _medians(values: dict[str, list[float]]) -> dict[str, float]:
    return {k: round(statistics.median(v), 2) for k, v in values.items()}


def dispatch(stack: Stack, call: GenCall, n: int, rounds: int, concurrency: int) -> dict[str, Any]:
    """Workflows per second against bare Celery tasks per second, same broker and workers."""
    corral_rate: list[float] = []
    bare_rate: list[float] = []
    corral_cpu: dict[str, list[float]] = {}
    bare_cpu: dict[str, list[float]] = {}

    def record(into: dict[str, list[float]], cpu: Cpu) -> None:
        total = 0.0
        for name, used in cpu.items():
            if used is not None:
                into.setdefault(name, []).append(used * 1000 / n)
                total += used
        into.setdefault("total", []).append(total * 1000 / n)

    def one_corral() -> None:
        elapsed, cpu = corral_batch(stack, call, n, concurrency)
        corral_rate.append(n / elapsed)
        record(corral_cpu, cpu)

    def one_bare() -> None:
        elapsed, cpu = _bare_batch(stack, call, n)
        bare_rate.append(n / elapsed)
        record(bare_cpu, cpu)

    for i in range(rounds):
        _alternate(i, one_corral, one_bare)
    c, b = statistics.median(corral_rate), statistics.median(bare_rate)
    return {
        "n": n,
        "rounds": rounds,
        "submit_concurrency": concurrency,
        "workers": stack.workers,
        "corral_per_s": summary(corral_rate, 2),
        "bare_per_s": summary(bare_rate, 2),
        "ratio": ratio(c, b),
        "round_ratios": [ratio(x, y) for x, y in zip(corral_rate, bare_rate, strict=True)],
        # CPU per workflow (task), ms, median over rounds: of Corral's API and worker
        # processes or the bare worker, of this benchmark's client process, of the Redis
        # and database servers when they run on this host (the bare side idles the
        # database, whose background work still counts), and in total.
        "corral_cpu_ms_per_item": _medians(corral_cpu),
        "bare_cpu_ms_per_item": _medians(bare_cpu),
    }


# ---- 3. Fan-out ------------------------------------------------------------------------


def fan_out(stack: Stack, call: GenCall, width: int, rounds: int) -> dict[str, Any]:
    """A 1 → ``width`` → 1 workflow against a bare chain(task, chord(group, task))."""
    spec = {
        "name": "bench-fanout",
        "steps": [
            call.step("root", CHAT_MODEL),
            *(call.step(f"p{i:03d}", CHAT_MODEL, depends_on=["root"]) for i in range(width)),
            call.step("join", CHAT_MODEL, depends_on=[f"p{i:03d}" for i in range(width)]),
        ],
    }
    key = stack.new_key("bench-fanout")
    args = [dataclasses.asdict(call)]

    def sig() -> Any:
        return stack.bare_app.signature(bare.GENERATE, args=args, queue=bare.QUEUE, immutable=True)

    corral: list[float] = []
    baseline: list[float] = []
    with stack.client(key) as client:

        def one_corral() -> None:
            t0 = time.perf_counter()
            run = wait_done(client, _submit(client, spec))
            corral.append((time.perf_counter() - t0) * 1000)
            if run["status"] != "succeeded" or len(run["steps"]) != width + 2:
                raise RuntimeError(f"fan-out workflow did not succeed: {run['status']}")

        def one_bare() -> None:
            t0 = time.perf_counter()
            result = chain(sig(), chord([sig() for _ in range(width)], sig())).apply_async()
            out = result.get(timeout=300)
            baseline.append((time.perf_counter() - t0) * 1000)
            if out["usage"]["completion_tokens"] != call.max_tokens:
                raise RuntimeError(f"bare chord returned {out}")

        for i in range(rounds):
            _alternate(i, one_corral, one_bare)
    c, b = statistics.median(corral), statistics.median(baseline)
    return {
        "width": width,
        "rounds": rounds,
        "workers": stack.workers,
        "corral_ms": summary(corral, 1),
        "bare_ms": summary(baseline, 1),
        "ratio": ratio(c, b),
        "round_ratios": [ratio(x, y) for x, y in zip(corral, baseline, strict=True)],
    }


# ---- 4. Submission API -----------------------------------------------------------------


def _load(
    n: int, concurrency: int, request: Callable[[BenchClient], Any], clients: _Clients
) -> tuple[float, list[float], int]:
    """``n`` requests from ``concurrency`` threads; (seconds, latencies in ms, 2xx count)."""
    counter = itertools.count()
    lock = threading.Lock()
    latencies: list[float] = []
    ok = 0

    def worker() -> None:
        nonlocal ok
        client = clients.get()
        mine: list[float] = []
        good = 0
        while True:
            with lock:
                if next(counter) >= n:
                    break
            t0 = time.perf_counter()
            resp = request(client)
            mine.append((time.perf_counter() - t0) * 1000)
            good += resp.is_success
        with lock:
            latencies.extend(mine)
            ok += good

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        for future in [pool.submit(worker) for _ in range(concurrency)]:
            future.result()
    return time.perf_counter() - t0, latencies, ok


def _paused(stack: Stack, queue: str) -> list[str]:
    """Stop the workers that consume ``queue`` from taking its messages (their pools stay
    live and keep announcing themselves); the nodes paused."""
    control = stack.bare_app.control
    active = control.inspect(timeout=5).active_queues() or {}
    nodes = [node for node, queues in active.items() if any(q["name"] == queue for q in queues)]
    if not nodes:
        raise RuntimeError(f"no worker consumes {queue}: {active}")
    control.cancel_consumer(queue, destination=nodes, reply=True, timeout=5)
    return nodes


def submission(stack: Stack, n: int, concurrency: int, rounds: int) -> dict[str, Any]:
    """Accepted workflows per second at a fixed concurrency, against ``GET /healthz``.

    The workflows' one step is the same ``generate`` on the served chat model as the other
    figures'; its pool stops consuming meanwhile (Celery's ``cancel_consumer``) while it
    stays live, so the API takes its usual path and nothing runs while it is measured. The
    queue is purged and consumption resumed afterwards. ``/healthz`` on the same server,
    client and concurrency is the HTTP stack's own floor.
    """
    key = stack.new_key("bench-submit")
    spec = {"name": "bench-submit", "steps": [GenCall().step("gen", CHAT_MODEL)]}
    queue = f"model.{CHAT_MODEL}"
    clients = _Clients(stack, key)
    rates: list[float] = []
    latencies: list[float] = []
    floor_rates: list[float] = []
    floor_latencies: list[float] = []
    api_cpu: list[float] = []
    refused = 0

    def one_corral() -> None:
        nonlocal refused
        with CpuMeter(stack.pids("api")) as cpu:
            elapsed, lat, ok = _load(
                n, concurrency, lambda c: c.post("/v1/workflows", json=spec), clients
            )
        rates.append(ok / elapsed)
        latencies.extend(lat)
        refused += n - ok
        api_cpu.append((cpu.used_s or 0.0) * 1000 / n)

    def one_floor() -> None:
        elapsed, lat, _ok = _load(n, concurrency, lambda c: c.get("/healthz"), clients)
        floor_rates.append(n / elapsed)
        floor_latencies.extend(lat)

    paused = _paused(stack, queue)
    try:
        for i in range(rounds):
            _alternate(i, one_corral, one_floor)
        ran = _count(clients.get(), "succeeded")
        if ran > stack.workers:  # at most what the pool had prefetched when paused
            raise RuntimeError(f"{ran} submitted steps ran: the pool did not pause")
    finally:
        clients.close()
        stack.purge(queue)
        stack.bare_app.control.add_consumer(queue, destination=paused, reply=True, timeout=5)
    return {
        "n": n,
        "rounds": rounds,
        "concurrency": concurrency,
        "accepted_per_s": summary(rates, 1),
        "latency_ms": {**summary(latencies), "p50": round(pct(latencies, 50), 3)},
        "refused": refused,
        "api_cpu_ms_per_submit": summary(api_cpu, 2),
        "healthz_per_s": summary(floor_rates, 1),
        "healthz_latency_ms": {
            **summary(floor_latencies),
            "p50": round(pct(floor_latencies, 50), 3),
        },
        "ratio_to_healthz": ratio(statistics.median(rates), statistics.median(floor_rates)),
    }
