"""``python -m benchmarks.compare --before DIR --after DIR``: two checkouts, side by side.

Runs figures 1–3 of ``python -m benchmarks.run`` (added latency, dispatch ratio, fan-out
ratio) for two checkouts of Corral on this machine, alternating, and prints one table: per
figure, the median of each side's runs, after ÷ before, and whether *after* is within the
tolerance of *before* (25%: latency and fan-out, lower is better, may grow to 1.25× before;
dispatch, higher is better, may fall to 0.75× before)::

    python -m benchmarks.compare --before ../before --after . [--rounds 4]
        [--database-url postgresql://postgres@127.0.0.1:5432/test [--backends sqlite,postgresql]]
        [--json out.json] [--out-dir DIR]

Each DIR is a checkout with its own virtual environment (``DIR/.venv``); each run is that
checkout's own ``DIR/.venv/bin/python -m benchmarks.run --only step_overhead,dispatch,fan_out
--json …`` in DIR, so each side measures its own code with its own benchmark. ``--rounds N``
runs each side N times per backend in the order before, after, after, before, before, after …
(ABBA), which cancels a drift of the host over the run. On PostgreSQL each run gets a fresh
database (``bench_cmp_<n>``, created on the server of ``--database-url`` and dropped after),
handed to the run as ``CORRAL_BENCH_DATABASE_URL``; on SQLite each run makes its own file. The
sizes default to a reduced run (100 step pairs, 100 workflows × 3 dispatch rounds, a 50-wide
fan-out × 3: about 30 s a run on 2 vCPUs, so the default 4 rounds take about 4 minutes per
backend); ``--quick`` makes them tiny, to check that the command works.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from rich.console import Console
from rich.table import Table

SIDES = ("before", "after")
BACKENDS = ("sqlite", "postgresql")
ONLY = "step_overhead,dispatch,fan_out"
TOLERANCE = 0.25
# Environment a run must not inherit: it would point the run at another database or Redis,
# or put another checkout's code ahead of the run's own.
SCRUBBED_ENV = ("CORRAL_BENCH_DATABASE_URL", "CORRAL_BENCH_REDIS_URL", "PYTHONPATH", "VIRTUAL_ENV")


@dataclass(frozen=True)
class Figure:
    """One figure of a ``benchmarks.run`` JSON, and which way is better."""

    key: str
    label: str
    unit: str
    higher_is_better: bool
    headline: bool  # counted in the overall verdict (figures 1–3 of the issue)


FIGURES = (
    Figure("step_added_ms", "1. added latency, submit then read", "ms", False, True),
    Figure("dispatch_ratio", "2. dispatch ratio (Corral ÷ bare Celery)", "×", True, True),
    Figure("fan_out_ratio", "3. fan-out ratio (Corral ÷ bare chord)", "×", False, True),
    Figure("step_added_one_request_ms", "   added latency, one request", "ms", False, False),
    Figure("direct_ms", "   llama.cpp direct call (the host's speed)", "ms", False, False),
    Figure("bare_added_ms", "   bare Celery's added latency (the host's)", "ms", False, False),
)


# ---- The pure parts: reading a run, medians, verdicts ---------------------------------------


def _median_of(summary: dict[str, Any] | None) -> float | None:
    if not summary or summary.get("n") == 0 or summary.get("median") is None:
        return None
    return float(summary["median"])


def figures_of(result: dict[str, Any]) -> dict[str, float | None]:
    """The compared figures of one ``benchmarks.run`` result (its JSON, parsed); None for a
    figure the run did not measure."""
    figures = result.get("figures", {})
    step = figures.get("step_overhead") or {}
    disp = figures.get("dispatch") or {}
    fan = figures.get("fan_out") or {}
    return {
        "step_added_ms": _median_of(step.get("added_ms")),
        "step_added_one_request_ms": _median_of(step.get("one_request_added_ms")),
        "direct_ms": _median_of(step.get("direct_ms")),
        "bare_added_ms": _median_of(step.get("bare_celery_added_ms")),
        "dispatch_ratio": None if disp.get("ratio") is None else float(disp["ratio"]),
        "fan_out_ratio": None if fan.get("ratio") is None else float(fan["ratio"]),
    }


def load_run(path: Path) -> dict[str, float | None]:
    """``figures_of`` the JSON file a run wrote."""
    return figures_of(json.loads(path.read_text()))


def median(values: Sequence[float | None]) -> float | None:
    """The median of the measured values (None when there are none)."""
    measured = [v for v in values if v is not None]
    return statistics.median(measured) if measured else None


def within(
    before: float | None,
    after: float | None,
    higher_is_better: bool,
    tolerance: float = TOLERANCE,
) -> bool | None:
    """Whether ``after`` is no worse than ``before`` by more than ``tolerance`` (None when a
    side has no value): at most (1 + tolerance) × before where lower is better, at least
    (1 − tolerance) × before where higher is better."""
    if before is None or after is None:
        return None
    slack = 1e-9 * abs(before)  # the bound itself passes, whatever the float rounding
    if higher_is_better:
        return after >= (1 - tolerance) * before - slack
    return after <= (1 + tolerance) * before + slack


@dataclass
class Row:
    """One figure on one backend: each side's runs, their medians, the verdict."""

    backend: str
    figure: str
    label: str
    unit: str
    higher_is_better: bool
    headline: bool
    before_runs: list[float | None]
    after_runs: list[float | None]
    before: float | None
    after: float | None
    ratio: float | None  # after ÷ before
    limit: float | None  # the bound after is held to
    within: bool | None


def compare(
    before: Sequence[dict[str, float | None]],
    after: Sequence[dict[str, float | None]],
    backend: str = "sqlite",
    tolerance: float = TOLERANCE,
) -> list[Row]:
    """One row per figure: the runs of each side (``figures_of`` each), medians, verdicts."""
    rows = []
    for fig in FIGURES:
        b_runs = [run.get(fig.key) for run in before]
        a_runs = [run.get(fig.key) for run in after]
        b, a = median(b_runs), median(a_runs)
        factor = (1 - tolerance) if fig.higher_is_better else (1 + tolerance)
        rows.append(
            Row(
                backend=backend,
                figure=fig.key,
                label=fig.label,
                unit=fig.unit,
                higher_is_better=fig.higher_is_better,
                headline=fig.headline,
                before_runs=b_runs,
                after_runs=a_runs,
                before=b,
                after=a,
                ratio=a / b if a is not None and b else None,
                limit=b * factor if b is not None else None,
                within=within(b, a, fig.higher_is_better, tolerance),
            )
        )
    return rows


def overall(rows: Sequence[Row]) -> bool | None:
    """Whether every headline figure held (None when one was not measured)."""
    verdicts = [r.within for r in rows if r.headline]
    if any(v is False for v in verdicts):
        return False
    if not verdicts or any(v is None for v in verdicts):
        return None
    return True


def run_order(rounds: int) -> list[str]:
    """The sides in the order they run: before, after, after, before, before, after, …"""
    order: list[str] = []
    for i in range(rounds):
        order += list(SIDES) if i % 2 == 0 else list(reversed(SIDES))
    return order


def with_database(url: str, name: str) -> str:
    """``url`` with its database name replaced by ``name``."""
    return urlunsplit(urlsplit(url)._replace(path=f"/{name}"))


# ---- Rendering ---------------------------------------------------------------------------------


def _num(value: float | None, unit: str) -> str:
    if value is None:
        return "–"
    return f"{value:.2f} ms" if unit == "ms" else f"{value:.2f}×"


def _runs(values: Sequence[float | None]) -> str:
    return " / ".join("–" if v is None else f"{v:.2f}" for v in values)


def render(rows: Sequence[Row], console: Console, title: str) -> None:
    """The table: per backend and figure, both sides' medians, the ratio and the verdict."""
    table = Table(title=title)
    for col in ("backend", "figure", "before", "after", "after ÷ before", "held to", "", "runs"):
        table.add_column(col)
    mark = {True: "[green]within[/green]", False: "[red]outside[/red]", None: "–"}
    for row in rows:
        bound = (
            "–"
            if row.limit is None
            else ("≥ " if row.higher_is_better else "≤ ") + _num(row.limit, row.unit)
        )
        table.add_row(
            row.backend,
            row.label,
            _num(row.before, row.unit),
            _num(row.after, row.unit),
            "–" if row.ratio is None else f"{row.ratio:.3f}",
            bound if row.headline else "",
            mark[row.within] if row.headline else "",
            f"{_runs(row.before_runs)} → {_runs(row.after_runs)}",
        )
    console.print(table)


# ---- Running the checkouts ---------------------------------------------------------------------


@dataclass(frozen=True)
class Sizes:
    """What each run of ``benchmarks.run`` is asked for."""

    step_n: int = 100
    dispatch_n: int = 100
    bench_rounds: int = 3
    fan_out_width: int = 50
    workers: int = 2
    max_tokens: int = 16
    quick: bool = False

    def args(self) -> list[str]:
        out = ["--only", ONLY, "--step-n", str(self.step_n), "--dispatch-n", str(self.dispatch_n)]
        out += ["--rounds", str(self.bench_rounds), "--fan-out-width", str(self.fan_out_width)]
        out += ["--workers", str(self.workers), "--max-tokens", str(self.max_tokens)]
        return [*out, "--quick"] if self.quick else out


def checkout_python(directory: Path) -> Path:
    """The checkout's own interpreter; an error naming what is missing when it has none."""
    python = directory / ".venv" / "bin" / "python"
    if not (directory / "benchmarks" / "run.py").is_file():
        raise SystemExit(f"{directory} has no benchmarks/run.py: not a Corral checkout")
    if not python.exists():
        raise SystemExit(f"{directory} has no virtual environment ({python} is missing)")
    return python


def describe_checkout(directory: Path) -> dict[str, Any]:
    """The checkout's commit, and whether its tracked files differ from it."""

    def git(*args: str) -> str:
        done = subprocess.run(
            ["git", "-C", str(directory), *args], capture_output=True, text=True, check=False
        )
        return done.stdout.strip() if done.returncode == 0 else ""

    return {
        "dir": str(directory),
        "commit": git("rev-parse", "HEAD") or None,
        "subject": git("log", "-1", "--format=%s") or None,
        "dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
    }


@contextmanager
def fresh_database(server_url: str | None, n: int) -> Iterator[str | None]:
    """A new PostgreSQL database ``bench_cmp_<n>`` on ``server_url``'s server for one run
    (dropped after), or None for SQLite (the run makes its own file)."""
    if server_url is None:
        yield None
        return
    import psycopg

    admin = server_url.replace("postgresql+psycopg://", "postgresql://")
    name = f"bench_cmp_{n}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield with_database(server_url, name)
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def run_once(
    directory: Path, sizes: Sizes, out: Path, database_url: str | None, timeout_s: float
) -> dict[str, float | None]:
    """One ``benchmarks.run`` of the checkout in ``directory``; its figures. Its output goes
    to ``out`` with ``.log`` for ``.json``."""
    env = {k: v for k, v in os.environ.items() if k not in SCRUBBED_ENV}
    if database_url is not None:
        env["CORRAL_BENCH_DATABASE_URL"] = database_url
    command = [str(checkout_python(directory)), "-m", "benchmarks.run", *sizes.args()]
    log = out.with_suffix(".log")
    with log.open("w") as sink:
        done = subprocess.run(
            [*command, "--json", str(out)],
            cwd=directory,
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
            timeout=timeout_s,
            check=False,
        )
    if done.returncode != 0 or not out.is_file():
        tail = log.read_text(errors="replace")[-4000:]
        raise RuntimeError(f"{' '.join(command)} in {directory} exited {done.returncode}:\n{tail}")
    return load_run(out)


def _args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.compare",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--before", type=Path, required=True, help="checkout with .venv: the base")
    p.add_argument("--after", type=Path, required=True, help="checkout with .venv: the change")
    p.add_argument("--rounds", type=int, default=4, help="runs of each side per backend (4)")
    p.add_argument(
        "--database-url",
        help="a PostgreSQL server (any database on it; bench_cmp_<n> are created there)",
    )
    p.add_argument(
        "--backends",
        help="comma-separated: sqlite, postgresql (default: postgresql with --database-url, "
        "else sqlite); with both, each round runs both",
    )
    p.add_argument("--json", type=Path, help="write every run's figures and the verdicts here")
    p.add_argument("--out-dir", type=Path, help="keep each run's JSON and log here")
    p.add_argument("--tolerance", type=float, default=TOLERANCE, help="0.25: within 25%%")
    p.add_argument("--timeout-s", type=float, default=1200.0, help="the most one run may take")
    g = p.add_argument_group("sizes of each run (benchmarks.run's options)")
    g.add_argument("--quick", action="store_true", help="tiny sizes: check that it works")
    g.add_argument("--step-n", type=int, help="step-overhead pairs (100; quick 5)")
    g.add_argument("--dispatch-n", type=int, help="workflows per dispatch round (100; quick 10)")
    g.add_argument("--bench-rounds", type=int, help="dispatch and fan-out rounds (3; quick 1)")
    g.add_argument("--fan-out-width", type=int, help="fan-out width (50; quick 8)")
    g.add_argument("--workers", type=int, default=2, help="worker processes, both sides (2)")
    g.add_argument("--max-tokens", type=int, default=16, help="tokens each step generates (16)")
    args = p.parse_args(argv)
    if args.rounds < 1:
        p.error("--rounds must be at least 1")
    backends = (
        args.backends.split(",")
        if args.backends
        else ["postgresql" if args.database_url else "sqlite"]
    )
    if unknown := set(backends) - set(BACKENDS):
        p.error(f"--backends knows {', '.join(BACKENDS)}; got {', '.join(sorted(unknown))}")
    if "postgresql" in backends and not args.database_url:
        p.error("the postgresql backend needs --database-url")
    args.backends = backends
    q = args.quick
    args.sizes = Sizes(
        step_n=args.step_n or (5 if q else 100),
        dispatch_n=args.dispatch_n or (10 if q else 100),
        bench_rounds=args.bench_rounds or (1 if q else 3),
        fan_out_width=args.fan_out_width or (8 if q else 50),
        workers=args.workers,
        max_tokens=args.max_tokens,
        quick=q,
    )
    return args


def main(argv: list[str] | None = None) -> int:
    args = _args(argv)
    console = Console()
    if not console.is_terminal:
        console = Console(width=170)
    dirs = {"before": args.before.resolve(), "after": args.after.resolve()}
    for directory in dirs.values():
        checkout_python(directory)
    out_dir: Path = args.out_dir or Path(tempfile.mkdtemp(prefix="corral-compare-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    checkouts = {side: describe_checkout(d) for side, d in dirs.items()}
    for side, info in checkouts.items():
        dirty = " (with uncommitted changes)" if info["dirty"] else ""
        console.print(f"{side}: {info['dir']} at {(info['commit'] or '?')[:10]}{dirty}")
    order = run_order(args.rounds)
    console.print(f"order per backend: {', '.join(order)}; sizes {asdict(args.sizes)}")
    runs: list[dict[str, Any]] = []
    n = 0
    try:
        for i in range(args.rounds):
            for backend in args.backends:
                for side in order[2 * i : 2 * i + 2]:
                    n += 1
                    server = args.database_url if backend == "postgresql" else None
                    out = out_dir / f"{n:02d}-{backend}-{side}.json"
                    started = time.monotonic()
                    with fresh_database(server, n) as url:
                        figs = run_once(dirs[side], args.sizes, out, url, args.timeout_s)
                    took = time.monotonic() - started
                    runs.append(
                        {
                            "n": n,
                            "backend": backend,
                            "side": side,
                            "file": str(out) if args.out_dir else None,
                            "seconds": round(took, 1),
                            "figures": figs,
                        }
                    )
                    console.print(
                        f"run {n}: {backend} {side}: added {_num(figs['step_added_ms'], 'ms')}, "
                        f"dispatch {_num(figs['dispatch_ratio'], '×')}, "
                        f"fan-out {_num(figs['fan_out_ratio'], '×')} ({took:.0f} s)"
                    )
    except BaseException:
        console.print(f"[red]stopped[/red]; each run's JSON and log are in {out_dir}")
        raise
    rows: list[Row] = []
    for backend in args.backends:
        sides = {
            side: [r["figures"] for r in runs if r["backend"] == backend and r["side"] == side]
            for side in SIDES
        }
        rows += compare(sides["before"], sides["after"], backend, args.tolerance)
    held = overall(rows)
    render(rows, console, f"after against before: medians of {args.rounds} run(s) each, ABBA")
    verdict = {True: "held", False: "NOT held", None: "not measured"}[held]
    console.print(f"figures 1–3 within {args.tolerance:.0%} of before: {verdict}")
    if args.json:
        summary = {
            "checkouts": checkouts,
            "backends": args.backends,
            "rounds": args.rounds,
            "order": order,
            "sizes": asdict(args.sizes),
            "tolerance": args.tolerance,
            "runs": runs,
            "rows": [asdict(r) for r in rows],
            "within": held,
        }
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
        console.print(f"wrote {args.json}")
    if args.out_dir is None:
        shutil.rmtree(out_dir, ignore_errors=True)
    return 0 if held is not False else 1


if __name__ == "__main__":
    sys.exit(main())
