"""The model runtime seam: ``ModelRuntime``, and its llama.cpp implementation.

A worker process holds one runtime, created after the fork (never at import). Steps call
``generate``, ``chat`` or ``embed`` with a :class:`RunControl` that stops the model at the
step's deadline or when its workflow is cancelled; llama.cpp errors are translated into
Corral's own here, at one boundary.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, cast

import numpy as np
import numpy.typing as npt

from app.core.errors import (
    ModelFileError,
    StepCancelled,
    StepInputError,
    StepTimeout,
)
from app.workflows import structured
from models.catalog import CatalogEntry
from workers.textstream import TextPieces

log = logging.getLogger(__name__)


@dataclass
class RunControl:
    """Limits for one model call: a monotonic deadline and a cancellation probe."""

    deadline: float | None = None
    timeout_s: float | None = None
    should_cancel: Callable[[], bool] = lambda: False
    poll_s: float = 0.1
    # "timeout" | "cancelled" once the control stopped the model
    stopped: str | None = None
    first_token_at: float | None = None
    tokens: int = 0  # tokens sampled so far in this call
    # Called with each piece of the reply's text as the model decodes it.
    on_text: Callable[[str], None] | None = None
    # The first cancel poll comes poll_s after the start (a cancel before the claim is
    # caught by the claim itself), so a short step makes no Redis round trip for it.
    _last_poll: float = field(default_factory=time.monotonic, repr=False)

    def check(self) -> str | None:
        """Why the model must stop now, if it must."""
        now = time.monotonic()
        if self.deadline is not None and now >= self.deadline:
            return "timeout"
        if now - self._last_poll >= self.poll_s:
            self._last_poll = now
            if self.should_cancel():
                return "cancelled"
        return None

    def raise_if_stopped(self) -> None:
        if self.stopped == "timeout":
            raise StepTimeout(f"the step ran past its timeout_s of {self.timeout_s or 0:g} s")
        if self.stopped == "cancelled":
            raise StepCancelled(
                f"cancelled by request; the worker stopped the model after {self.tokens} tokens"
            )


class ModelRuntime(Protocol):
    """A loaded model that runs steps. One per worker process; one call at a time."""

    name: str
    n_ctx: int

    def count_tokens(self, text: str) -> int: ...

    def count_chat_tokens(self, messages: list[dict[str, Any]]) -> int: ...

    def generate(self, inp: dict[str, Any], control: RunControl) -> dict[str, Any]: ...

    def chat(self, inp: dict[str, Any], control: RunControl) -> dict[str, Any]: ...

    def embed(self, inp: dict[str, Any], control: RunControl) -> dict[str, Any]: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class Placement:
    """Where llama.cpp puts the model: layers offloaded, main GPU, split between GPUs."""

    n_gpu_layers: int = 0
    main_gpu: int = 0
    tensor_split: list[float] | None = None
    n_threads: int | None = None


_LLAMA: type[Any] | None = None


@dataclass
class _Detokenized:
    """The tokens ``detokenize`` converted last (a copy) and the bytes it returned."""

    tokens: list[int]
    special: bool
    text: bytes


def llama_class() -> type[Any]:
    """``llama_cpp.Llama`` with two changes to ``create_completion``.

    - It also asks ``extra_stop``, when one is set: ``create_chat_completion`` takes no
      stopping criteria; its chat handler calls ``create_completion`` with the template's
      own, and this adds the step's to them.
    - ``on_token``, when set, is called with every token as it is sampled (the source of
      a step's streamed text, see :class:`TextPieces`).
    - Its detokenization is incremental. llama-cpp-python's ``create_completion``
      detokenizes the whole completion after every token, one ctypes call per token, so a
      completion of n tokens costs n²/2 conversions (on the tiny model, 85% of a 2048-token
      completion's time). When ``detokenize`` is handed a list that extends the one it
      converted last, only the new tokens are converted, appended to the bytes it returned.
    """
    global _LLAMA
    if _LLAMA is None:
        from llama_cpp import Llama, StoppingCriteriaList
        from llama_cpp.llama_tokenizer import LlamaTokenizer

        class CorralLlama(Llama):
            extra_stop: Callable[[Any, Any], bool] | None = None
            on_token: Callable[[int], None] | None = None
            _detokenized: _Detokenized | None = None

            def generate(self, *args: Any, **kwargs: Any) -> Any:
                # Each token as it is sampled, before create_completion looks at it.
                for token in super().generate(*args, **kwargs):
                    if self.on_token is not None:
                        self.on_token(token)
                    yield token

            def create_completion(self, *args: Any, **kwargs: Any) -> Any:
                if self.extra_stop is not None:
                    own = kwargs.get("stopping_criteria") or []
                    kwargs["stopping_criteria"] = StoppingCriteriaList([*own, self.extra_stop])
                try:
                    return super().create_completion(*args, **kwargs)
                finally:
                    self._detokenized = None

            def detokenize(
                self, tokens: list[int], prev_tokens: Any = None, special: bool = False
            ) -> bytes:
                done = self._detokenized
                bos = self.token_bos()
                # The GGUF's own tokenizer converts token by token, so bytes(a + b) is
                # bytes(a) + bytes(b), except that a leading BOS drops the space after it:
                # a list that starts with BOS, or whose new tokens hold one, is converted
                # whole. The prefix is compared in full (C speed, far below a conversion).
                if (
                    done is not None
                    and done.special == special
                    and isinstance(self.tokenizer_, LlamaTokenizer)
                    and len(tokens) >= len(done.tokens) > 0
                    and tokens[0] != bos
                    and tokens[: len(done.tokens)] == done.tokens
                    and bos not in tokens[len(done.tokens) :]
                ):
                    tail = tokens[len(done.tokens) :]
                    if tail:
                        done.text += super().detokenize(tail, special=special)
                        done.tokens.extend(tail)
                    return done.text
                text: bytes = super().detokenize(tokens, prev_tokens=prev_tokens, special=special)
                self._detokenized = _Detokenized(list(tokens), special, text) if tokens else None
                return text

        _LLAMA = CorralLlama
    return _LLAMA


class LlamaCppRuntime:
    """A GGUF model loaded once through llama-cpp-python."""

    def __init__(
        self,
        entry: CatalogEntry,
        path: Path,
        placement: Placement | None = None,
        n_ctx: int | None = None,
    ) -> None:
        placement = placement or Placement()
        self.name = entry.name
        self.kind = entry.kind
        self.n_ctx = n_ctx or entry.n_ctx
        started = time.perf_counter()
        embed = entry.kind == "embed"
        try:
            self.llm: Any = llama_class()(
                model_path=str(path),
                n_ctx=self.n_ctx,
                n_batch=self.n_ctx if embed else min(512, self.n_ctx),
                n_ubatch=self.n_ctx if embed else min(512, self.n_ctx),
                embedding=embed,
                n_gpu_layers=placement.n_gpu_layers,
                main_gpu=placement.main_gpu,
                tensor_split=placement.tensor_split,
                n_threads=placement.n_threads,
                seed=0,
                verbose=False,
            )
        except (ValueError, RuntimeError, OSError) as exc:
            raise ModelFileError(
                f"llama.cpp could not load {path} for {entry.name!r}: {exc}"
            ) from exc
        self.load_ms = (time.perf_counter() - started) * 1000
        self.eos = int(self.llm.token_eos())
        self._formatter: Any = None
        log.info("loaded %s from %s in %.0f ms", entry.name, path, self.load_ms)

    def count_tokens(self, text: str) -> int:
        return len(self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=False))

    def count_chat_tokens(self, messages: list[dict[str, Any]]) -> int:
        """The tokens of the prompt ``chat`` sends for ``messages``, through the chat template."""
        if self._formatter is None:
            template = self.llm.metadata.get("tokenizer.chat_template")
            if not template:  # llama.cpp's fallback format: an estimate that errs high
                return sum(self.count_tokens(str(m.get("content", ""))) + 8 for m in messages) + 8
            from llama_cpp.llama_chat_format import Jinja2ChatFormatter

            def text(token: int) -> str:
                piece: bytes = self.llm.detokenize([token], special=True)
                return piece.decode("utf-8", "ignore")

            self._formatter = Jinja2ChatFormatter(
                template, text(self.eos), text(int(self.llm.token_bos())), stop_token_ids=[self.eos]
            )
        result = self._formatter(messages=messages)
        prompt = result.prompt.encode("utf-8")
        return len(self.llm.tokenize(prompt, add_bos=not result.added_special, special=True))

    @staticmethod
    def _stopper(control: RunControl) -> Callable[[Any, Any], bool]:
        """A stopping criterion: llama.cpp asks it after every sampled token.

        It reads no logits, so it costs one Python call per token, where a logits
        processor costs a NumPy record array over the whole vocabulary per token (a fifth
        of a tiny model's step).
        """

        def stop(_input_ids: Any, _logits: Any) -> bool:
            if control.stopped is not None:
                return True
            if control.first_token_at is None:
                control.first_token_at = time.perf_counter()
            control.tokens += 1
            control.stopped = control.check()
            return control.stopped is not None

        return stop

    def _no_eos(self) -> Any:
        """A logits processor that never lets the model end (``ignore_eos`` only)."""
        from llama_cpp import LogitsProcessorList

        eos = self.eos

        def process(
            _input_ids: npt.NDArray[np.intc], scores: npt.NDArray[np.single]
        ) -> npt.NDArray[np.single]:
            scores[eos] = -np.inf
            return scores

        return LogitsProcessorList([process])

    @staticmethod
    def _sampling(inp: dict[str, Any]) -> dict[str, Any]:
        return {
            "max_tokens": inp["max_tokens"],
            "temperature": inp["temperature"],
            "top_p": inp["top_p"],
            "top_k": inp["top_k"],
            "repeat_penalty": inp["repeat_penalty"],
            "presence_penalty": inp.get("presence_penalty", 0.0),
            "frequency_penalty": inp.get("frequency_penalty", 0.0),
            "seed": inp.get("seed"),
            "stop": inp.get("stop") or [],
        }

    def _finish(self, resp: dict[str, Any], control: RunControl, started: float) -> dict[str, Any]:
        control.raise_if_stopped()
        ended = time.perf_counter()
        choice = resp["choices"][0]
        usage = resp["usage"]
        first = control.first_token_at or ended
        gen_s = max(ended - first, 1e-9)
        return {
            "text": choice.get("text") if "text" in choice else choice["message"]["content"],
            "finish_reason": choice.get("finish_reason"),
            "prompt_tokens": usage["prompt_tokens"],
            "completion_tokens": usage["completion_tokens"],
            "timings": {
                "prompt_ms": round((first - started) * 1000, 3),
                "generate_ms": round(gen_s * 1000, 3),
                "total_ms": round((ended - started) * 1000, 3),
                "tokens_per_s": round(usage["completion_tokens"] / gen_s, 2),
            },
        }

    @contextmanager
    def _stopping(self, control: RunControl, stops: list[str]) -> Iterator[TextPieces | None]:
        """Within the block, every completion also asks ``control`` whether to stop (chat's
        handler passes stopping criteria of its own: the step's joins them), and hands
        its text, as it is sampled, to ``control.on_text``."""
        self.llm.extra_stop = self._stopper(control)
        pieces = None
        if control.on_text is not None:
            pieces = self.llm.on_token = TextPieces(self.llm, control.on_text, stops)
        try:
            yield pieces
        finally:
            self.llm.extra_stop = None
            self.llm.on_token = None

    def generate(self, inp: dict[str, Any], control: RunControl) -> dict[str, Any]:
        prompt: str = inp["prompt"]
        n_prompt = len(self.llm.tokenize(prompt.encode("utf-8"), add_bos=True, special=False))
        self._check_fits(n_prompt, inp["max_tokens"])
        started = time.perf_counter()
        sampling = self._sampling(inp)
        with self._stopping(control, sampling["stop"]) as pieces:
            resp = self.llm.create_completion(
                prompt,
                logits_processor=self._no_eos() if inp.get("ignore_eos") else None,
                **sampling,
            )
        out = self._finish(cast(dict[str, Any], resp), control, started)
        if pieces is not None:
            pieces.finish(out["text"])
        return out

    def chat(self, inp: dict[str, Any], control: RunControl) -> dict[str, Any]:
        plan = ChatPlan.of(inp)
        messages, functions, calling = plan.messages, plan.functions, plan.calling
        grammar = None
        if plan.grammar:
            from llama_cpp.llama_grammar import LlamaGrammar

            grammar = LlamaGrammar.from_string(plan.grammar, verbose=False)
        started = time.perf_counter()
        sampling = self._sampling(inp)
        try:
            with self._stopping(control, sampling["stop"]) as pieces:
                resp = self.llm.create_chat_completion(
                    messages=messages,
                    logits_processor=self._no_eos() if inp.get("ignore_eos") else None,
                    grammar=grammar,
                    **sampling,
                )
        except ValueError as exc:
            if "exceed context window" in str(exc):
                raise StepInputError(
                    f"the chat prompt does not fit model {self.name!r}: {exc}"
                ) from exc
            raise
        out = self._finish(cast(dict[str, Any], resp), control, started)
        out["message"] = {"role": "assistant", "content": out["text"]}
        call = structured.parse_call(out["text"], functions) if calling else None
        if call is not None:
            out["function_calls"] = [call]
            out["finish_reason"] = "tool_calls"
        if pieces is not None:
            pieces.finish(out["text"])
        return out

    def embed(self, inp: dict[str, Any], control: RunControl) -> dict[str, Any]:
        texts: list[str] = inp["texts"]
        for i, text in enumerate(texts):
            n = len(self.llm.tokenize(text.encode("utf-8"), add_bos=True, special=False))
            if n > self.n_ctx:
                raise StepInputError(
                    f"input.texts[{i}] is {n} tokens; model {self.name!r} embeds at most "
                    f"{self.n_ctx} tokens"
                )
        started = time.perf_counter()
        vectors, count = self.llm.embed(
            texts, normalize=bool(inp.get("normalize", True)), truncate=False, return_count=True
        )
        stop = control.check()
        if stop == "cancelled":
            raise StepCancelled("the workflow was cancelled while the step ran")
        total_ms = (time.perf_counter() - started) * 1000
        return {
            "vectors": [[float(x) for x in v] for v in vectors],
            "dim": len(vectors[0]) if vectors else 0,
            "prompt_tokens": int(count),
            "timings": {"total_ms": round(total_ms, 3)},
        }

    def _check_fits(self, n_prompt: int, max_tokens: int) -> None:
        if n_prompt + max_tokens > self.n_ctx:
            raise StepInputError(
                f"input.prompt is {n_prompt} tokens and input.max_tokens is {max_tokens}: "
                f"together {n_prompt + max_tokens}, over the {self.n_ctx}-token context of "
                f"model {self.name!r}"
            )

    def close(self) -> None:
        self.llm.close()


@dataclass(frozen=True)
class ChatPlan:
    """What a chat step sends to the model: its messages (with the functions' prompt when
    the model may call one), the grammar its reply is generated under (None: free text),
    and the functions whose call is read back from the reply."""

    messages: list[dict[str, Any]]
    grammar: str | None
    functions: list[structured.FunctionDef]
    calling: bool

    @classmethod
    def of(cls, inp: dict[str, Any]) -> ChatPlan:
        """The plan of a chat step's validated input: ``inp["grammar"]`` when given (the
        caller's own, or None), else a call's grammar, else ``response_format``'s."""
        messages = structured.template_messages(inp["messages"])
        functions = [structured.FunctionDef.model_validate(f) for f in inp.get("functions") or []]
        choice = str(inp.get("function_call") or "auto")
        calling = bool(functions) and choice != "none"
        if "grammar" in inp:  # the caller's own (memory tool calls), or None: free text
            gbnf = inp["grammar"]
        elif calling:
            gbnf = structured.call_grammar(functions, choice)
            messages = _with_system(messages, structured.function_prompt(functions, choice))
        else:
            fmt = inp.get("response_format")
            gbnf = structured.response_grammar(
                structured.ResponseFormat.model_validate(fmt) if fmt else None
            )
        return cls(messages, gbnf or None, functions, calling)


def _with_system(messages: list[dict[str, Any]], section: str) -> list[dict[str, Any]]:
    """``messages`` with ``section`` added to the system message (one is put first if none)."""
    if messages and messages[0]["role"] == "system":
        first = messages[0]
        return [{**first, "content": f"{first['content']}\n\n{section}"}, *messages[1:]]
    return [{"role": "system", "content": section}, *messages]
