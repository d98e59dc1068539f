"""The llama.cpp runtime on the tiny models: outputs, determinism, limits, stopping."""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from app.core.errors import ModelFileError, StepCancelled, StepInputError, StepTimeout
from app.workflows.spec import ChatInput, EmbedInput, GenerateInput
from models.catalog import load_catalog
from workers.runtime import LlamaCppRuntime, RunControl

CATALOG = load_catalog()


@pytest.fixture(scope="module")
def chat(models_dir: Path) -> Iterator[LlamaCppRuntime]:
    rt = LlamaCppRuntime(CATALOG.get("tiny-chat"), models_dir / "tiny-chat.gguf")
    yield rt
    rt.close()


@pytest.fixture(scope="module")
def embedder(models_dir: Path) -> Iterator[LlamaCppRuntime]:
    rt = LlamaCppRuntime(CATALOG.get("tiny-embed"), models_dir / "tiny-embed.gguf")
    yield rt
    rt.close()


def params(**kw: object) -> dict[str, object]:
    return GenerateInput.model_validate({"prompt": "Once upon a time", **kw}).model_dump()


def test_generate_is_deterministic_and_reports_usage(chat: LlamaCppRuntime) -> None:
    first = chat.generate(params(max_tokens=12, temperature=0.7, seed=42), RunControl())
    again = chat.generate(params(max_tokens=12, temperature=0.7, seed=42), RunControl())
    assert first["text"] == again["text"]
    assert first["text"].strip()
    assert first["completion_tokens"] == 12
    assert first["finish_reason"] == "length"
    assert first["prompt_tokens"] == len(chat.llm.tokenize(b"Once upon a time"))
    t = first["timings"]
    assert t["total_ms"] >= t["prompt_ms"] >= 0
    assert t["tokens_per_s"] > 0


def test_chat_uses_the_template(chat: LlamaCppRuntime) -> None:
    inp = ChatInput.model_validate(
        {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 6, "temperature": 0}
    ).model_dump()
    out = chat.chat(inp, RunControl())
    assert out["message"] == {"role": "assistant", "content": out["text"]}
    # The template wraps the message: the prompt is longer than the bare content.
    assert out["prompt_tokens"] > chat.count_tokens("Hello") + 2


def test_ignore_eos_runs_to_max_tokens(chat: LlamaCppRuntime) -> None:
    out = chat.generate(
        params(max_tokens=600, temperature=1.0, seed=3, ignore_eos=True), RunControl()
    )
    assert out["completion_tokens"] == 600
    assert out["finish_reason"] == "length"


def test_timeout_stops_the_model(chat: LlamaCppRuntime) -> None:
    control = RunControl(deadline=time.monotonic() + 0.05, timeout_s=0.05)
    started = time.monotonic()
    with pytest.raises(StepTimeout, match=r"timeout_s of 0\.05"):
        chat.generate(params(max_tokens=7000, ignore_eos=True), control)
    assert control.tokens < 7000
    assert time.monotonic() - started < 5


def cancelled_after(polls: int) -> Callable[[], bool]:
    """A cancel probe that says yes once it has been asked more than ``polls`` times."""
    calls = {"n": 0}

    def cancelled() -> bool:
        calls["n"] += 1
        return calls["n"] > polls

    return cancelled


def test_cancel_stops_the_model(chat: LlamaCppRuntime) -> None:
    control = RunControl(should_cancel=cancelled_after(3), poll_s=0.0)
    with pytest.raises(StepCancelled, match="stopped the model after"):
        chat.generate(params(max_tokens=7000, ignore_eos=True), control)
    assert control.tokens <= 5


def chat_params(**kw: object) -> dict[str, object]:
    messages = [{"role": "user", "content": "Tell me a story"}]
    return ChatInput.model_validate({"messages": messages, **kw}).model_dump()


def test_cancel_stops_a_chat(chat: LlamaCppRuntime) -> None:
    # The chat handler builds its own stopping criteria; the step's must join them.
    control = RunControl(should_cancel=cancelled_after(3), poll_s=0.0)
    with pytest.raises(StepCancelled, match="stopped the model after"):
        chat.chat(chat_params(max_tokens=7000, ignore_eos=True), control)
    assert control.tokens <= 5
    # The criterion is the call's only: the next chat runs to its end.
    out = chat.chat(chat_params(max_tokens=20, ignore_eos=True), RunControl())
    assert out["completion_tokens"] == 20


def test_timeout_stops_a_chat(chat: LlamaCppRuntime) -> None:
    control = RunControl(deadline=time.monotonic() + 0.05, timeout_s=0.05)
    with pytest.raises(StepTimeout):
        chat.chat(chat_params(max_tokens=7000, ignore_eos=True), control)
    assert 0 < control.tokens < 7000


def test_generate_matches_llama_cpp_direct(chat: LlamaCppRuntime) -> None:
    # Stopping checks and timing ride along without changing what the model samples.
    kw = {"max_tokens": 24, "temperature": 0.8, "top_p": 0.9, "top_k": 20, "seed": 7}
    ours = chat.generate(params(**kw), RunControl())
    direct = chat.llm.create_completion(
        "Once upon a time", **kw, repeat_penalty=params()["repeat_penalty"]
    )
    assert ours["text"] == direct["choices"][0]["text"]
    assert ours["completion_tokens"] == direct["usage"]["completion_tokens"] == 24


def test_prompt_over_context_is_an_input_error(chat: LlamaCppRuntime) -> None:
    with pytest.raises(StepInputError, match="8192-token context"):
        chat.generate(params(prompt="hello world " * 5000, max_tokens=10), RunControl())


def test_embed_vectors(embedder: LlamaCppRuntime) -> None:
    inp = EmbedInput.model_validate({"texts": ["red apple", "blue sky", "red apple"]}).model_dump()
    out = embedder.embed(inp, RunControl())
    a, b, c = out["vectors"]
    assert out["dim"] == len(a) > 0
    assert a == c
    assert a != b
    assert abs(sum(x * x for x in a) - 1.0) < 1e-3  # normalized
    with pytest.raises(StepInputError, match="embeds at most 512 tokens"):
        embedder.embed({"texts": ["word " * 2000], "normalize": True}, RunControl())


def test_corrupt_file_is_a_model_file_error(tmp_path: Path) -> None:
    bad = tmp_path / "tiny-chat.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 64)
    with pytest.raises(ModelFileError, match=r"llama\.cpp could not load"):
        LlamaCppRuntime(CATALOG.get("tiny-chat"), bad)


def test_detokenize_of_a_growing_list_matches_the_whole_conversion(
    chat: LlamaCppRuntime,
) -> None:
    """The runtime converts only the tokens added since its last call; every answer must
    be what llama-cpp-python's own detokenize gives for the whole list."""
    from llama_cpp import Llama

    llm = chat.llm
    rng = random.Random(5)
    bos = int(llm.token_bos())

    def some(n: int) -> list[int]:
        return [rng.randrange(llm.n_vocab()) for _ in range(n)]

    sequences = {
        "any tokens": some(300),
        "starts with BOS (the space after it drops)": [bos, *some(40)],
        "BOS arrives on the way": [*some(20), bos, *some(20)],
    }
    for special in (False, True):
        for name, sequence in sequences.items():
            grown: list[int] = []
            while len(grown) < len(sequence):  # grown by one to three tokens at a time
                grown += sequence[len(grown) : len(grown) + rng.randint(1, 3)]
                got = llm.detokenize(grown, prev_tokens=[1, 2], special=special)
                assert got == Llama.detokenize(llm, grown, special=special), (name, len(grown))
            # A list changed in place (not grown) is converted whole again.
            grown[len(grown) // 2] = (grown[len(grown) // 2] + 1) % llm.n_vocab()
            assert llm.detokenize(grown, special=special) == Llama.detokenize(
                llm, grown, special=special
            )
            # And so is a shorter list, or another one.
            assert llm.detokenize(grown[:5], special=special) == Llama.detokenize(
                llm, grown[:5], special=special
            )


def test_a_long_completion_is_what_llama_cpp_python_gives(chat: LlamaCppRuntime) -> None:
    """600 tokens with the runtime's incremental detokenization against a plain ``Llama``
    on the same file and parameters: the same text, token for token (and a stop string
    found in the middle of the text cuts both at the same place)."""
    from llama_cpp import Llama

    plain = Llama(model_path=chat.llm.model_path, n_ctx=2048, n_batch=512, seed=0, verbose=False)
    try:
        kw = {"max_tokens": 600, "temperature": 0.9, "seed": 3, "logits_processor": None}
        ours = chat.llm.create_completion("Tell a long story", **kw)
        theirs = plain.create_completion("Tell a long story", **kw)
        text = theirs["choices"][0]["text"]
        assert ours["choices"][0]["text"] == text
        assert ours["usage"] == theirs["usage"]
        stop = text[len(text) // 2 : len(text) // 2 + 3]
        assert stop.strip()
        cut = [
            llm.create_completion("Tell a long story", **kw, stop=[stop])["choices"][0]["text"]
            for llm in (chat.llm, plain)
        ]
        assert cut[0] == cut[1] == text[: text.index(stop)]
    finally:
        plain.close()
