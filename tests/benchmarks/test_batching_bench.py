"""Smoke test of ``python -m benchmarks.batching``: it runs end to end on the tiny chat model
and prints its tables; the figures are positive and agree with each other.

Not a timed test: no figure is held to a target here.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from app.core.config import PACKAGE_ROOT
from benchmarks.batching import PATHS, parallel_option

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

TOKENS = 6


def _tables(stdout: str) -> list[list[list[str]]]:
    """The Markdown tables printed, each a list of rows of cells (header and rule dropped)."""
    tables: list[list[list[str]]] = []
    current: list[list[str]] | None = None
    for line in stdout.splitlines():
        if not line.startswith("|"):
            current = None
            continue
        if current is None:
            current = []
            tables.append(current)
        current.append([cell.strip() for cell in line.strip("|").split("|")])
    return [t[2:] for t in tables]


def test_the_batching_benchmark_runs_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "batching.json"
    args = ["--model", "tiny-chat", "--concurrency", "1,2", "--tokens", str(TOKENS)]
    args += ["--rounds", "1", "--json", str(out)]
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.batching", *args],
        cwd=PACKAGE_ROOT,
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(out.read_text())
    batched = parallel_option()  # the batched pool runs once `corral worker --parallel` exists
    assert result["batched_available"] is batched
    paths = list(PATHS) if batched else ["in_process", "corral_1"]
    assert result["model"] == "tiny-chat" and result["machine"]["cpu"]
    assert result["parallel"] == 2  # the largest concurrency

    # Every path at every concurrency, each sequence exactly TOKENS tokens.
    runs = result["runs"]
    assert sorted((r["n"], r["path"]) for r in runs) == sorted(
        (n, p) for n in (1, 2) for p in paths
    )
    for r in runs:
        n = r["n"]
        assert r["completion_tokens"] == [TOKENS] * n
        assert len(r["latency_ms"]) == n and all(x > 0 for x in r["latency_ms"])
        assert r["tok_s"] == pytest.approx(n * TOKENS / r["wall_s"])
        # No step can take longer than the whole (each is timed inside the wall).
        assert max(r["latency_ms"]) <= r["wall_s"] * 1000 + 1e-6
    # The same chat-templated prompts on every path.
    prompts = {tuple(r["prompt_tokens"]) for r in runs if r["n"] == 2}
    assert len(prompts) == 1

    # The printed tables: the figures, the ratios, the memory.
    figures, ratios, memory = _tables(done.stdout)
    assert [(row[0], row[1]) for row in figures] == [
        (str(n), label)
        for n in (1, 2)
        for label in ("in process", "Corral, 1 slot", "Corral")[: len(paths)]
    ]
    for row in figures:
        tok_s, p50, p99, first, last, spread = (float(c) for c in row[2:])
        assert tok_s > 0 and 0 < first <= last and p50 <= p99 and spread >= 1.0
    assert [row[0] for row in ratios] == ["1", "2"]
    assert [row[0] for row in memory] == ["1", "2"]
    rss_1 = float(memory[0][1])
    assert rss_1 > 0  # the 1-slot pool's process, read from /proc
    for row in result["memory"]:
        assert row["estimate_mib"]["total"] > 0
    if batched:
        assert all(r is not None and r > 0 for r in result["ratios"].values())
    else:
        assert "not run" in ratios[0][1]
    assert result["targets_met"] == {"ratio_at_8": None, "last_over_first_at_8": None}
