"""Figure 5: tokens per second of a real-size model through Corral against llama.cpp
direct on the same GPU, and against the memory-bandwidth ceiling.

Decoding one token reads every weight once, so a dense model's decode speed is bounded by
``memory bandwidth / model bytes``. The bandwidth comes from ``--gpu-bandwidth-gbs`` or,
for GPUs in :data:`BANDWIDTH_GBS`, from the name nvidia-smi reports. Needs a CUDA build of
llama-cpp-python; runs only when ``--gpu-model PATH`` is given.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

from benchmarks.overhead import wait_done
from benchmarks.stack import GPU_MODEL, Stack
from benchmarks.stats import ratio, summary
from benchmarks.work import GenCall, load_llama, no_eos

# Published peak memory bandwidth, GB/s, by a substring of the nvidia-smi name.
BANDWIDTH_GBS = {
    "H200": 4800.0,
    "H100 NVL": 3900.0,
    "H100 80GB HBM3": 3350.0,
    "H100 PCIe": 2000.0,
    "A100-SXM4-80GB": 2039.0,
    "A100 80GB PCIe": 1935.0,
    "A100-SXM4-40GB": 1555.0,
    "A100-PCIE-40GB": 1555.0,
    "L40S": 864.0,
    "L4": 300.0,
    "A10": 600.0,
    "RTX 4090": 1008.0,
    "RTX 3090": 936.0,
}


def bandwidth_for(gpu_names: list[str]) -> float | None:
    """The known peak bandwidth of the first GPU, if its name is in the table."""
    if not gpu_names:
        return None
    name = gpu_names[0]
    for needle, gbs in BANDWIDTH_GBS.items():
        if needle in name:
            return gbs
    return None


def _direct(llm: Any, call: GenCall) -> tuple[float, float, int]:
    """(wall seconds, decode seconds after the first token, completion tokens).

    The first token is timed by a stopping criterion, as Corral's runtime times it (a
    logits processor would slow every token of this side only).
    """
    from llama_cpp import StoppingCriteriaList

    first: list[float] = []

    def probe(_ids: Any, _logits: Any) -> bool:
        if not first:
            first.append(time.perf_counter())
        return False

    kwargs = call.llama_kwargs()
    if call.ignore_eos:
        kwargs["logits_processor"] = no_eos(llm)
    t0 = time.perf_counter()
    out = llm.create_completion(
        call.prompt, stopping_criteria=StoppingCriteriaList([probe]), **kwargs
    )
    end = time.perf_counter()
    return end - t0, end - (first[0] if first else t0), int(out["usage"]["completion_tokens"])


def gpu_tokens(
    stack: Stack, call: GenCall, n: int, bandwidth_gbs: float | None, gpu_names: list[str]
) -> dict[str, Any]:
    """Interleaved runs of one long generate step through Corral and direct."""
    gpu = stack.gpu
    assert gpu is not None
    layers = 0 if gpu.device == "none" else -1
    llm = load_llama(gpu.path, gpu.n_ctx, n_gpu_layers=layers)
    key = stack.new_key("bench-gpu")
    spec = {"name": "bench-gpu", "steps": [call.step("gen", GPU_MODEL)]}
    corral_e2e: list[float] = []
    corral_decode: list[float] = []
    direct_e2e: list[float] = []
    direct_decode: list[float] = []
    tokens_made: dict[str, set[int]] = {"corral": set(), "direct": set()}
    try:
        with stack.client(key) as client:
            for i in range(n + 1):  # the first pair warms both up
                order = ("corral", "direct") if i % 2 == 0 else ("direct", "corral")
                for which in order:
                    if which == "corral":
                        t0 = time.perf_counter()
                        resp = client.post("/v1/workflows", json=spec).raise_for_status()
                        run = wait_done(client, resp.json()["id"], timeout_s=600)
                        wall = time.perf_counter() - t0
                        out = run["steps"][0]["output"]
                        if run["status"] != "succeeded":
                            raise RuntimeError(f"GPU step failed: {run}")
                        if i:
                            tokens_made["corral"].add(int(out["completion_tokens"]))
                            corral_e2e.append(out["completion_tokens"] / wall)
                            corral_decode.append(out["timings"]["tokens_per_s"])
                    else:
                        wall, decode_s, tokens = _direct(llm, call)
                        if i:
                            tokens_made["direct"].add(tokens)
                            direct_e2e.append(tokens / wall)
                            direct_decode.append(tokens / max(decode_s, 1e-9))
    finally:
        llm.close()
    if tokens_made["corral"] != tokens_made["direct"]:
        # Both sides suppress the end of sequence: a difference means unequal work.
        raise RuntimeError(f"the two sides generated different token counts: {tokens_made}")
    size = gpu.path.stat().st_size
    bandwidth = bandwidth_gbs or bandwidth_for(gpu_names)
    ceiling = bandwidth * 1e9 / size if bandwidth else None
    c_dec, d_dec = statistics.median(corral_decode), statistics.median(direct_decode)
    return {
        "model": gpu.path.name,
        "model_bytes": size,
        "device": gpu.device,
        "gpus": gpu_names,
        "n": n,
        "max_tokens": call.max_tokens,
        "completion_tokens": sorted(tokens_made["direct"]),
        "corral_e2e_tok_s": summary(corral_e2e, 1),
        "direct_e2e_tok_s": summary(direct_e2e, 1),
        "corral_decode_tok_s": summary(corral_decode, 1),
        "direct_decode_tok_s": summary(direct_decode, 1),
        "e2e_ratio": ratio(statistics.median(corral_e2e), statistics.median(direct_e2e)),
        "decode_ratio": ratio(c_dec, d_dec),
        "bandwidth_gbs": bandwidth,
        "ceiling_tok_s": round(ceiling, 1) if ceiling else None,
        "direct_fraction_of_ceiling": ratio(d_dec, ceiling) if ceiling else None,
        "corral_fraction_of_ceiling": ratio(c_dec, ceiling) if ceiling else None,
    }
