"""What the workflow engine's database work costs per call, in process, per database.

A one-step workflow makes four calls: the API's submit (create), the worker's claim (it
takes the work its message carried and checks the cancel flag in Redis; with
``CORRAL_CLAIM_AFTER_S=0`` it writes its claim before the model runs), its result, and the
client's status read. This runs those calls for N one-step workflows in this process (no
HTTP, no broker: the dispatcher records its sends) and prints, per call, the median wall
time, the mean CPU time, and how many statements, transactions and (on a database server)
round trips it made. On a database server every other workflow's step is read instead
of taken from its message (the row ``claim, read``, as for a step that carries nothing;
on SQLite every step is read: a call in this process), and every other pair of results
takes the locked path instead of the one round trip the states carried or read allow (the
row ``result, locked``), side by side::

    python -m benchmarks.engine_cost [--n 300] [--database postgresql://…] [--rtt-ms MS]
                                     [--compare [execute|binding]]

``--rtt-ms`` reaches the server database through a proxy that adds that round-trip time
(``benchmarks/delay_proxy.py``), as a database on another host would.

``--compare`` runs the four calls alternately with the engine's statements on the
driver's cursor (``app/prepared.py``, as shipped) and through SQLAlchemy's
``Connection.execute`` (as before it), and prints the mean CPU per call each way.
``--compare binding`` (a server database only) alternates the way a PostgreSQL script's
named calls are bound: psycopg's quoting per value (``prepared.Binder``, as shipped)
against ``ClientCursor.mogrify`` of the call's template (as before it).

SQLite (a file in a temporary directory) always; a server database too with
``--database`` or ``CORRAL_BENCH_DATABASE_URL`` (it is migrated and written to). The
result's finish notice goes to an embedded redis-server (or ``CORRAL_BENCH_REDIS_URL``).
Every claim runs as in a worker that has not seen the workflow yet.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table
from sqlalchemy import event

from app import engine, prepared, rows, specs
from app.store import db
from app.api.routes.workflows import _fresh_view
from app.core.config import Settings, use_settings
from app.core.embedded import EmbeddedRedis
from app.engine import Dispatch
from app.store.migrate import upgrade
from app.workflows.spec import validate_workflow
from benchmarks import stats
from benchmarks.delay_proxy import delayed
from benchmarks.stack import DATABASE_ENV, REDIS_ENV, local_servers
from models.catalog import load_catalog
from models.tiny import make_tiny
from workers.steps import take

CALLS = ("submit", "claim", "result", "read")
READ = "claim, read"  # a step taken by reading it, not from what its message carried
LOCKED = "result, locked"  # a result without the states its claim read: two round trips
SPEC = {
    "name": "engine-cost",
    "steps": [
        {
            "id": "gen",
            "kind": "generate",
            "model": "tiny-chat",
            "input": {"prompt": "Hello there", "max_tokens": 16},
        }
    ],
}


class _Recorder:
    def __init__(self) -> None:
        self.sent: list[Dispatch] = []

    def send(self, dispatches: Sequence[Dispatch]) -> None:
        self.sent.extend(dispatches)


class _Counts:
    """Statements, transactions and round trips seen on every engine of this process.

    SQLite's ``BEGIN`` is counted as a statement: Corral's begin hook runs it on the
    driver's connection, where no cursor event sees it (on PostgreSQL, psycopg sends its
    own ``BEGIN`` before a transaction's first statement, not counted either way). Round
    trips are a server database's: one per statement run on its own, one for each
    transaction's ``BEGIN`` and ``COMMIT``, one per :func:`app.prepared.script` (its
    statements, with its ``BEGIN`` or ``COMMIT``, in one simple query).
    """

    def __init__(self) -> None:
        self.statements = 0
        self.transactions = 0
        self.round_trips = 0
        self.in_script = False

    def statement(self, conn: Any, *_args: Any) -> None:
        self.statements += 1
        if conn.dialect.name != "sqlite":
            self.round_trips += 1

    def transaction(self, conn: Any) -> None:
        self.transactions += 1
        if conn.dialect.name != "sqlite":
            self.round_trips += 2  # psycopg's BEGIN, then the COMMIT

    def begin(self, conn: Any) -> None:
        if conn.dialect.name == "sqlite":
            self.statements += 1

    def script(self, conn: Any, n: int, *, begin: bool, commit: bool) -> None:
        # On SQLite a script's statements run through prepared.execute: counted there.
        if conn.dialect.name != "sqlite":
            self.statements += n
            self.transactions += commit or not begin  # no BEGIN nor COMMIT: implicit
            self.round_trips += 1


@contextmanager
def _counting(counts: _Counts) -> Iterator[None]:
    from sqlalchemy.engine import Engine

    event.listen(Engine, "before_cursor_execute", counts.statement)
    event.listen(Engine, "commit", counts.transaction)
    event.listen(Engine, "begin", counts.begin)
    original, original_script = prepared.execute, prepared.script

    def counted(conn: Any, stmt: Any, params: Any = None) -> prepared.Rows:
        # Statements run on the driver's cursor pass no cursor event: count them here
        # (one per call, an executemany included, as SQLAlchemy's event counts them).
        first = (params[0] if params else {}) if isinstance(params, list) else (params or {})
        if prepared.prepared_for(conn, stmt, first).supported:
            counts.statement(conn)
        return original(conn, stmt, params)

    def counted_script(
        conn: Any, statements: Any, *, begin: bool = False, commit: bool = False
    ) -> list[prepared.Rows]:
        n = sum(1 for _, params in statements if params != [])
        counts.script(conn, n, begin=begin, commit=commit)
        return original_script(conn, statements, begin=begin, commit=commit)

    prepared.execute, prepared.script = counted, counted_script
    try:
        yield
    finally:
        prepared.execute, prepared.script = original, original_script
        event.remove(Engine, "before_cursor_execute", counts.statement)
        event.remove(Engine, "commit", counts.transaction)
        event.remove(Engine, "begin", counts.begin)


class _OneWorkflow:
    """The four calls of one one-step workflow, in order."""

    def __init__(self, validated: Any) -> None:
        self.validated = validated
        self.run_id = ""
        self.step: Dispatch | None = None
        self.started_at: datetime | None = None
        self.seen: rows.Seen | None = None

    def submit(self) -> None:
        sent = _Recorder()
        self.run_id = engine.create_workflow(self.validated, sent).id
        self.step = sent.sent[0]

    def claim(self, *, read: bool = False) -> None:
        assert self.step is not None
        specs.forget_all()  # a pool process meets each workflow at its claim
        # As a worker does: take the work its message carried (and check the cancel flag),
        # or read the step (``read``), or claim it first with CORRAL_CLAIM_AFTER_S=0.
        carried = None if read else self.step.work
        work = take(self.step.step_run_id, self.step.attempt, carried)
        if work is None:
            raise RuntimeError("the claim was refused")
        self.started_at, self.seen = work.started_at, work.seen

    def result(self, *, as_seen: bool = True) -> None:
        assert self.step is not None
        done = engine.complete_step(
            self.step.step_run_id,
            self.step.attempt,
            {"text": "ok"},
            _Recorder(),
            started_at=self.started_at,
            # The workflow's states as the claim read them (PostgreSQL), as a worker does.
            seen=self.seen if as_seen else None,
        )
        if not done:
            raise RuntimeError("the result was refused")

    def read(self) -> None:
        if _fresh_view(None, self.run_id).status.value != "succeeded":
            raise RuntimeError("the workflow did not succeed")


def _cpu_ms() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return (usage.ru_utime + usage.ru_stime) * 1000


def _server(settings: Settings) -> int | None:
    """The database server's main process (PostgreSQL's postmaster) when it runs on
    this host, else ``None`` (SQLite runs in this process; a remote server's CPU is not
    this host's)."""
    if not settings.sqlalchemy_url.startswith("postgresql"):
        return None
    return local_servers(settings).get("database")


def measure(settings: Settings, n: int, warmup: int = 20) -> dict[str, dict[str, float | None]]:
    """Per call: median wall ms, mean CPU ms (this process, and a local database server's
    processes); statements, transactions and (on a server database) round trips per call.

    On a server database every other workflow's step is read (the row ``claim, read``)
    instead of taken from what its message carried (``claim``), and every other pair of
    workflows' results takes the locked path (``seen`` not given: a lock and read, then
    the writes), the row ``result, locked``: what the one-round-trip result (``result``)
    saves, side by side."""
    wall: dict[str, list[float]] = {}
    cpu: dict[str, list[float]] = {}
    server_cpu: dict[str, list[float]] = {}
    counted: dict[str, list[tuple[int, int, int]]] = {}
    counts = _Counts()
    with use_settings(settings), _counting(counts):
        upgrade(settings.sqlalchemy_url)
        catalog = load_catalog(settings.catalog_path)
        root = _server(settings)
        for i in range(warmup + (2 * n if root is not None else n)):
            # The server's processes: its backends (one per pooled connection) and the
            # writers (WAL, background) that a commit wakes.
            server = [root, *stats.children_of(root)] if root is not None else []
            one = _OneWorkflow(validate_workflow(SPEC, catalog, settings))
            read = root is not None and i % 2 == 1
            locked = root is not None and i // 2 % 2 == 1
            calls: dict[str, Callable[[], Any]] = {
                "submit": one.submit,
                READ if read else "claim": partial(one.claim, read=read),
                LOCKED if locked else "result": partial(one.result, as_seen=not locked),
                "read": one.read,
            }
            for name, call in calls.items():
                s0 = (counts.statements, counts.transactions, counts.round_trips)
                r0 = stats.run_s(server)
                t0 = time.perf_counter()
                c0 = _cpu_ms()
                call()
                c1, t1 = _cpu_ms(), time.perf_counter()
                r1 = stats.run_s(server)
                if i >= warmup:
                    wall.setdefault(name, []).append((t1 - t0) * 1000)
                    cpu.setdefault(name, []).append(c1 - c0)
                    server_cpu.setdefault(name, []).append((r1 - r0) * 1000)
                    counted.setdefault(name, []).append(
                        (
                            counts.statements - s0[0],
                            counts.transactions - s0[1],
                            counts.round_trips - s0[2],
                        )
                    )
    db.dispose_engines()
    return {
        c: {
            "wall_ms": round(statistics.median(wall[c]), 3),
            "cpu_ms": round(statistics.mean(cpu[c]), 3),
            "server_cpu_ms": round(statistics.mean(server_cpu[c]), 3) if root else None,
            "statements": statistics.mean(k[0] for k in counted[c]),
            "transactions": statistics.mean(k[1] for k in counted[c]),
            "round_trips": statistics.mean(k[2] for k in counted[c]),
        }
        for c in (*CALLS, READ, LOCKED)
        if c in wall
    }


def _through_connection_execute(conn: Any, stmt: Any, params: Any = None) -> prepared.Rows:
    """The engine's statements as before app/prepared.py: SQLAlchemy's ``Connection.execute``."""
    result = conn.execute(stmt, params)
    return prepared.Rows(result.all()) if result.returns_rows else prepared.Rows()


class _MogrifyBinder(prepared.Binder):
    """A named call bound as before :class:`app.prepared.Binder`: ``mogrify`` of its
    template, which parses the template and reorders the values on every call."""

    __slots__ = ()

    def call(self, form: prepared.ServerForm, params: prepared.Params) -> str:
        return self.mogrify(form.execute, params)


# What --compare alternates: the module attribute swapped, the shipped way, the old way.
COMPARISONS: dict[str, tuple[str, dict[str, Any]]] = {
    "execute": (
        "execute",
        {"driver's cursor": prepared.execute, "Connection.execute": _through_connection_execute},
    ),
    "binding": (
        "Binder",
        {"Binder": prepared.Binder, "mogrify": _MogrifyBinder},
    ),
}


def compare(
    settings: Settings, n: int, what: str = "execute", warmup: int = 20
) -> dict[str, dict[str, float]]:
    """Mean CPU ms per call, the shipped way (``COMPARISONS[what]``'s first) against the
    old one, alternating per workflow."""
    attribute, ways = COMPARISONS[what]
    shipped = next(iter(ways.values()))
    cpu: dict[str, dict[str, list[float]]] = {w: {c: [] for c in CALLS} for w in ways}
    names = list(ways)
    try:
        with use_settings(settings):
            upgrade(settings.sqlalchemy_url)
            catalog = load_catalog(settings.catalog_path)
            for i in range(warmup + 2 * n):
                way = names[i % 2]
                setattr(prepared, attribute, ways[way])
                one = _OneWorkflow(validate_workflow(SPEC, catalog, settings))
                for name in CALLS:
                    c0 = _cpu_ms()
                    getattr(one, name)()
                    if i >= warmup:
                        cpu[way][name].append(_cpu_ms() - c0)
    finally:
        setattr(prepared, attribute, shipped)
    db.dispose_engines()
    return {c: {w: round(statistics.mean(cpu[w][c]), 3) for w in ways} for c in CALLS}


@contextmanager
def _environment(database: str | None) -> Iterator[dict[str, Settings]]:
    """Settings per database (SQLite in a temporary directory, and ``database`` if given),
    the tiny models and a Redis for the finish notices."""
    with tempfile.TemporaryDirectory(prefix="corral-engine-cost-") as tmp:
        work = Path(tmp)
        make_tiny(work / "models")
        redis_url = os.environ.get(REDIS_ENV)
        server = None
        if not redis_url:
            server = EmbeddedRedis(work / "redis", persist=False).start()
            redis_url = server.url
        try:
            urls = {"sqlite": f"sqlite:///{work / 'corral.db'}"}
            if database:
                urls[database.split(":", 1)[0]] = database
            yield {
                name: Settings(
                    database_url=url,
                    redis_url=redis_url,
                    models_dir=work / "models",
                    data_dir=work / "data",
                )
                for name, url in urls.items()
            }
        finally:
            if server is not None:
                server.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=300, help="one-step workflows per database")
    p.add_argument("--database", default=os.environ.get(DATABASE_ENV), help="a server database")
    p.add_argument(
        "--compare",
        nargs="?",
        const="execute",
        choices=sorted(COMPARISONS),
        help="CPU per call, alternating per workflow: the statements on the driver's cursor "
        "(as shipped) against SQLAlchemy's Connection.execute (execute, the default), or a "
        "PostgreSQL script's calls bound per value (as shipped) against mogrify (binding)",
    )
    p.add_argument(
        "--rtt-ms",
        type=float,
        default=0.0,
        help="reach the server database through a proxy that adds this round-trip time "
        "(benchmarks/delay_proxy.py): a database on another host",
    )
    args = p.parse_args(argv)
    if args.compare:
        return _main_compare(args)
    results: dict[str, dict[str, dict[str, float | None]]] = {}
    with contextlib.ExitStack() as stack:
        if args.database and args.rtt_ms > 0:
            args.database = stack.enter_context(delayed(args.database, args.rtt_ms))
        settings_by_db = stack.enter_context(_environment(args.database))
        for name, settings in settings_by_db.items():
            results[name] = measure(settings, args.n)
    rtt = f", the server {args.rtt_ms:g} ms further away" if args.rtt_ms > 0 else ""
    table = Table(title=f"the engine's database work per call, {args.n} one-step workflows{rtt}")
    columns = (
        "call",
        "wall (median)",
        "CPU (mean)",
        "server CPU (mean)",
        "statements",
        "transactions",
        "round trips",
    )
    table.add_column("database", no_wrap=True)
    for col in columns:
        table.add_column(col, no_wrap=col == "call")
    for name, by_call in results.items():
        for call, r in by_call.items():
            table.add_row(
                name,
                call,
                f"{r['wall_ms']:.3f} ms",
                f"{r['cpu_ms']:.3f} ms",
                "-" if r["server_cpu_ms"] is None else f"{r['server_cpu_ms']:.3f} ms",
                f"{r['statements']:g}",
                f"{r['transactions']:g}",
                f"{r['round_trips']:g}" if name != "sqlite" else "-",
            )
    # Piped (a file, a test), a table this wide keeps each row on one line.
    (Console() if sys.stdout.isatty() else Console(width=150)).print(table)
    return 0


def _main_compare(args: argparse.Namespace) -> int:
    what = args.compare
    if what == "binding" and not args.database:
        print("--compare binding needs a PostgreSQL database (--database)", file=sys.stderr)
        return 2
    ways = list(COMPARISONS[what][1])
    results: dict[str, dict[str, dict[str, float]]] = {}
    with _environment(args.database) as settings_by_db:
        for name, settings in settings_by_db.items():
            if what == "binding" and name == "sqlite":
                continue  # SQLite binds nothing on the client
            results[name] = compare(settings, args.n, what)
    table = Table(
        title=f"CPU per call (mean ms), {args.n} one-step workflows each way, alternating"
    )
    for col in ("database", "call", *ways, "ratio"):
        table.add_column(col)
    for name, by_call in results.items():
        total = {w: sum(r[w] for r in by_call.values()) for w in ways}
        for call, r in [*by_call.items(), ("all four", total)]:
            table.add_row(
                name, call, *(f"{r[w]:.3f}" for w in ways), f"{r[ways[0]] / r[ways[1]]:.2f}"
            )
    Console().print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
