"""The in-process limit of :mod:`benchmarks.batching`: a GGUF loaded through llama.cpp's
low-level API in this process, N chat-templated prompts in one ``llama_batch`` with N
sequence ids, then one token of every sequence per ``llama_decode``, greedy, end of
sequence suppressed."""

from __future__ import annotations

import ctypes
import logging
import os
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from benchmarks.streaming import PLACES, QUESTIONS

PROMPT_MAX = 512  # tokens of one prompt, in process


def messages(i: int) -> list[dict[str, str]]:
    """Sequence ``i``'s chat: a different question for each."""
    text = QUESTIONS[i % len(QUESTIONS)].format(PLACES[i % len(PLACES)])
    return [{"role": "user", "content": f"{text} Then tell me more about it. (#{i})"}]


# ---- (a) the in-process limit: llama.cpp's batch API -----------------------------------


class _Captured(Exception):
    def __init__(self, prompt: list[int]) -> None:
        self.prompt = prompt


class InProcess:
    """A GGUF loaded through llama.cpp's low-level API; N sequences decoded together."""

    def __init__(self, path: Path, n_ctx_seq: int, threads: int | None) -> None:
        import llama_cpp

        logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)  # llama.cpp's log
        self.lib = llama_cpp
        llama_cpp.llama_backend_init()
        params = llama_cpp.llama_model_default_params()
        params.n_gpu_layers = 0
        self.model = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {path}")
        self.vocab = llama_cpp.llama_model_get_vocab(self.model)
        self.n_vocab = int(llama_cpp.llama_vocab_n_tokens(self.vocab))
        self.eos = int(llama_cpp.llama_vocab_eos(self.vocab))
        self.n_ctx_seq = n_ctx_seq
        # What llama_cpp.Llama (Corral's runtime) uses when CORRAL_N_THREADS is unset.
        cpus = os.cpu_count() or 1
        self.threads = (threads or max(cpus // 2, 1), threads or cpus)
        self.contexts: dict[int, Any] = {}
        self._handler = self._chat_handler()

    def _text(self, token: int) -> str:
        return bytes(self.lib.llama_vocab_get_text(self.vocab, token) or b"").decode()

    def _chat_handler(self) -> Any:
        """The chat handler ``Llama.create_chat_completion`` picks for this GGUF (Corral's
        runtime names no chat format): a known template by name, else the GGUF's own."""
        from llama_cpp import llama_chat_format as fmt

        raw = self.lib.llama_model_chat_template(self.model, None)
        if not raw:
            return fmt.get_chat_completion_handler("llama-2")
        template = raw.decode()
        name = fmt.guess_chat_format_from_gguf_metadata({"tokenizer.chat_template": template})
        if name is not None:
            return fmt.get_chat_completion_handler(name)
        bos = int(self.lib.llama_vocab_bos(self.vocab))
        return fmt.Jinja2ChatFormatter(
            template,
            self._text(self.eos) if self.eos != -1 else "",
            self._text(bos) if bos != -1 else "",
            stop_token_ids=[self.eos],
        ).to_chat_handler()

    def tokenize(self, text: bytes, add_bos: bool = True, special: bool = False) -> list[int]:
        buf = (self.lib.llama_token * (len(text) + 8))()
        n = self.lib.llama_tokenize(self.vocab, text, len(text), buf, len(buf), add_bos, special)
        if n < 0:
            raise RuntimeError(f"tokenizing {len(text)} bytes failed ({n})")
        return list(buf[:n])

    def prompt(self, chat: list[dict[str, str]]) -> list[int]:
        """The prompt tokens ``create_chat_completion`` would decode for ``chat``."""

        def capture(prompt: list[int], **_: Any) -> Any:
            raise _Captured(prompt)

        shim = SimpleNamespace(tokenize=self.tokenize, create_completion=capture, verbose=False)
        try:
            self._handler(llama=shim, messages=chat, max_tokens=1)
        except _Captured as got:
            return list(got.prompt)
        raise RuntimeError("the chat handler made no completion")

    def detokenize(self, tokens: list[int]) -> str:
        out = b""
        buf = ctypes.create_string_buffer(64)
        for token in tokens:
            n = self.lib.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, False)
            out += buf.raw[: max(n, 0)]
        return out.decode("utf-8", "replace")

    def context(self, n: int) -> Any:
        """A context of ``n`` sequences, made once: ``n_ctx_seq`` cells each."""
        if n not in self.contexts:
            params = self.lib.llama_context_default_params()
            params.n_ctx = n * self.n_ctx_seq
            params.n_batch = n * PROMPT_MAX  # every prompt in one batch
            params.n_ubatch = 512  # what llama.cpp computes at once, as Corral's pools
            params.n_seq_max = n
            params.n_threads, params.n_threads_batch = self.threads
            params.flash_attn_type = self.lib.LLAMA_FLASH_ATTN_TYPE_DISABLED  # as Llama's
            ctx = self.lib.llama_init_from_model(self.model, params)
            if not ctx:
                raise RuntimeError(f"llama.cpp could not make a context of {n} sequences")
            self.contexts[n] = ctx
        return self.contexts[n]

    def _greedy(self, ctx: Any, row: int) -> int:
        logits = np.ctypeslib.as_array(self.lib.llama_get_logits_ith(ctx, row), (self.n_vocab,))
        token = int(logits.argmax())
        if token == self.eos:  # ignore_eos: the best token that is not the end
            masked = logits.copy()
            masked[self.eos] = -np.inf
            token = int(masked.argmax())
        return token

    def run(self, prompts: list[list[int]], tokens: int) -> dict[str, Any]:
        """Decode ``prompts`` together, greedily, ``tokens`` tokens each."""
        lib, n = self.lib, len(prompts)
        if max(map(len, prompts)) > min(PROMPT_MAX, self.n_ctx_seq - tokens):
            raise ValueError(f"a prompt is over {PROMPT_MAX} tokens or leaves no room")
        ctx = self.context(n)
        lib.llama_memory_clear(lib.llama_get_memory(ctx), False)  # cells, not bytes
        batch = lib.llama_batch_init(max(sum(map(len, prompts)), n), 0, 1)

        def add(token: int, pos: int, seq: int, logits: bool) -> None:
            i = batch.n_tokens
            batch.token[i], batch.pos[i], batch.n_seq_id[i] = token, pos, 1
            batch.seq_id[i][0], batch.logits[i] = seq, logits
            batch.n_tokens += 1

        def decode() -> None:
            if (code := lib.llama_decode(ctx, batch)) != 0:
                raise RuntimeError(f"llama_decode returned {code}")

        out: list[list[int]] = [[] for _ in range(n)]
        done_at = [0.0] * n
        try:
            started = time.perf_counter()
            batch.n_tokens = 0
            rows = []
            for seq, prompt in enumerate(prompts):
                for pos, token in enumerate(prompt):
                    add(token, pos, seq, pos == len(prompt) - 1)
                rows.append(batch.n_tokens - 1)
            decode()
            prefilled = time.perf_counter()
            for step in range(tokens):
                for seq in range(n):
                    out[seq].append(self._greedy(ctx, rows[seq]))
                    done_at[seq] = time.perf_counter()
                if step == tokens - 1:
                    break
                batch.n_tokens = 0
                for seq in range(n):
                    add(out[seq][-1], len(prompts[seq]) + step, seq, True)
                rows = list(range(n))
                decode()
        finally:
            lib.llama_batch_free(batch)
        wall = max(done_at) - started
        return {
            "wall_s": wall,
            "latency_ms": [(t - started) * 1000 for t in done_at],
            "completion_tokens": [len(o) for o in out],
            "prompt_tokens": [len(p) for p in prompts],
            "prefill_ms": (prefilled - started) * 1000,
            "texts": [self.detokenize(o) for o in out],
        }

    def close(self) -> None:
        for ctx in self.contexts.values():
            self.lib.llama_free(ctx)
        self.contexts.clear()
        self.lib.llama_model_free(self.model)


# ---- (b), (c) through Corral -----------------------------------------------------------
