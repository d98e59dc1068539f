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
    (result,) = json.loads(out.read_text())["results"]
    assert result["messages"] == 300
    for op in ("append", "context", "search_warm", "search_cold"):
        assert result[op]["n"] >= 3 and result[op]["median"] > 0
    assert report["vector_index"] in ("scan", "redisearch")
