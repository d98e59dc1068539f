"""How much GPU memory a model needs, from its GGUF header — never loading the model.

    total = weights on the GPU (per layer, from tensor types and shapes, plus the output head)
          + KV cache   (n_ctx × parallel slots × layers × kv heads × head dims × cache type;
                        sliding-window layers only keep their window)
          + compute buffers (llama.cpp's graph scratch: the larger of the logits and the
                        attention scores with their mask; no score matrix with flash attention)

The weights are counted once however many slots there are: a pool serving ``parallel``
sequences holds one model and one context whose KV cache has one stream of ``n_ctx`` cells
per slot (llama.cpp's ``kv_unified = false``, as :mod:`workers.batching` makes it), so a
sequence's attention spans its own stream and the score matrix does not grow with slots.
          + a fixed per-GPU overhead (CUDA context, cuBLAS workspace)

For a tensor split, each GPU holds its share of layers (weights and KV), its own compute
buffer and overhead; the first GPU also holds the output head. Token embeddings stay in host
memory, as llama.cpp keeps them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from gguf import GGUFReader

from models.gguf_info import gguf_field, open_gguf

CACHE_TYPE_BYTES = {
    "f32": 4.0,
    "f16": 2.0,
    "bf16": 2.0,
    "q8_0": 34 / 32,
    "q5_1": 24 / 32,
    "q5_0": 22 / 32,
    "q4_1": 20 / 32,
    "q4_0": 18 / 32,
}
DEFAULT_OVERHEAD_BYTES = 512 * 2**20
# Layers of these architectures alternate sliding-window and global attention.
SWA_PERIOD = {"gemma2": 2, "gemma3": 6}
_LAYER = re.compile(r"^blk\.(\d+)\.")


@dataclass(frozen=True)
class ModelShape:
    """What the estimator needs to know of a model, read from its GGUF header."""

    architecture: str
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    head_dim_k: int
    head_dim_v: int
    n_vocab: int
    context_length: int
    layer_bytes: tuple[int, ...]
    output_bytes: int  # output head + final norm (the tied embedding table when shared)
    host_bytes: int  # token embeddings: kept in host memory by llama.cpp
    sliding_window: int | None = None
    file_bytes: int = 0
    tied: bool = False  # the embedding table is also the output head (counted in output)

    @property
    def weights_bytes(self) -> int:
        """Every tensor's bytes, as in the file."""
        return sum(self.layer_bytes) + self.output_bytes + (0 if self.tied else self.host_bytes)


def _int(reader: GGUFReader, key: str, default: int | None = None) -> int:
    value = gguf_field(reader, key)
    if value is None:
        if default is None:
            raise ValueError(f"GGUF metadata has no {key}")
        return default
    return int(value)


def read_shape(path: Path) -> ModelShape:
    """Read a model's shape from the GGUF at ``path`` (tensor infos and metadata only)."""
    reader = open_gguf(path)
    arch = str(gguf_field(reader, "general.architecture"))
    n_layer = _int(reader, f"{arch}.block_count")
    n_embd = _int(reader, f"{arch}.embedding_length")
    n_head = _int(reader, f"{arch}.attention.head_count")
    n_head_kv = _int(reader, f"{arch}.attention.head_count_kv", n_head)
    head_dim = n_embd // max(n_head, 1)
    layers = [0] * n_layer
    output = host = 0
    tied = True
    n_vocab = 0
    for t in reader.tensors:
        nbytes = int(t.n_bytes)
        m = _LAYER.match(t.name)
        if m and int(m.group(1)) < n_layer:
            layers[int(m.group(1))] += nbytes
        elif t.name == "token_embd.weight":
            host = nbytes
            n_vocab = int(t.shape[-1])
        elif t.name.startswith("output"):
            output += nbytes
            tied = tied and t.name != "output.weight"
        else:
            output += nbytes
    if tied:  # the embedding table doubles as the output head, so it lives on the GPU too
        output += host
    window = gguf_field(reader, f"{arch}.attention.sliding_window")
    return ModelShape(
        architecture=arch,
        n_layer=n_layer,
        n_embd=n_embd,
        n_head=n_head,
        n_head_kv=n_head_kv,
        head_dim_k=_int(reader, f"{arch}.attention.key_length", head_dim),
        head_dim_v=_int(reader, f"{arch}.attention.value_length", head_dim),
        n_vocab=_int(reader, f"{arch}.vocab_size", n_vocab or 32000),
        context_length=_int(reader, f"{arch}.context_length", 2048),
        layer_bytes=tuple(layers),
        output_bytes=output,
        host_bytes=host,
        sliding_window=int(window) if window is not None else None,
        file_bytes=int(reader.data.nbytes),
        tied=tied,
    )


@dataclass(frozen=True)
class MemoryEstimate:
    """The bytes a model needs on GPUs, part by part."""

    shape: ModelShape
    n_ctx: int
    parallel: int
    cache_type: str
    flash_attention: bool
    kv_layer_bytes: tuple[int, ...]
    compute_bytes: int
    overhead_bytes: int
    split: tuple[int, ...] = field(default=())  # layers per GPU; () = one GPU

    @property
    def weights_bytes(self) -> int:
        return sum(self.shape.layer_bytes) + self.shape.output_bytes

    @property
    def kv_bytes(self) -> int:
        return sum(self.kv_layer_bytes)

    @property
    def total_bytes(self) -> int:
        return sum(self.per_gpu_bytes())

    def per_gpu_bytes(self) -> list[int]:
        """Bytes on each GPU of the split (one entry without a split)."""
        counts = list(self.split) or [self.shape.n_layer]
        out, first = [], 0
        for i, n in enumerate(counts):
            layers = range(first, first + n)
            first += n
            part = sum(self.shape.layer_bytes[j] + self.kv_layer_bytes[j] for j in layers)
            part += self.compute_bytes + self.overhead_bytes
            if i == 0:
                part += self.shape.output_bytes
            out.append(part)
        return out

    def breakdown(self) -> list[tuple[str, int]]:
        return [
            ("weights (layers)", sum(self.shape.layer_bytes)),
            ("weights (output head)", self.shape.output_bytes),
            (f"KV cache ({self.n_ctx} ctx × {self.parallel}, {self.cache_type})", self.kv_bytes),
            ("compute buffers", self.compute_bytes * max(1, len(self.split))),
            ("overhead", self.overhead_bytes * max(1, len(self.split))),
            ("total on GPU", self.total_bytes),
            ("token embeddings (host memory)", 0 if self.shape.tied else self.shape.host_bytes),
        ]


def estimate(
    shape: ModelShape,
    n_ctx: int,
    *,
    parallel: int = 1,
    cache_type: str = "f16",
    flash_attention: bool = False,
    n_ubatch: int = 512,
    overhead_bytes: int = DEFAULT_OVERHEAD_BYTES,
    split: tuple[int, ...] = (),
) -> MemoryEstimate:
    """Estimate the memory ``shape`` needs serving ``parallel`` slots of ``n_ctx`` tokens."""
    if cache_type not in CACHE_TYPE_BYTES:
        raise ValueError(
            f"cache_type must be one of {', '.join(CACHE_TYPE_BYTES)}, got {cache_type!r}"
        )
    if n_ctx < 1 or parallel < 1:
        raise ValueError(f"n_ctx and parallel must be ≥ 1, got {n_ctx} and {parallel}")
    if split and sum(split) != shape.n_layer:
        raise ValueError(f"a split must place all {shape.n_layer} layers, got {sum(split)}")
    per_elem = CACHE_TYPE_BYTES[cache_type]
    cells = n_ctx  # per slot: each has a KV stream of its own
    row = shape.n_head_kv * (shape.head_dim_k + shape.head_dim_v) * per_elem
    period = SWA_PERIOD.get(shape.architecture)
    kv = []
    for layer in range(shape.n_layer):
        window = shape.sliding_window
        swa = window is not None and period is not None and (layer % period) != period - 1
        layer_cells = min(cells, window + n_ubatch) if window and swa else cells
        kv.append(int(layer_cells * parallel * row))
    # The graph's peak: the output (logits, and the last hidden state around the output
    # norm), or attention (the f32 score matrix and the mask over a stream's cells).
    logits = 4 * n_ubatch * (shape.n_vocab + 3 * shape.n_embd)
    attention = 0 if flash_attention else 4 * n_ubatch * shape.n_head * cells
    mask = (2 if flash_attention else 4) * n_ubatch * cells
    compute = max(logits, attention + mask + 4 * n_ubatch * 4 * shape.n_embd)
    return MemoryEstimate(
        shape=shape,
        n_ctx=n_ctx,
        parallel=parallel,
        cache_type=cache_type,
        flash_attention=flash_attention,
        kv_layer_bytes=tuple(kv),
        compute_bytes=int(compute),
        overhead_bytes=overhead_bytes,
        split=split,
    )


def plan_split(est: MemoryEstimate, free: list[int]) -> tuple[int, ...] | None:
    """Layers per GPU so that each GPU's share fits its ``free`` bytes; None if impossible.

    Greedy in GPU order: each GPU takes as many whole layers as fit after its fixed costs
    (compute buffer, overhead, and the output head on the first).
    """
    shape = est.shape
    counts: list[int] = []
    layer = 0
    for i, room in enumerate(free):
        room -= est.compute_bytes + est.overhead_bytes + (shape.output_bytes if i == 0 else 0)
        n = 0
        while layer < shape.n_layer:
            need = shape.layer_bytes[layer] + est.kv_layer_bytes[layer]
            if need > room:
                break
            room -= need
            layer += 1
            n += 1
        counts.append(n)
        if layer == shape.n_layer:
            break
    if layer < shape.n_layer:
        return None
    while counts and counts[-1] == 0:
        counts.pop()
    return tuple(counts)
