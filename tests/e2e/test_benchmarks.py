"""Smoke test of ``python -m benchmarks.run``: it runs end to end and reports every figure.

Not a timed test: it asserts the shape of the report, never a number.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from app.core.config import PACKAGE_ROOT
from models.tiny import make_tiny

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def test_quick_run_reports_every_figure(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    args = ["--quick", "--step-n", "3", "--dispatch-n", "5", "--submit-n", "10"]
    args += ["--fan-out-width", "4", "--workers", "1", "--json", str(out)]
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", *args],
        cwd=PACKAGE_ROOT,
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(out.read_text())
    machine = result["machine"]
    for key in ("cpu", "cores", "ram_gib", "python", "llama_cpp_python", "database", "date"):
        assert machine[key], key
    figures = result["figures"]
    step = figures["step_overhead"]
    assert step["n"] == 3
    for key in (
        "corral_ms",
        "direct_ms",
        "added_ms",
        "one_request_ms",
        "one_request_added_ms",
        "bare_celery_ms",
    ):
        assert {"median", "p95"} <= step[key].keys(), key
        assert step[key]["n"] == 3, key
    for key in ("breakdown_median_ms", "one_request_breakdown_median_ms"):
        assert set(step[key]) == {"accept", "to_claim", "model", "worker_rest", "to_client"}
    dispatch = figures["dispatch"]
    assert dispatch["corral_per_s"]["median"] > 0 and dispatch["bare_per_s"]["median"] > 0
    assert dispatch["ratio"] is not None
    fan = figures["fan_out"]
    assert fan["width"] == 4 and fan["ratio"] is not None
    sub = figures["submission"]
    assert sub["refused"] == 0
    assert {"p50", "p99"} <= sub["latency_ms"].keys()
    assert figures["gpu"] == {"run": False, "reason": "no --gpu-model given"}
    assert set(result["targets_met"]) == {
        "step_added_median_ms",
        "step_added_one_request_median_ms",
        "dispatch_ratio",
        "fan_out_ratio",
    }
    assert "step overhead" in done.stdout


def test_the_gpu_figure_runs_its_path_on_the_cpu(tmp_path: Path) -> None:
    """Figure 5's whole path (a `corral worker` for the given GGUF, the same model loaded
    in the benchmark, interleaved long generations, the bandwidth ceiling) with
    `--gpu-device none`, so that it works the day a GPU is lent: the tiny chat model, end
    of sequence suppressed on both sides, the ceiling from the bandwidth given."""
    model = make_tiny(tmp_path / "models", ["tiny-chat"])[0]
    out = tmp_path / "gpu.json"
    args = ["--only", "gpu", "--gpu-model", str(model), "--gpu-device", "none"]
    args += ["--gpu-n", "2", "--gpu-max-tokens", "48", "--gpu-bandwidth-gbs", "100"]
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", *args, "--json", str(out)],
        cwd=PACKAGE_ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    figures = json.loads(out.read_text())["figures"]
    assert set(figures) == {"gpu"}
    gpu = figures["gpu"]
    assert gpu["run"] is True and gpu["device"] == "none" and gpu["n"] == 2
    assert gpu["model"] == model.name and gpu["model_bytes"] == model.stat().st_size
    assert gpu["completion_tokens"] == [48]  # every run of both sides: the same work
    for side in ("corral", "direct"):
        for kind in ("e2e", "decode"):
            tok_s = gpu[f"{side}_{kind}_tok_s"]
            assert tok_s["n"] == 2 and tok_s["median"] > 0, (side, kind)
    assert gpu["ceiling_tok_s"] == round(100e9 / model.stat().st_size, 1)
    # The ratio of the unrounded medians; the medians shown are rounded to 0.1 tok/s.
    shown = gpu["corral_decode_tok_s"]["median"] / gpu["direct_decode_tok_s"]["median"]
    assert gpu["decode_ratio"] == pytest.approx(shown, abs=2e-3)
    assert gpu["corral_fraction_of_ceiling"] > 0 and gpu["direct_fraction_of_ceiling"] > 0
    assert "5. GPU tokens/s" in done.stdout and "not run" not in done.stdout


def table_rows(module: str, *args: str, timeout_s: float) -> list[list[str]]:
    """Run ``python -m module args``; the cells of each row of the table it prints."""
    done = subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=PACKAGE_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return [
        [cell.strip() for cell in line.split("│")[1:-1]]
        for line in done.stdout.splitlines()
        if line.startswith("│")
    ]


def test_the_wakeup_floor_runs_end_to_end() -> None:
    """`python -m benchmarks.wakeup`: a real redis-server and a real uvicorn app, timed
    back to back and after an idle gap."""
    rows = {
        row[0]: row[1:]
        for row in table_rows("benchmarks.wakeup", "--n", "10", "--gaps", "0,1", timeout_s=120)
    }
    assert set(rows) == {"redis PING", "HTTP GET (FastAPI)"}
    for cells in rows.values():
        assert len(cells) == 2
        assert all(float(c) > 0 for c in cells)


def test_the_runtime_cost_comparison_runs_and_both_sides_agree() -> None:
    """`python -m benchmarks.runtime_cost`: Corral's runtime class and llama_cpp.Llama as
    shipped, on the generated tiny model; it exits non-zero if their texts differ."""
    rows = table_rows("benchmarks.runtime_cost", "--tokens", "8,300", "--n", "3", timeout_s=300)
    assert [r[0] for r in rows] == ["8", "300"]
    assert all(r[-1] == "yes" for r in rows)


def test_the_streaming_benchmark_runs_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "streaming.json"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.streaming",
            "--n",
            "2",
            "--max-tokens",
            "8",
            "--json",
            str(out),
        ],
        cwd=PACKAGE_ROOT,
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "time to first token, ms" in done.stdout and "added time to first token" in done.stdout
    result = json.loads(out.read_text())
    assert len(result["rows"]) == 2 and result["machine"]["cpu"]
    for row in result["rows"]:
        assert row["corral"]["tokens"] > 0  # the usage chunk came
        assert row["corral"]["ttft_ms"] >= row["corral"]["accepted_ms"] > 0
        assert row["local"]["ttft_ms"] > 0


def test_the_consolidation_benchmark_runs_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "consolidation.json"
    args = ["--n", "2", "--batches", "1,2", "--model", "tiny-chat", "--json", str(out)]
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.consolidation", *args],
        cwd=PACKAGE_ROOT,
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "conversations/min" in done.stdout
    result = json.loads(out.read_text())
    assert result["model"] == "tiny-chat" and result["machine"]["cpu"]
    assert [r["batch"] for r in result["rows"]] == [1, 2]
    for row in result["rows"]:
        # Every conversation consolidated, in ceil(n / batch) batch workflows.
        assert row["status"] == "succeeded" and row["consolidated"] == row["n"] == 2
        assert row["workflows"] == -(-2 // row["batch"])
        assert row["per_minute"] > 0 and row["entries"] >= 2 and row["completion_tokens"] > 0


def test_the_cleanup_planner_simulation_runs(tmp_path: Path) -> None:
    out = tmp_path / "cleanup.json"
    args = ["--events", "600", "--waiting", "6", "--reps", "2", "--json", str(out)]
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.cleanup_sim", *args],
        cwd=PACKAGE_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads(out.read_text())["results"]
    assert [r["fill"] for r in results] == ["binpack", "spread", "random"]
    for r in results:
        assert r["gpus"] == 1000 and r["hosts"] == 125 and r["waiting"] == 6
        assert r["stranded_after_gib"] <= r["stranded_before_gib"] + 1e-9 or r["moves"] == 0
        assert r["placed_after"] >= r["placed_before"]
