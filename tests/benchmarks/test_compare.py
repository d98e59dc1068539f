"""``python -m benchmarks.compare``: reading runs, medians, verdicts, and the ABBA order.

The runs here are synthetic JSON files shaped as ``python -m benchmarks.run --json`` writes
them; the end-to-end case drives two fake checkouts whose ``benchmarks.run`` writes one.
"""

from __future__ import annotations

import json
import stat
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from benchmarks import compare


def _summary(median: float, n: int = 10) -> dict[str, float]:
    return {"n": n, "median": median, "p95": median * 1.5, "p99": median * 2, "min": 0.1}


def bench_json(added: float, dispatch: float | None, fan_out: float) -> dict[str, Any]:
    """A result as ``benchmarks.run --only step_overhead,dispatch,fan_out`` writes it."""
    step = {
        "n": 10,
        "corral_ms": _summary(added + 2.0),
        "added_ms": _summary(added),
        "one_request_ms": _summary(added + 1.5),
        "one_request_added_ms": _summary(added - 0.5),
        "direct_ms": _summary(2.0),
        "bare_celery_ms": _summary(5.0),
        "bare_celery_added_ms": _summary(3.0),
        "submit_http_ms": _summary(1.0),
        "breakdown_median_ms": {"accept": 0.8, "to_claim": 2.0, "model": 1.7},
    }
    return {
        "machine": {"cpu": "test", "cores": 2, "database": "sqlite (SQLite 3)"},
        "config": {"quick": True, "workers": 2},
        "figures": {
            "step_overhead": step,
            "dispatch": {"n": 10, "rounds": 1, "workers": 2, "ratio": dispatch},
            "fan_out": {"width": 8, "rounds": 1, "workers": 2, "ratio": fan_out},
            "gpu": {"run": False, "reason": "not selected by --only"},
        },
        "targets_met": {"step_added_median_ms": True},
        "load_avg_end": [0.5, 0.5, 0.5],
    }


def _write(path: Path, result: dict[str, Any]) -> Path:
    path.write_text(json.dumps(result, indent=2) + "\n")
    return path


def test_a_run_is_read_from_its_json(tmp_path: Path) -> None:
    figs = compare.load_run(_write(tmp_path / "run.json", bench_json(4.0, 0.8, 0.6)))
    assert figs == {
        "step_added_ms": 4.0,
        "step_added_one_request_ms": 3.5,
        "direct_ms": 2.0,
        "bare_added_ms": 3.0,
        "dispatch_ratio": 0.8,
        "fan_out_ratio": 0.6,
    }
    # A figure the run did not measure reads as None, not as an error.
    only_step = bench_json(4.0, 0.8, 0.6)
    del only_step["figures"]["dispatch"], only_step["figures"]["fan_out"]
    assert compare.figures_of(only_step)["dispatch_ratio"] is None
    assert compare.figures_of(only_step)["fan_out_ratio"] is None


def test_medians_and_verdicts_go_the_way_each_figure_improves(tmp_path: Path) -> None:
    before = [
        compare.load_run(_write(tmp_path / "b1.json", bench_json(4.0, 0.80, 0.60))),
        compare.load_run(_write(tmp_path / "b2.json", bench_json(6.0, 0.90, 0.70))),
    ]
    # Latency +20% (within), dispatch −30% (outside), fan-out +30% (outside: lower is better).
    after = [
        compare.load_run(_write(tmp_path / "a1.json", bench_json(5.5, 0.55, 0.80))),
        compare.load_run(_write(tmp_path / "a2.json", bench_json(6.5, 0.64, 0.89))),
    ]
    rows = {r.figure: r for r in compare.compare(before, after, "sqlite")}
    step = rows["step_added_ms"]
    assert (step.before, step.after) == (5.0, 6.0)
    assert step.ratio == pytest.approx(1.2) and step.limit == pytest.approx(6.25)
    assert step.within is True and step.headline
    assert step.before_runs == [4.0, 6.0] and step.after_runs == [5.5, 6.5]
    disp = rows["dispatch_ratio"]
    assert disp.before == pytest.approx(0.85) and disp.after == pytest.approx(0.595)
    assert disp.limit == pytest.approx(0.6375) and disp.within is False
    fan = rows["fan_out_ratio"]
    assert fan.ratio == pytest.approx(0.845 / 0.65) and fan.within is False
    assert compare.overall(list(rows.values())) is False
    # The same runs the other way round: every headline figure improved.
    assert compare.overall(compare.compare(after, before)) is True


def test_the_bounds_are_inclusive_and_a_missing_side_is_no_verdict() -> None:
    assert compare.within(4.0, 5.0, higher_is_better=False) is True
    assert compare.within(4.0, 5.01, higher_is_better=False) is False
    assert compare.within(0.8, 0.6, higher_is_better=True) is True
    assert compare.within(0.8, 0.59, higher_is_better=True) is False
    assert compare.within(None, 0.6, higher_is_better=True) is None
    assert compare.median([None, 3.0, 1.0, 2.0]) == 2.0
    assert compare.median([None]) is None
    no_dispatch = compare.figures_of(bench_json(4.0, None, 0.6))
    rows = compare.compare([no_dispatch], [no_dispatch])
    assert {r.figure: r.within for r in rows if r.headline}["dispatch_ratio"] is None
    assert compare.overall(rows) is None


def test_the_sides_alternate_abba_and_a_database_is_renamed() -> None:
    assert compare.run_order(1) == ["before", "after"]
    assert compare.run_order(4) == ["before", "after", "after", "before"] * 2
    assert (
        compare.with_database("postgresql+psycopg://u@127.0.0.1:5432/test?x=1", "bench_cmp_3")
        == "postgresql+psycopg://u@127.0.0.1:5432/bench_cmp_3?x=1"
    )
    args = compare.Sizes(step_n=5, dispatch_n=10, bench_rounds=1, fan_out_width=8).args()
    assert args[:2] == ["--only", "step_overhead,dispatch,fan_out"]
    assert args[args.index("--step-n") + 1] == "5" and "--quick" not in args


def test_benchmarks_run_takes_the_options_each_run_is_given() -> None:
    """What compare passes is what this checkout's ``benchmarks.run`` parses."""
    from benchmarks.run import _args as run_args

    sizes = compare.Sizes(step_n=7, dispatch_n=11, bench_rounds=2, fan_out_width=9, quick=True)
    parsed = run_args([*sizes.args(), "--json", "out.json"])
    assert parsed.only == {"step_overhead", "dispatch", "fan_out"}
    assert (parsed.step_n, parsed.dispatch_n, parsed.rounds) == (7, 11, 2)
    assert (parsed.fan_out_width, parsed.workers, parsed.quick) == (9, 2, True)


def test_the_table_names_every_figure(tmp_path: Path) -> None:
    run = compare.figures_of(bench_json(4.0, 0.8, 0.6))
    console = Console(width=200, record=True)
    compare.render(compare.compare([run], [run]), console, "title")
    text = console.export_text()
    for fig in compare.FIGURES:
        assert fig.label.strip() in text
    assert text.count("within") == 3


_FAKE_RUN = """
import json, os, sys
from pathlib import Path

argv = sys.argv[1:]
out = Path(argv[argv.index("--json") + 1])
here = Path.cwd()
with open(here / "calls.log", "a") as log:
    env = {k: os.environ.get(k) for k in ("CORRAL_BENCH_DATABASE_URL", "PYTHONPATH")}
    log.write(json.dumps({"argv": argv, "env": env}) + "\\n")
out.write_text((here / "result.json").read_text())
"""


def _checkout(root: Path, result: dict[str, Any]) -> Path:
    """A directory that looks like a checkout: a benchmarks.run that writes ``result``."""
    (root / "benchmarks").mkdir(parents=True)
    (root / "benchmarks" / "__init__.py").write_text("")
    (root / "benchmarks" / "run.py").write_text(textwrap.dedent(_FAKE_RUN))
    (root / ".venv" / "bin").mkdir(parents=True)
    python = root / ".venv" / "bin" / "python"
    python.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    python.chmod(python.stat().st_mode | stat.S_IXUSR)
    _write(root / "result.json", result)
    return root


def test_main_runs_each_checkout_in_turn_and_writes_the_verdict(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = _checkout(tmp_path / "before", bench_json(4.0, 0.80, 0.60))
    after = _checkout(tmp_path / "after", bench_json(4.4, 0.78, 0.62))
    monkeypatch.setenv("CORRAL_BENCH_DATABASE_URL", "postgresql://elsewhere/db")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    out = tmp_path / "cmp.json"
    argv = ["--before", str(before), "--after", str(after), "--rounds", "2", "--quick"]
    assert compare.main([*argv, "--json", str(out), "--out-dir", str(tmp_path / "runs")]) == 0
    summary = json.loads(out.read_text())
    assert [r["side"] for r in summary["runs"]] == ["before", "after", "after", "before"]
    assert summary["within"] is True and summary["backends"] == ["sqlite"]
    rows = {r["figure"]: r for r in summary["rows"]}
    assert rows["step_added_ms"]["before_runs"] == [4.0, 4.0]
    assert rows["step_added_ms"]["ratio"] == pytest.approx(1.1)
    for checkout in (before, after):
        calls = [json.loads(line) for line in (checkout / "calls.log").read_text().splitlines()]
        assert len(calls) == 2
        for call in calls:  # a run makes its own SQLite file and imports its own code
            assert call["env"] == {"CORRAL_BENCH_DATABASE_URL": None, "PYTHONPATH": None}
            assert "--quick" in call["argv"] and "--only" in call["argv"]
    assert len(list((tmp_path / "runs").glob("*-sqlite-*.log"))) == 4
    # A worse "after" fails the command: fan-out +50%.
    _write(after / "result.json", bench_json(4.0, 0.80, 0.90))
    assert compare.main(["--before", str(before), "--after", str(after), "--quick"]) == 1


def test_a_checkout_without_a_virtualenv_is_refused(tmp_path: Path) -> None:
    before = _checkout(tmp_path / "before", bench_json(4.0, 0.8, 0.6))
    bare = tmp_path / "bare"
    (bare / "benchmarks").mkdir(parents=True)
    (bare / "benchmarks" / "run.py").write_text("")
    with pytest.raises(SystemExit, match="no virtual environment"):
        compare.main(["--before", str(before), "--after", str(bare)])
    with pytest.raises(SystemExit):  # argparse: PostgreSQL needs a server
        compare.main(["--before", str(before), "--after", str(before), "--backends", "postgresql"])
