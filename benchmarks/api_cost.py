"""What the API's submit costs in process, and what the garbage collector adds to it.

Calls the ASGI app directly (no network, no uvicorn) with ``POST /v1/workflows`` for N
one-step workflows on SQLite (the dispatcher records its sends; nothing runs), twice:
with the start-up objects frozen as ``corral api`` does at start
(:func:`app.core.process.freeze_startup_objects`) and without. Prints, per variant, the
median and p99 submit, the CPU per submit, the slowest one, the collector's passes during
the run by generation with their longest pause, and one forced full collection::

    python -m benchmarks.api_cost [--n 10000]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from app import db, keys
from app.core.config import Settings, use_settings
from app.core.process import freeze_startup_objects
from app.embedded import EmbeddedRedis
from app.migrate import upgrade
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
    cpu0 = time.process_time()
    try:
        for _ in range(n):
            t0 = time.perf_counter()
            await submit()
            times.append(time.perf_counter() - t0)
    finally:
        gc.callbacks.remove(pauses)
    cpu = time.process_time() - cpu0
    times.sort()
    return {
        "frozen": frozen,
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


async def _run(n: int) -> list[dict[str, Any]]:
    from app.api.main import create_app

    app = create_app(_Recorder())
    with db.session_scope(write=True) as session:
        _row, token = keys.create_key(session, "api-cost")
    submit = _submitter(app, token)
    for _ in range(200):  # warm: caches, compiled statements, the tokenizer
        await submit()
    return [await _measure(submit, n, frozen) for frozen in (True, False)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=10_000, help="submits per variant")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="corral-api-cost-") as tmp:
        work = Path(tmp)
        make_tiny(work / "models")
        server = EmbeddedRedis(work / "redis", persist=False).start()
        settings = Settings(
            database_url=f"sqlite:///{work / 'corral.db'}",
            redis_url=server.url,
            models_dir=work / "models",
            data_dir=work / "data",
        )
        try:
            with use_settings(settings):
                upgrade(settings.sqlalchemy_url)
                results = asyncio.run(_run(args.n))
                machine = describe(settings.sqlalchemy_url, server.url)
                db.dispose_engines()
        finally:
            server.stop()
    table = Table(title=f"POST /v1/workflows through the ASGI app in process, n={args.n} each")
    table.add_column("")
    for r in results:
        table.add_column("frozen (as shipped)" if r["frozen"] else "not frozen")

    def gcs(r: dict[str, Any], *gens: int) -> str:
        runs = [r["collections"][g] for g in gens]
        most = max(x["max_ms"] for x in runs)
        return f"{sum(x['count'] for x in runs)}, max {most} ms"

    rows: list[tuple[str, Callable[[dict[str, Any]], str]]] = [
        ("objects the GC walks", lambda r: f"{r['tracked_objects']}"),
        ("one forced full GC", lambda r: f"{r['full_collection_ms']} ms"),
        ("submit median", lambda r: f"{r['median_ms']} ms"),
        ("submit p99", lambda r: f"{r['p99_ms']} ms"),
        ("slowest submit", lambda r: f"{r['max_ms']} ms"),
        ("CPU per submit", lambda r: f"{r['cpu_ms']} ms"),
        ("young GCs (gen 0, 1)", lambda r: gcs(r, 0, 1)),
        ("full GCs (gen 2)", lambda r: gcs(r, 2)),
    ]
    for label, cell in rows:
        table.add_row(label, *(cell(r) for r in results))
    Console().print(table)
    print(
        f"machine: {machine['cpu']}, {machine['cores']} cores; python {machine['python']}, "
        f"fastapi {machine['fastapi']}, sqlalchemy {machine['sqlalchemy']}, "
        f"{machine['database']}; load average {machine['load_avg_start']}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
