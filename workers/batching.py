"""The batching runtime: one model, one llama.cpp context, ``parallel`` sequences at once.

llama-cpp-python's ``Llama`` decodes one sequence and is not thread-safe; this runtime
uses its low-level API the way llama.cpp's own server does. The context is made with
``n_seq_max = parallel`` and one KV stream per sequence (``kv_unified = false``), each of
``n_ctx`` cells, so a sequence attends to its own cells only. Callers (a pool's Celery
threads) submit a :class:`~workers.slots.Request` and wait on it; one scheduler thread owns
the context and loops:

1. admit waiting requests into free slots (between any two decodes: continuous batching);
2. build one ``llama_batch``: the token each generating sequence sampled last, then prompt
   tokens of the sequences still reading theirs, in admission order, up to ``n_batch``
   tokens (``chunk`` while others generate, so a long prompt is read in chunks and does
   not stall them for long);
3. ``llama_decode`` it, and sample each sequence whose logits it produced with that
   sequence's own sampler chain (:class:`~workers.slots.Sequence`);
4. retire the sequences that ended or whose caller gave up, freeing their slot and their
   KV cells (``llama_memory_seq_rm``).

All per-step I/O (cancel polls, streaming the text to Redis) happens in the caller's
thread: the scheduler hands it text pieces through the request's queue. Results have the
shape of :class:`~workers.runtime.LlamaCppRuntime`'s, with per-sequence timings.
"""

from __future__ import annotations

import collections
import logging
import os
import queue
import threading
import time
from pathlib import Path
from typing import Any

from app.core.errors import ModelFileError, StepInputError
from app.workflows import structured
from models.catalog import CatalogEntry
from workers.runtime import ChatPlan, Placement, RunControl
from workers.slots import Request, Sequence

log = logging.getLogger(__name__)

N_BATCH = 512  # tokens per llama_decode
CHUNK = 256  # prompt tokens per decode while other sequences generate


class BatchingRuntime:
    """A GGUF chat model serving up to ``parallel`` concurrent calls with one context.

    Thread-safe: ``generate`` and ``chat`` may be called from many threads at once; each
    blocks until its own sequence ends, and raises ``StepTimeout``/``StepCancelled`` when
    its ``RunControl`` stops it, as ``LlamaCppRuntime`` does.

    Example::

        rt = BatchingRuntime(entry, path, parallel=4)
        out = rt.generate({"prompt": "Hi", "max_tokens": 8, ...}, RunControl())
        out["text"], out["timings"]["tokens_per_s"]
    """

    def __init__(
        self,
        entry: CatalogEntry,
        path: Path,
        placement: Placement | None = None,
        n_ctx: int | None = None,
        parallel: int | None = None,
        *,
        chunk: int = CHUNK,
    ) -> None:
        import llama_cpp
        from llama_cpp._internals import LlamaContext, LlamaModel
        from llama_cpp._logger import set_verbose

        if entry.kind != "chat":
            raise ValueError(f"the batching runtime serves chat models; {entry.name} embeds")
        placement = placement or Placement()
        self.name = entry.name
        self.kind = entry.kind
        self.n_ctx = n_ctx or entry.n_ctx  # per sequence
        self.parallel = parallel or entry.parallel
        if self.parallel < 1:
            raise ValueError(f"parallel must be ≥ 1, got {self.parallel}")
        self.n_batch = min(N_BATCH, self.n_ctx * self.parallel)
        self.chunk = max(1, min(chunk, self.n_batch))
        started = time.perf_counter()
        mparams = llama_cpp.llama_model_default_params()
        mparams.n_gpu_layers = placement.n_gpu_layers
        mparams.main_gpu = placement.main_gpu
        if placement.tensor_split:
            split = _floats(len(placement.tensor_split))(*placement.tensor_split)
            self._split = split  # kept alive while the model is
            mparams.tensor_split = split
        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx = self.n_ctx * self.parallel
        cparams.n_batch = cparams.n_ubatch = self.n_batch
        cparams.n_seq_max = self.parallel
        # One KV stream of n_ctx cells per sequence: a sequence's attention covers its own
        # cells only, so its logits are those it gets decoded alone (a unified cache
        # changes them in the last bits, enough to change a greedy answer).
        cparams.kv_unified = False
        cores = os.cpu_count() or 1
        cparams.n_threads = placement.n_threads or max(cores // 2, 1)
        cparams.n_threads_batch = placement.n_threads or cores
        cparams.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        cparams.embeddings = False
        cparams.no_perf = True
        set_verbose(False)  # llama.cpp's own log, as Llama(verbose=False) sets it
        try:
            self._model: Any = LlamaModel(path_model=str(path), params=mparams, verbose=False)
            self._ctx: Any = LlamaContext(model=self._model, params=cparams, verbose=False)
        except (ValueError, RuntimeError, OSError) as exc:
            raise ModelFileError(
                f"llama.cpp could not load {path} for {entry.name!r}: {exc}"
            ) from exc
        self.load_ms = (time.perf_counter() - started) * 1000
        self._llama = llama_cpp
        self._mem = llama_cpp.llama_get_memory(self._ctx.ctx)
        self._batch = llama_cpp.llama_batch_init(self.n_batch, 0, 1)
        self.eos = int(self._model.token_eos())
        self._bos = int(self._model.token_bos())
        self._eog = [t for t in range(self._model.n_vocab()) if self._is_eog(t)]
        self._formatter = _chat_formatter(self._model, self.eos, self._bos)
        self._cond = threading.Condition()
        self._waiting: collections.deque[Request] = collections.deque()
        self._free = list(range(self.parallel))
        self._active: dict[int, Sequence] = {}
        self._order: list[Sequence] = []  # admission order
        self._closed = False
        self._broken: str | None = None
        self._thread = threading.Thread(target=self._loop, name="corral-batch", daemon=True)
        self._thread.start()
        log.info(
            "loaded %s from %s in %.0f ms: %d slots of %d tokens",
            entry.name,
            path,
            self.load_ms,
            self.parallel,
            self.n_ctx,
        )

    def _is_eog(self, token: int) -> bool:
        return bool(self._llama.llama_vocab_is_eog(self._model.vocab, token))

    # -- the ModelRuntime protocol ------------------------------------------------------

    def count_tokens(self, text: str) -> int:
        return len(self._model.tokenize(text.encode("utf-8"), add_bos=False, special=False))

    def count_chat_tokens(self, messages: list[dict[str, Any]]) -> int:
        """The tokens of the prompt ``chat`` sends for ``messages``, through the template."""
        return len(self._chat_prompt(messages)[0])

    def generate(self, inp: dict[str, Any], control: RunControl) -> dict[str, Any]:
        text: str = inp["prompt"]
        # As create_completion: the text's tokens (special ones parsed) after BOS.
        tokens = self._model.tokenize(text.encode("utf-8"), add_bos=False, special=True)
        if self._model.add_bos_token() and self._bos != -1:
            tokens = [self._bos, *tokens]
        if len(tokens) + inp["max_tokens"] > self.n_ctx:
            raise StepInputError(
                f"input.prompt is {len(tokens)} tokens and input.max_tokens is "
                f"{inp['max_tokens']}: together {len(tokens) + inp['max_tokens']}, over the "
                f"{self.n_ctx}-token context of model {self.name!r}"
            )
        req = self._run(tokens, inp, inp["max_tokens"], None, list(inp.get("stop") or []), control)
        return self._result(req)

    def chat(self, inp: dict[str, Any], control: RunControl) -> dict[str, Any]:
        plan = ChatPlan.of(inp)
        tokens, template_stops = self._chat_prompt(plan.messages)
        if len(tokens) >= self.n_ctx:
            raise StepInputError(
                f"the chat prompt does not fit model {self.name!r}: its messages are "
                f"{len(tokens)} tokens through the chat template, the context is "
                f"{self.n_ctx} tokens"
            )
        # As create_completion: max_tokens is cut to what the context has left.
        max_tokens = min(int(inp["max_tokens"]), self.n_ctx - len(tokens))
        stops = [*(inp.get("stop") or []), *template_stops]
        req = self._run(tokens, inp, max_tokens, plan.grammar, stops, control)
        out = self._result(req)
        out["message"] = {"role": "assistant", "content": out["text"]}
        call = structured.parse_call(out["text"], plan.functions) if plan.calling else None
        if call is not None:
            out["function_calls"] = [call]
            out["finish_reason"] = "tool_calls"
        return out

    def embed(self, inp: dict[str, Any], control: RunControl) -> dict[str, Any]:
        raise StepInputError(f"model {self.name!r} is a chat model: it does not embed")

    def close(self) -> None:
        """Stop the scheduler (waiting and running calls fail) and free the model."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout=30)
        if self._thread.is_alive():  # a decode that never returns: leave the memory be
            log.error("the batch scheduler of %s did not stop", self.name)
            return
        self._llama.llama_batch_free(self._batch)
        self._ctx.close()
        self._model.close()

    # -- the caller's side --------------------------------------------------------------

    def _chat_prompt(self, messages: list[dict[str, Any]]) -> tuple[list[int], list[str]]:
        """The prompt's tokens for ``messages`` and the template's stop strings, as
        llama-cpp-python's chat handler makes them."""
        result = self._formatter(messages=messages)
        tokens = self._model.tokenize(
            result.prompt.encode("utf-8"), add_bos=not result.added_special, special=True
        )
        stop = result.stop or []
        return tokens, [stop] if isinstance(stop, str) else list(stop)

    def _run(
        self,
        prompt: list[int],
        inp: dict[str, Any],
        max_tokens: int,
        grammar: str | None,
        stops: list[str],
        control: RunControl,
    ) -> Request:
        """Submit a request and wait for it, streaming its text and watching ``control``
        in this (the caller's) thread."""
        banned = self._eog if inp.get("ignore_eos") else []
        req = Request(prompt, max_tokens, inp, grammar, stops, control, banned)
        with self._cond:
            if self._closed or self._broken:
                raise ModelFileError(self._broken or f"model {self.name!r} was unloaded")
            self._waiting.append(req)
            self._cond.notify()
        while True:
            wait = control.poll_s
            if control.deadline is not None:
                wait = min(wait, control.deadline - time.monotonic())
            try:
                kind, value = req.outbox.get(timeout=max(wait, 0.001))
            except queue.Empty:
                kind, value = "", None
            if kind == "done":
                break
            if kind == "text" and control.on_text is not None:
                control.on_text(value)
            stop = control.check()
            if stop is not None:
                control.stopped = req.stop_reason = stop
                with self._cond:
                    self._cond.notify()
                control.raise_if_stopped()
        if req.error is not None:
            raise req.error
        # The rest of the text (finish() sent it before "done").
        while control.on_text is not None:
            try:
                kind, value = req.outbox.get_nowait()
            except queue.Empty:
                break
            if kind == "text":
                control.on_text(value)
        return req

    def _result(self, req: Request) -> dict[str, Any]:
        """The step's output, in :meth:`LlamaCppRuntime._finish`'s shape."""
        ended = req.ended or time.perf_counter()
        first = req.control.first_token_at or ended
        gen_s = max(ended - first, 1e-9)
        started = req.submitted
        return {
            "text": req.text.decode("utf-8", "ignore"),
            "finish_reason": req.finish_reason,
            "prompt_tokens": len(req.prompt),
            "completion_tokens": len(req.completion),
            "timings": {
                "prompt_ms": round((first - started) * 1000, 3),
                "generate_ms": round(gen_s * 1000, 3),
                "total_ms": round((ended - started) * 1000, 3),
                "tokens_per_s": round(len(req.completion) / gen_s, 2),
            },
        }

    # -- the scheduler thread ---------------------------------------------------------

    def _loop(self) -> None:
        try:
            while True:
                with self._cond:
                    while not self._closed and not self._waiting and not self._active:
                        self._cond.wait()
                    if self._closed:
                        break
                    admitted = self._admit()
                for req in admitted:
                    self._start(req)
                self._retire()
                if self._active:
                    self._step()
                    self._retire()
        except BaseException as exc:
            log.exception("the batch scheduler of %s failed", self.name)
            self._broken = f"the batch scheduler of model {self.name!r} failed: {exc}"
        finally:
            self._fail_all(ModelFileError(self._broken or f"model {self.name!r} was unloaded"))

    def _admit(self) -> list[Request]:
        """Requests taken from the queue for the free slots (under the lock)."""
        taken: list[Request] = []
        while self._waiting and len(taken) < len(self._free):
            taken.append(self._waiting.popleft())
        return taken

    def _start(self, req: Request) -> None:
        if req.stop_reason is not None:  # its caller gave up while it waited
            req.fail(ModelFileError("stopped before it started"))
            return
        seq_id = min(self._free)  # the lowest: active ids stay contiguous
        self._free.remove(seq_id)
        try:
            seq = Sequence(seq_id, req, self._model)
        except Exception as exc:
            self._free.append(seq_id)
            req.fail(exc)
            return
        req.admitted = time.perf_counter()
        self._active[seq_id] = seq
        self._order.append(seq)

    def _retire(self) -> None:
        """Free the slots of sequences that ended or were given up."""
        for seq in [s for s in self._order if s.done or s.request.stop_reason is not None]:
            self._order.remove(seq)
            del self._active[seq.seq_id]
            self._llama.llama_memory_seq_rm(self._mem, seq.seq_id, -1, -1)
            seq.close()
            self._free.append(seq.seq_id)

    def _step(self) -> None:
        """One decode: each generating sequence's last token, then prompt chunks.

        llama.cpp splits a batch over per-sequence KV streams into micro-batches of
        consecutive sequence ids in increasing order, so the tokens go in by sequence id
        (and new sequences take the lowest free id): the sequences decode together.
        """
        work: dict[int, tuple[Sequence, list[int], bool]] = {}
        generating = False
        for seq in self._order:
            if seq.pending is not None:
                work[seq.seq_id] = (seq, [seq.pending], True)
                seq.pending = None
                generating = True
        budget = self.n_batch - len(work)
        if generating:
            budget = min(budget, self.chunk)
        for seq in self._order:  # prompts in admission order
            if budget <= 0:
                break
            if not seq.prompting:
                continue
            prompt = seq.request.prompt
            end = min(len(prompt), seq.prompt_done + budget)
            work[seq.seq_id] = (seq, prompt[seq.prompt_done : end], end == len(prompt))
            budget -= end - seq.prompt_done
            seq.prompt_done = end
        if not work:
            return
        b = self._batch
        n = 0
        outputs: list[tuple[Sequence, int]] = []
        for seq_id in sorted(work):
            seq, tokens, last_has_logits = work[seq_id]
            for j, token in enumerate(tokens):
                b.token[n] = token
                b.pos[n] = seq.n_past + j
                b.n_seq_id[n] = 1
                b.seq_id[n][0] = seq_id
                b.logits[n] = last_has_logits and j == len(tokens) - 1
                n += 1
            seq.n_past += len(tokens)
            if last_has_logits:
                outputs.append((seq, n - 1))
        b.n_tokens = n
        rc = self._llama.llama_decode(self._ctx.ctx, b)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc} for a batch of {n} tokens")
        now = time.perf_counter()
        for seq, i in outputs:
            token = self._llama.llama_sampler_sample(seq.sampler.sampler, self._ctx.ctx, i)
            seq.accept(int(token), now)

    def _fail_all(self, error: Exception) -> None:
        with self._cond:
            waiting, self._waiting = list(self._waiting), collections.deque()
        for req in waiting:
            req.fail(error)
        for seq in self._order:
            if not seq.done:
                seq.request.fail(error)
            seq.close()
        self._order.clear()
        self._active.clear()


def _floats(n: int) -> Any:
    """A ctypes array type of ``n`` floats (llama.cpp's tensor split)."""
    import ctypes

    return ctypes.c_float * n


def _chat_formatter(model: Any, eos: int, bos: int) -> Any:
    """The chat formatter ``Llama`` picks for this GGUF (``chat_format`` unset): the
    built-in one its template is known as, else the template itself through Jinja2, else
    llama-2's format."""
    from llama_cpp import llama_chat_format as fmt

    metadata = model.metadata()
    template = metadata.get("tokenizer.chat_template")
    if not template:
        return fmt.format_llama2
    known = {
        "chatml": fmt.format_chatml,
        "mistral-instruct": fmt.format_mistral_instruct,
        "llama-3": fmt.format_llama3,
    }
    guessed = fmt.guess_chat_format_from_gguf_metadata(metadata)
    if guessed in known:
        return known[guessed]
    eos_text = model.token_get_text(eos) if eos != -1 else ""
    bos_text = model.token_get_text(bos) if bos != -1 else ""
    return fmt.Jinja2ChatFormatter(template, eos_text, bos_text, stop_token_ids=[eos])


__all__ = ["BatchingRuntime"]
