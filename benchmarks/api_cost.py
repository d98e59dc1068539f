"""What the API's submit costs in process: on its event loop and in its thread pool, and
what the garbage collector adds.

Calls the ASGI app directly (no network, no uvicorn) with ``POST /v1/workflows`` for N
one-step workflows (the dispatcher records its sends; nothing runs), on SQLite or, with
``--database``, a PostgreSQL database it may migrate. Three variants, in turn: the submit
as shipped (on the event loop: inline work on SQLite, awaited on the loop's own
connections on PostgreSQL, :mod:`app.loopdb`; the start-up objects frozen as ``corral
api`` does, :func:`app.core.process.freeze_startup_objects`), the same submit in the
thread pool (a dispatcher that cannot send from the loop), and the shipped one without
the freeze. With ``--rounds R`` the variants alternate R times and each cell is the
median of its rounds. Prints, per variant, the median and p99 submit, the CPU per submit
(every thread of this process), the slowest one, the collector's passes by generation
with their longest pause, and one forced full collection::

    python -m benchmarks.api_cost [--n 10000] [--rounds 1] [--database URL]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from app import loopdb
from app.store import db
from app.store import keys
from app.api.routes.workflows import SUBMIT_PATHS
from app.core.config import Settings, use_settings
from app.core.process import freeze_startup_objects
from app.core.embedded import EmbeddedRedis
from app.engine import Dispatch
from app.store.migrate import upgrade
from benchmarks.engine_cost import SPEC, _Recorder
from benchmarks.machine import describe
from models.tiny import make_tiny

Call = Callable[[], Awaitable[None]]


def _submitter(app: Any, token: str) -> Call:
    body = json.dumps(SPEC).encode()
    headers = [
        (b"host", b"corral"),
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"authorization", f"Bearer {token}".encode()),
    ]

    async def submit() -> None:
        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "POST",
            "scheme": "http",
            "path": "/v1/workflows",
            "raw_path": b"/v1/workflows",
            "query_string": b"",
            "root_path": "",
            "headers": headers,
            "client": ("127.0.0.1", 1),
            "server": ("127.0.0.1", 80),
            "state": {},
        }
        sent: list[dict[str, Any]] = []
        delivered = False

        async def receive() -> dict[str, Any]:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            await asyncio.Event().wait()  # the client never disconnects
            raise AssertionError("unreachable")

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        await app(scope, receive, send)
        if sent[0]["status"] != 202:
            raise RuntimeError(f"submit answered {sent[0]['status']}: {sent[1:]}")

    return submit


class _Pauses:
    """The collector's passes during a run: count, total and longest pause per generation."""

    def __init__(self) -> None:
        self.runs = [[0, 0.0, 0.0] for _ in range(3)]
        self._started = 0.0

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
            return
        took = time.perf_counter() - self._started
        entry = self.runs[info["generation"]]
        entry[0] += 1
        entry[1] += took
        entry[2] = max(entry[2], took)


async def _measure(submit: Call, n: int, frozen: bool) -> dict[str, Any]:
    gc.unfreeze()
    if frozen:
        freeze_startup_objects()
    else:
        gc.collect()
    tracked = len(gc.get_objects())
    started = time.perf_counter()
    gc.collect()
    full_ms = (time.perf_counter() - started) * 1000
    pauses = _Pauses()
    gc.callbacks.append(pauses)
    times: list[float] = []
    on_loop = SUBMIT_PATHS["event_loop"]
    cpu0 = time.process_time()
    try:
        for _ in range(n):
            t0 = time.perf_counter()
            await submit()
            times.append(time.perf_counter() - t0)
    finally:
        gc.callbacks.remove(pauses)
    cpu = time.process_time() - cpu0
    on_loop = SUBMIT_PATHS["event_loop"] - on_loop
    times.sort()
    return {
        "frozen": frozen,
        "on_loop": on_loop,
        "tracked_objects": tracked,
        "full_collection_ms": round(full_ms, 2),
        "median_ms": round(statistics.median(times) * 1000, 3),
        "p99_ms": round(times[int(len(times) * 0.99)] * 1000, 3),
        "max_ms": round(times[-1] * 1000, 2),
        "cpu_ms": round(cpu / n * 1000, 3),
        "collections": [
            {
                "generation": g,
                "count": c,
                "total_ms": round(t * 1000, 1),
                "max_ms": round(m * 1000, 2),
            }
            for g, (c, t, m) in enumerate(pauses.runs)
        ],
    }


class _LoopRecorder(_Recorder):
    """Records sends, from the event loop too: the API submits there (as with Celery)."""

    async def send_async(
        self, dispatches: Sequence[Dispatch], committed: Awaitable[object] | None = None
    ) -> None:
        self.sent.extend(dispatches)
        if committed is not None:
            await committed


# (column, on the loop, frozen): the shipped submit, the thread pool's, the shipped unfrozen.
VARIANTS = [
    ("event loop (as shipped)", True, True),
    ("thread pool", False, True),
    ("event loop, not frozen", True, False),
]


async def _run(n: int, rounds: int) -> list[dict[str, Any]]:
    from app.api.main import create_app

    with db.session_scope(write=True) as session:
        _row, token = keys.create_key(session, "api-cost")
    submits = {
        loop: _submitter(create_app(_LoopRecorder() if loop else _Recorder()), token)
        for loop in (True, False)
    }
    for submit in submits.values():
        for _ in range(200):  # warm: caches, compiled statements, the tokenizer
            await submit()
    runs: list[list[dict[str, Any]]] = [[] for _ in VARIANTS]
    try:
        for _ in range(rounds):
            for i, (_name, loop, frozen) in enumerate(VARIANTS):
                runs[i].append(await _measure(submits[loop], n, frozen))
    finally:
        await loopdb.close_loop()
    return [_median_of(found) for found in runs]


def _median_of(found: list[dict[str, Any]]) -> dict[str, Any]:
    """One variant's rounds as one: the median of each figure (the first's otherwise)."""
    out = dict(found[0])
    for key, value in found[0].items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[key] = statistics.median(r[key] for r in found)
    out["collections"] = [
        {
            k: statistics.median(r["collections"][g][k] for r in found)
            for k in found[0]["collections"][g]
        }
        for g in range(3)
    ]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=10_000, help="submits per variant and round")
    p.add_argument("--rounds", type=int, default=1, help="times the variants alternate")
    p.add_argument(
        "--database",
        default=None,
        help="a database URL to submit into (migrated); default a SQLite file of its own",
    )
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="corral-api-cost-") as tmp:
        work = Path(tmp)
        make_tiny(work / "models")
        server = EmbeddedRedis(work / "redis", persist=False).start()
        settings = Settings(
            database_url=args.database or f"sqlite:///{work / 'corral.db'}",
            redis_url=server.url,
            models_dir=work / "models",
            data_dir=work / "data",
        )
        try:
            with use_settings(settings):
                upgrade(settings.sqlalchemy_url)
                results = asyncio.run(_run(args.n, args.rounds))
                machine = describe(settings.sqlalchemy_url, server.url)
                db.dispose_engines()
        finally:
            server.stop()
    title = f"POST /v1/workflows through the ASGI app in process, n={args.n} each"
    if args.rounds > 1:
        title += f", median of {args.rounds} alternating rounds"
    table = Table(title=title)
    table.add_column("")
    for name, _loop, _frozen in VARIANTS:
        table.add_column(name)

    def gcs(r: dict[str, Any], *gens: int) -> str:
        runs = [r["collections"][g] for g in gens]
        most = max(x["max_ms"] for x in runs)
        return f"{sum(x['count'] for x in runs)}, max {most} ms"

    rows: list[tuple[str, Callable[[dict[str, Any]], str]]] = [
        ("objects the GC walks", lambda r: f"{r['tracked_objects']}"),
        ("one forced full GC", lambda r: f"{r['full_collection_ms']} ms"),
        ("submits on the event loop", lambda r: f"{r['on_loop']} of {args.n}"),
        ("submit median", lambda r: f"{r['median_ms']} ms"),
        ("submit p99", lambda r: f"{r['p99_ms']} ms"),
        ("slowest submit", lambda r: f"{r['max_ms']} ms"),
        ("CPU per submit", lambda r: f"{r['cpu_ms']} ms"),
        ("young GCs (gen 0, 1)", lambda r: gcs(r, 0, 1)),
        ("full GCs (gen 2)", lambda r: gcs(r, 2)),
    ]
    for label, cell in rows:
        table.add_row(label, *(cell(r) for r in results))
    (Console() if sys.stdout.isatty() else Console(width=150)).print(table)
    print(
        f"machine: {machine['cpu']}, {machine['cores']} cores; python {machine['python']}, "
        f"fastapi {machine['fastapi']}, sqlalchemy {machine['sqlalchemy']}, "
        f"{machine['database']}; load average {machine['load_avg_start']}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
