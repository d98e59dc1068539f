"""One sequence of the batching runtime: the caller's request and its decoding state.

A :class:`Request` is what a step's thread hands to the batch and waits on: the prompt's
tokens, the sampling parameters, the stop strings. The scheduler thread turns it into a
:class:`Sequence` when a slot is free: its own llama.cpp sampler chain (penalties,
grammar, top-k/top-p/min-p/temperature or greedy, its own seed), its position in its KV
stream, the completion's tokens and bytes. Sampling, stop strings and the result follow
llama-cpp-python's ``create_completion``: the same chain in the same order, stop strings
matched on the completion's bytes and cut off, ``finish_reason`` ``stop`` or ``length``.
"""

from __future__ import annotations

import math
import queue
import time
from dataclasses import dataclass, field
from typing import Any

from app.core.errors import StepInputError
from workers.runtime import RunControl
from workers.textstream import TextPieces

# llama-cpp-python's defaults for what a step does not set (create_completion's).
MIN_P = 0.05
TYPICAL_P = 1.0
PENALTY_LAST_N = 64  # Llama(last_n_tokens_size=64)


@dataclass
class Request:
    """A completion asked of the batch by one caller, and its outcome once it ended.

    The caller's thread reads ``outbox`` (``("text", piece)`` while streaming, then one
    ``("done", None)``) and may set ``stop_reason`` to stop it; the scheduler thread
    writes everything else.
    """

    prompt: list[int]
    max_tokens: int
    params: dict[str, Any]
    grammar: str | None
    stops: list[str]
    control: RunControl
    banned: list[int] = field(default_factory=list)  # tokens never sampled (ignore_eos)
    submitted: float = field(default_factory=time.perf_counter)
    outbox: queue.SimpleQueue[tuple[str, Any]] = field(default_factory=queue.SimpleQueue)
    stop_reason: str | None = None  # "timeout" | "cancelled": the caller gave up on it
    admitted: float | None = None
    completion: list[int] = field(default_factory=list)
    text: bytes = b""
    finish_reason: str = "length"
    ended: float | None = None
    error: BaseException | None = None

    def fail(self, error: BaseException) -> None:
        """End the request with ``error`` (raised in the caller's thread)."""
        self.error = error
        self.ended = time.perf_counter()
        self.outbox.put(("done", None))


class Sequence:
    """A request being decoded in one slot (``seq_id``) of the batch."""

    def __init__(self, seq_id: int, request: Request, model: Any) -> None:
        import llama_cpp
        from llama_cpp import _internals

        self.seq_id = seq_id
        self.request = request
        self.n_past = 0  # tokens of this sequence in its KV stream
        self.prompt_done = 0  # prompt tokens sent to the model so far
        self.pending: int | None = None  # sampled, not yet decoded
        self.done = False
        self._model = model
        self._is_eog = llama_cpp.llama_vocab_is_eog
        self._vocab = model.vocab
        self._stops = [s.encode("utf-8") for s in request.stops if s]
        self._longest_stop = max((len(s) for s in self._stops), default=0)
        self._pieces: TextPieces | None = None
        if request.control.on_text is not None:
            shim = _ModelShim(model)
            self._pieces = TextPieces(shim, self._emit, request.stops)
        chain: Any = _internals.LlamaSampler  # untyped in llama-cpp-python
        self.sampler: Any = chain()
        try:
            self._build(request.params, request.grammar, request.banned)
        except BaseException:
            self.sampler.close()
            raise

    def _build(self, p: dict[str, Any], grammar: str | None, banned: list[int]) -> None:
        """The chain llama-cpp-python's ``Llama._init_sampler`` builds, in its order."""
        import llama_cpp

        s = self.sampler
        n_vocab = self._model.n_vocab()
        if banned:  # ignore_eos: the end-of-generation tokens can never be sampled
            s.add_logit_bias(n_vocab, dict.fromkeys(banned, -math.inf))
        s.add_penalties(
            n_vocab,
            PENALTY_LAST_N,
            float(p["repeat_penalty"]),
            float(p.get("frequency_penalty") or 0.0),
            float(p.get("presence_penalty") or 0.0),
        )
        if grammar:
            g = llama_cpp.llama_sampler_init_grammar(self._vocab, grammar.encode("utf-8"), b"root")
            if not g:
                raise StepInputError("llama.cpp could not parse the step's grammar")
            llama_cpp.llama_sampler_chain_add(s.sampler, g)
        temp = float(p["temperature"])
        seed = p.get("seed")
        seed = llama_cpp.LLAMA_DEFAULT_SEED if seed is None else int(seed) & 0xFFFFFFFF
        if temp < 0:
            s.add_dist(seed)
        elif temp == 0:
            s.add_greedy()
        else:
            s.add_top_k(int(p["top_k"]))
            s.add_typical(TYPICAL_P, 1)
            s.add_top_p(float(p["top_p"]), 1)
            s.add_min_p(MIN_P, 1)
            s.add_temp(temp)
            s.add_dist(seed)

    @property
    def prompting(self) -> bool:
        """Whether prompt tokens remain to be sent to the model."""
        return self.prompt_done < len(self.request.prompt)

    def _emit(self, text: str) -> None:
        self.request.outbox.put(("text", text))

    def accept(self, token: int, now: float) -> None:
        """Take the token sampled for this sequence: end it, or queue it for decoding."""
        req = self.request
        control = req.control
        if control.first_token_at is None:
            control.first_token_at = now
        control.tokens += 1
        if self._is_eog(self._vocab, token):
            self._finish("stop")
            return
        req.completion.append(token)
        if self._pieces is not None:
            self._pieces(token)
        before = len(req.text)
        req.text += self._model.detokenize([token], special=False)
        if self._stops:
            start = max(0, before - self._longest_stop + 1)
            for stop in self._stops:  # the first in the caller's order, as llama-cpp-python
                found = req.text.find(stop, start)
                if found >= 0:
                    req.text = req.text[:found]
                    self._finish("stop")
                    return
        if len(req.completion) >= req.max_tokens:
            self._finish("length")
            return
        self.pending = token

    def _finish(self, reason: str) -> None:
        req = self.request
        req.finish_reason = reason
        req.ended = time.perf_counter()
        self.done = True
        if self._pieces is not None:
            self._pieces.finish(req.text.decode("utf-8", "ignore"))
        req.outbox.put(("done", None))

    def close(self) -> None:
        """Free the sampler chain (the KV cells are the runtime's to free)."""
        self.sampler.close()


class _ModelShim:
    """What :class:`TextPieces` reads of a ``Llama``: its ``_model``."""

    def __init__(self, model: Any) -> None:
        self._model = model
