"""Tiny, deterministic GGUF models for tests and the demo: ``tiny-chat`` and ``tiny-embed``.

Both are real llama.cpp models (architecture ``llama``, random F32 weights, under 1 MB)
with a SentencePiece-style tokenizer: ``<unk> <s> </s>``, the ChatML markers, all 256
byte-fallback tokens, printable ASCII, and ``▁``-prefixed common English words with every
prefix on the way (SPM only merges through pieces that are in the vocabulary).

``tiny-chat`` carries a ChatML ``tokenizer.chat_template``. Its weights are built so that it
only ever emits whole words, ``. , ! ?`` and newlines, and never a control token (``</s>``,
``<|im_end|>``, ...): embedding channel 0 is a constant that no layer writes to, and every
other token's output row reads that channel with a weight of -1000. Generation therefore
always runs to ``max_tokens`` (or a stop string), which the platform's long-generation and
cancellation tests rely on; callers must pass ``max_tokens``. ``tiny-embed`` sets
``llama.pooling_type = 1`` (mean), so ``Llama(embedding=True).embed()`` gives one vector per
text.

Files are byte-identical on every run: fixed seeds with NumPy's stable legacy
``RandomState``, no timestamps, and an atomic write through a temporary name.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
from gguf import GGUFWriter, LlamaFileType, PoolingType, TokenType

from app.core.errors import UnknownModelError

__all__ = ["CHAT_TEMPLATE", "TINY_MODELS", "TinySpec", "make_tiny", "tiny_vocab"]

CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

_SPECIALS = ("<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>")
UNK_ID, BOS_ID, EOS_ID = 0, 1, 2
_OUTPUT_PUNCTUATION = (".", ",", "!", "?")
_SUPPRESSED_LOGIT = -1000.0

# Whole words tiny-chat may emit, written as prose for readability.
_WORD_TEXT = """
the of and to a in is it you that he was for on are with as i his they be at one have this
from or had by not word but what some we can out other were all there when up use your how
said an each she which do their time if will way about many then them write would like so
these her long make thing see him two has look more day could go come did number sound no
most people my over know water than call first who may down side been now find any new work
part take get place made live where after back little only round man year came show every
good me give our under name very through just form sentence great think say help low line
differ turn cause much mean before move right boy old too same tell does set three want air
well also play small end put home read hand port large spell add even land here must big
high such follow act why ask men change went light kind off need house picture try us again
animal point mother world near build self earth father hello model token test job queue
worker story once upon cat dog tree river city road night morning happy quick brown fox jump
lazy answer question data run step text chat embed
The It In A This He She They We I Once Hello
"""
_WORDS = tuple(_WORD_TEXT.split())


@dataclass(frozen=True)
class TinySpec:
    """The shape of one tiny model."""

    name: str
    n_embd: int
    n_layer: int
    n_head: int
    n_ff: int
    context_length: int
    seed: int
    embedding: bool

    @property
    def file(self) -> str:
        return f"{self.name}.gguf"


TINY_MODELS: dict[str, TinySpec] = {
    "tiny-chat": TinySpec("tiny-chat", 64, 2, 4, 128, 8192, seed=1234, embedding=False),
    "tiny-embed": TinySpec("tiny-embed", 64, 2, 4, 128, 512, seed=5678, embedding=True),
}


def make_tiny(
    models_dir: Path, names: Iterable[str] | None = None, *, force: bool = False
) -> list[Path]:
    """Write the tiny models into ``models_dir`` and return their paths, in the order asked.

    A file that already exists is left alone unless ``force`` is true. Writing goes to a
    temporary name in the same directory and is renamed into place, so a reader never
    sees half a file.

    Example::

        make_tiny(Path(".corral/models"))            # both models
        make_tiny(tmp_path, ["tiny-chat"], force=True)
    """
    wanted = list(TINY_MODELS) if names is None else list(names)
    unknown = [n for n in wanted if n not in TINY_MODELS]
    if unknown:
        raise UnknownModelError(
            f"unknown tiny model {unknown[0]!r}; make_tiny knows: {', '.join(TINY_MODELS)}"
        )
    models_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in wanted:
        spec = TINY_MODELS[name]
        path = models_dir / spec.file
        if force or not path.exists():
            _write_atomically(spec, path)
        paths.append(path)
    return paths


def tiny_vocab() -> tuple[list[str], list[float], list[int]]:
    """The tokenizer shared by both tiny models: (tokens, scores, token types)."""
    tokens: list[str] = list(_SPECIALS)
    types = [int(TokenType.UNKNOWN)] + [int(TokenType.CONTROL)] * (len(_SPECIALS) - 1)
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [int(TokenType.BYTE)] * 256
    pieces = ["▁"] + [chr(c) for c in range(0x21, 0x7F)]
    for word in _WORDS:
        pieces += ["▁" + word[:i] for i in range(1, len(word) + 1)]
    seen = set(tokens)
    for piece in pieces:
        if piece not in seen:
            seen.add(piece)
            tokens.append(piece)
            types.append(int(TokenType.NORMAL))
    # SentencePiece scores are log-probabilities; longer pieces win when merges compete.
    scores = [
        0.0 if t != TokenType.NORMAL else -100.0 / len(tok)
        for tok, t in zip(tokens, types, strict=True)
    ]
    return tokens, scores, types


def _suppressed_ids(tokens: list[str]) -> list[int]:
    """Token ids tiny-chat never produces: all but whole words, a little punctuation, newline."""
    allowed = {"▁" + w for w in _WORDS} | set(_OUTPUT_PUNCTUATION) | {"<0x0A>"}
    return [i for i, tok in enumerate(tokens) if tok not in allowed]


def _weights(
    spec: TinySpec, n_vocab: int, suppress: list[int]
) -> dict[str, npt.NDArray[np.float32]]:
    """Random llama weights, in the order they are written."""
    rng = np.random.RandomState(spec.seed)
    d, f = spec.n_embd, spec.n_ff

    def normal(*shape: int, scale: float) -> npt.NDArray[np.float32]:
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    embd = normal(n_vocab, d, scale=1.0)
    tensors = {"token_embd.weight": embd}
    for i in range(spec.n_layer):
        wo = normal(d, d, scale=0.5 / d**0.5)
        down = normal(d, f, scale=0.5 / f**0.5)
        if not spec.embedding:
            wo[0, :] = 0.0  # no layer writes to channel 0 ...
            down[0, :] = 0.0
        tensors |= {
            f"blk.{i}.attn_norm.weight": np.ones(d, dtype=np.float32),
            f"blk.{i}.attn_q.weight": normal(d, d, scale=1.0 / d**0.5),
            f"blk.{i}.attn_k.weight": normal(d, d, scale=1.0 / d**0.5),
            f"blk.{i}.attn_v.weight": normal(d, d, scale=1.0 / d**0.5),
            f"blk.{i}.attn_output.weight": wo,
            f"blk.{i}.ffn_norm.weight": np.ones(d, dtype=np.float32),
            f"blk.{i}.ffn_gate.weight": normal(f, d, scale=1.0 / d**0.5),
            f"blk.{i}.ffn_up.weight": normal(f, d, scale=1.0 / d**0.5),
            f"blk.{i}.ffn_down.weight": down,
        }
    output = normal(n_vocab, d, scale=2.0 / d**0.5)
    if not spec.embedding:
        embd[:, 0] = 1.0  # ... so after the final RMS norm it is always positive,
        output[:, 0] = 0.0
        output[suppress, :] = 0.0
        output[suppress, 0] = _SUPPRESSED_LOGIT  # ... and these logits always hugely negative.
    tensors["output_norm.weight"] = np.ones(d, dtype=np.float32)
    tensors["output.weight"] = output
    return tensors


def _write_atomically(spec: TinySpec, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        _write(spec, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _write(spec: TinySpec, path: Path) -> None:
    tokens, scores, types = tiny_vocab()
    writer = GGUFWriter(path, "llama")
    writer.add_name(f"Corral {spec.name}")
    writer.add_description("Random weights for tests; generated by models/tiny.py")
    writer.add_file_type(int(LlamaFileType.ALL_F32))
    writer.add_vocab_size(len(tokens))
    writer.add_context_length(spec.context_length)
    writer.add_embedding_length(spec.n_embd)
    writer.add_block_count(spec.n_layer)
    writer.add_feed_forward_length(spec.n_ff)
    writer.add_head_count(spec.n_head)
    writer.add_head_count_kv(spec.n_head)
    writer.add_rope_dimension_count(spec.n_embd // spec.n_head)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    if spec.embedding:
        writer.add_pooling_type(PoolingType.MEAN)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_unk_token_id(UNK_ID)
    writer.add_bos_token_id(BOS_ID)
    writer.add_eos_token_id(EOS_ID)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_add_space_prefix(True)
    if not spec.embedding:
        writer.add_chat_template(CHAT_TEMPLATE)
    for name, array in _weights(spec, len(tokens), _suppressed_ids(tokens)).items():
        writer.add_tensor(name, array)
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
