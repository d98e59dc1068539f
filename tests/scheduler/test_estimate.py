"""The estimator against the tiny models and against real model shapes (sparse GGUF headers)."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.scheduler.estimate import estimate, plan_split, read_shape
from models.gguf_info import read_gguf_info
from tests.utils.gguf_shapes import GEMMA3_1B, QWEN25_7B, write_sparse_gguf

GIB = 2**30
# Published file sizes (Hugging Face): bartowski Qwen2.5-7B-Instruct-Q4_K_M.gguf and
# ggml-org gemma-3-1b-it-Q4_K_M.gguf. Our headers follow llama.cpp's Q4_K_M recipe, so the
# weights we count should land within these tolerances of the real files.
QWEN_PUBLISHED = 4_683_074_240
GEMMA_PUBLISHED = 806_058_240
QWEN_TOLERANCE = 0.005
GEMMA_TOLERANCE = 0.015


@pytest.fixture(scope="module")
def qwen(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("shapes") / "qwen2.5-7b.gguf"
    write_sparse_gguf(path, QWEN25_7B)
    return path


@pytest.fixture(scope="module")
def gemma(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("shapes") / "gemma-3-1b.gguf"
    write_sparse_gguf(path, GEMMA3_1B)
    return path


def test_tiny_model_weights_and_kv(models_dir: Path) -> None:
    path = models_dir / "tiny-chat.gguf"
    shape = read_shape(path)
    info = read_gguf_info(path)
    assert shape.weights_bytes == info.tensor_bytes
    est = estimate(shape, 8192, overhead_bytes=0)
    head_dim = shape.n_embd // shape.n_head
    assert est.kv_bytes == shape.n_layer * 8192 * shape.n_head_kv * 2 * head_dim * 2
    assert est.total_bytes == est.weights_bytes + est.kv_bytes + est.compute_bytes


def test_qwen25_7b_q4_k_m(qwen: Path) -> None:
    shape = read_shape(qwen)
    assert shape.file_bytes < 10 * 2**20 or qwen.stat().st_blocks * 512 < 10 * 2**20  # sparse
    assert abs(shape.weights_bytes - QWEN_PUBLISHED) / QWEN_PUBLISHED < QWEN_TOLERANCE
    est = estimate(shape, 32768)
    # 28 layers × (K + V) × 4 KV heads × 128 dims × 32768 cells × 2 bytes (f16)
    assert est.kv_bytes == 28 * 2 * 4 * 128 * 32768 * 2 == 1_879_048_192
    q8 = estimate(shape, 32768, cache_type="q8_0")
    assert q8.kv_bytes == pytest.approx(est.kv_bytes * 34 / 64, rel=1e-6)
    two = estimate(shape, 32768, parallel=2)
    assert two.kv_bytes == 2 * est.kv_bytes
    fa = estimate(shape, 32768, flash_attention=True)
    assert fa.compute_bytes < est.compute_bytes
    # On the GPU: weights less the token embeddings (kept in host memory), KV, buffers.
    assert est.weights_bytes < shape.weights_bytes
    assert 7.5 * GIB < est.total_bytes < 8.5 * GIB


def test_gemma3_1b_sliding_window(gemma: Path) -> None:
    shape = read_shape(gemma)
    assert shape.tied
    assert abs(shape.weights_bytes - GEMMA_PUBLISHED) / GEMMA_PUBLISHED < GEMMA_TOLERANCE
    est = estimate(shape, 32768)
    full = 26 * 2 * 1 * 256 * 32768 * 2
    # 1 global layer in 6; the other 5 keep only their 512-token window (+ one ubatch).
    globals_ = len([i for i in range(26) if i % 6 == 5])
    expected = globals_ * 2 * 256 * 32768 * 2 + (26 - globals_) * 2 * 256 * (512 + 512) * 2
    assert est.kv_bytes == expected
    assert est.kv_bytes < full / 4


def test_split_across_gpus(qwen: Path) -> None:
    est = estimate(read_shape(qwen), 32768)
    assert plan_split(est, [2 * GIB, 2 * GIB]) is None
    counts = plan_split(est, [6 * GIB, 6 * GIB, 6 * GIB])
    assert counts is not None
    assert sum(counts) == 28
    assert len(counts) >= 2
    split = estimate(read_shape(qwen), 32768, split=counts)
    per_gpu = split.per_gpu_bytes()
    assert all(b <= 6 * GIB for b in per_gpu)
    # Every GPU of a split pays its own compute buffer and overhead.
    assert sum(per_gpu) == est.total_bytes + (len(counts) - 1) * (
        est.compute_bytes + est.overhead_bytes
    )


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="cache_type must be one of"):
        estimate(_tiny_shape(), 10, cache_type="q2")
    with pytest.raises(ValueError, match="n_ctx and parallel"):
        estimate(_tiny_shape(), 0)


def _tiny_shape():  # type: ignore[no-untyped-def]
    from app.scheduler.estimate import ModelShape

    return ModelShape("llama", 2, 64, 4, 4, 16, 16, 100, 512, (1000, 1000), 500, 500)


def test_models_estimate_cli(models_dir: Path, tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("CORRAL_")}
    env["CORRAL_MODELS_DIR"] = str(models_dir)
    out = subprocess.run(
        [sys.executable, "-m", "app.cli.main", "models", "estimate", "tiny-chat", "--ctx", "1024"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert "KV cache (1024 ctx × 1, f16)" in out.stdout
    assert "total on GPU" in out.stdout


def test_scheduler_simulation_smoke(tmp_path: Path) -> None:
    import json
    import subprocess
    import sys

    out = tmp_path / "sim.json"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.scheduler_sim", "--events", "40", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    data = json.loads(out.read_text())
    assert [r["policy"] for r in data["results"]] == ["binpack", "spread"]
    for r in data["results"]:
        assert r["placed"] + r["refused"] == r["arrivals"] > 0
        assert r["latency_ms_p99"] >= r["latency_ms_p50"] > 0
