"""Smoke test of ``python -m benchmarks.cold_start``: one round on the tiny chat model through
a real ``corral agent``; both steps succeed, the cold step's parts are positive and fit in
its total, and the table and /metrics figure are there.

Not a timed test: cold is not held to be slower than warm (a shared machine is noisy).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from app.core.config import PACKAGE_ROOT
from benchmarks.cold_start import PARTS

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

# Milliseconds the parts may exceed the total by: they come from several processes' clocks
# read at slightly different moments (one host, one clock).
TOLERANCE_MS = 5.0


def test_the_cold_start_benchmark_runs_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "cold.json"
    args = ["--models", "tiny-chat", "--rounds", "1", "--keep-alive", "3", "--json", str(out)]
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.cold_start", *args],
        cwd=PACKAGE_ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["models"] == ["tiny-chat"] and result["machine"]["cpu"]

    (one,) = result["runs"]
    cold, warm = one["cold"], one["warm"]
    assert cold["status"] == warm["status"] == "succeeded"
    assert cold["tokens"] and warm["tokens"]
    assert warm["same_pool"]  # the warm step ran on the pool the cold one started
    assert set(cold["parts"]) == set(PARTS)
    for part, ms in cold["parts"].items():
        assert ms is not None and ms > 0, (part, cold["parts"])
    assert sum(cold["parts"].values()) <= cold["total_ms"] + TOLERANCE_MS, cold
    assert warm["total_ms"] > 0
    assert cold["agent_load_s"] > 0

    # The agent counted the cold start /metrics exports.
    metric = result["summary"]["tiny-chat"]["metric"]
    assert metric["count"] == 1 and metric["sum"] > 0

    rows = [
        [c.strip() for c in line.strip("|").split("|")]
        for line in done.stdout.splitlines()
        if line.startswith("| tiny-chat")
    ]
    assert [r[1] for r in rows[:2]] == ["cold", "warm"]
    assert rows[0][2] == rows[1][2] == "1/1"
    assert rows[0][-1].endswith("×")
    assert rows[2][1].endswith("/ 1")  # corral_pool_cold_start_seconds sum / count
