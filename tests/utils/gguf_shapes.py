"""GGUF headers with the real tensor shapes and quantisation types of published models.

The files are sparse: a real header and tensor table, then a hole where the weights would
be, so a "4.7 GB" Qwen2.5-7B costs a few MB of disk. The types follow llama.cpp's Q4_K_M
recipe (llama_tensor_get_type): the output head in Q6_K, attn_v and ffn_down in Q6_K on the
"more bits" layers, everything else Q4_K; K-quants fall back to Q5_0/Q8_0 on rows that are
not a multiple of 256, and 1-D tensors stay F32.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFWriter

Q = GGMLQuantizationType
FALLBACK = {Q.Q4_K: Q.Q5_0, Q.Q6_K: Q.Q8_0, Q.Q5_K: Q.Q5_1}


@dataclass(frozen=True)
class Arch:
    """The hyperparameters that fix a model's tensor shapes."""

    arch: str
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_ff: int
    n_vocab: int
    context_length: int
    tied: bool
    qkv_bias: bool = False
    qk_norm: bool = False
    sliding_window: int | None = None


QWEN25_7B = Arch("qwen2", 28, 3584, 28, 4, 128, 18944, 152064, 32768, tied=False, qkv_bias=True)
GEMMA3_1B = Arch(
    "gemma3", 26, 1152, 4, 1, 256, 6912, 262144, 32768, tied=True, qk_norm=True, sliding_window=512
)


def _more_bits(i: int, n: int) -> bool:
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def _qtype(base: Q, ne0: int) -> Q:
    block = GGML_QUANT_SIZES[base][0]
    return FALLBACK.get(base, base) if ne0 % block else base


def tensors(a: Arch) -> list[tuple[str, tuple[int, ...], Q]]:
    """(name, ne, type) for every tensor, in GGUF order."""
    q_dim, kv_dim = a.n_head * a.head_dim, a.n_head_kv * a.head_dim
    out: list[tuple[str, tuple[int, ...], Q]] = []
    embd_type = Q.Q6_K if a.tied else Q.Q4_K
    out.append(("token_embd.weight", (a.n_embd, a.n_vocab), _qtype(embd_type, a.n_embd)))
    for i in range(a.n_layer):
        more = _more_bits(i, a.n_layer)
        mats = [
            ("attn_q", (a.n_embd, q_dim), Q.Q4_K),
            ("attn_k", (a.n_embd, kv_dim), Q.Q4_K),
            ("attn_v", (a.n_embd, kv_dim), Q.Q6_K if more else Q.Q4_K),
            ("attn_output", (q_dim, a.n_embd), Q.Q4_K),
            ("ffn_gate", (a.n_embd, a.n_ff), Q.Q4_K),
            ("ffn_up", (a.n_embd, a.n_ff), Q.Q4_K),
            ("ffn_down", (a.n_ff, a.n_embd), Q.Q6_K if more else Q.Q4_K),
        ]
        for name, ne, base in mats:
            out.append((f"blk.{i}.{name}.weight", ne, _qtype(base, ne[0])))
        vecs = [("attn_norm", a.n_embd), ("ffn_norm", a.n_embd)]
        if a.qkv_bias:
            vecs += [("attn_q", q_dim), ("attn_k", kv_dim), ("attn_v", kv_dim)]
        if a.qk_norm:
            vecs += [("attn_q_norm", a.head_dim), ("attn_k_norm", a.head_dim)]
        for name, n in vecs:
            suffix = "bias" if a.qkv_bias and name in ("attn_q", "attn_k", "attn_v") else "weight"
            out.append((f"blk.{i}.{name}.{suffix}", (n,), Q.F32))
    out.append(("output_norm.weight", (a.n_embd,), Q.F32))
    if not a.tied:
        out.append(("output.weight", (a.n_embd, a.n_vocab), _qtype(Q.Q6_K, a.n_embd)))
    return out


def nbytes(ne: tuple[int, ...], qtype: Q) -> int:
    block, size = GGML_QUANT_SIZES[qtype]
    return int(np.prod(ne)) // block * size


def write_sparse_gguf(path: Path, a: Arch) -> int:
    """Write a sparse GGUF for ``a`` at ``path``; returns the file size."""
    w = GGUFWriter(str(path), a.arch)
    w.add_block_count(a.n_layer)
    w.add_context_length(a.context_length)
    w.add_embedding_length(a.n_embd)
    w.add_feed_forward_length(a.n_ff)
    w.add_head_count(a.n_head)
    w.add_head_count_kv(a.n_head_kv)
    w.add_key_length(a.head_dim)
    w.add_value_length(a.head_dim)
    w.add_vocab_size(a.n_vocab)
    if a.sliding_window:
        w.add_sliding_window(a.sliding_window)
    data = 0
    for name, ne, qtype in tensors(a):
        n = nbytes(ne, qtype)
        # GGUF lists dimensions innermost first; the writer wants numpy order, and for
        # quantised types the byte shape (the innermost dimension in bytes).
        shape = tuple(reversed(ne))
        if qtype == Q.F32:
            w.add_tensor_info(name, shape, np.dtype(np.float32), n, raw_dtype=qtype)
        else:
            block, size = GGML_QUANT_SIZES[qtype]
            byte_shape = (*shape[:-1], shape[-1] // block * size)
            w.add_tensor_info(name, byte_shape, np.dtype(np.uint8), n, raw_dtype=qtype)
        data += n + (-n % w.data_alignment)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    assert w.fout is not None
    fout = w.fout[0]
    fout.flush()
    start = fout.tell()
    start += -start % w.data_alignment
    w.close()
    os.truncate(path, start + data)
    return start + data
