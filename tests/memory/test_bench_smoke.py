"""The memory benchmark runs end to end (small N; no timing assertions)."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks import memory_bench
from tests.utils.databases import with_database


def test_memory_bench_runs(tmp_path: Path, redis_base_url: str) -> None:
    out = tmp_path / "memory.json"
    report = memory_bench.main(
        [
            "--sizes", "300", "--samples", "5", "--dim", "8", "--json", str(out),
            "--redis-url", with_database(redis_base_url, "12"),
        ]
    )  # fmt: skip
    results = json.loads(out.read_text())["results"]
    assert [r["index"] for r in results] == report["vector_indexes"]
    for result in results:
        assert result["messages"] == 300
        for op in ("append", "context", "search_warm", "search_cold"):
            assert result[op]["n"] >= 3 and result[op]["median"] > 0


def test_memory_bench_measures_the_native_index_beside_the_scan(
    tmp_path: Path, search_redis_url: str
) -> None:
    out = tmp_path / "memory.json"
    memory_bench.main(
        [
            "--sizes", "300", "--samples", "5", "--dim", "8", "--json", str(out),
            "--redis-url", search_redis_url,
        ]
    )  # fmt: skip
    results = json.loads(out.read_text())["results"]
    assert [(r["messages"], r["index"]) for r in results] == [(300, "scan"), (300, "redisearch")]
    for result in results:
        assert result["search_warm"]["n"] >= 3 and result["search_warm"]["median"] > 0
