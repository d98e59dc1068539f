"""The OpenAI-compatible API through OpenAI's own SDK (and LangChain's client), against a
running Corral: a real API process and real worker pools.

The chat model is smollm2-135m when corral[demo] is installed, tiny-chat otherwise; one
platform for the module, on SQLite and its own Redis database.
"""

from __future__ import annotations

import asyncio
import base64
import json
import struct
import time
from collections.abc import Iterator
from typing import Any

import httpx
import jsonschema_rs
import openai
import pytest
from openai import AsyncOpenAI, OpenAI

from app.core.config import Settings, use_settings
from models.catalog import load_catalog
from models.pull import packaged_file
from tests.utils.databases import with_database
from tests.utils.platform import Platform, module_settings, start_platform

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

REDIS_DB = "10"
REAL = "smollm2-135m"
CATALOG = load_catalog()
CHAT = REAL if packaged_file(CATALOG.get(REAL)) is not None else "tiny-chat"
EMBED = "tiny-embed"
ASK = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]


@pytest.fixture(scope="module")
def oai_settings(
    redis_base_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Settings]:
    root = tmp_path_factory.mktemp("openai")
    pulled = [REAL] if CHAT == REAL else []
    with use_settings(module_settings(root, with_database(redis_base_url, REDIS_DB), pulled)) as s:
        yield s


@pytest.fixture(scope="module")
def corral(oai_settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Platform]:
    plat = start_platform(oai_settings, tmp_path_factory.mktemp("openai-logs"), {CHAT: 1, EMBED: 1})
    try:
        yield plat
    finally:
        plat.stop()


@pytest.fixture(scope="module")
def client(corral: Platform) -> Iterator[OpenAI]:
    with OpenAI(base_url=f"{corral.url}/v1", api_key=corral.key, max_retries=0) as c:
        yield c


def workflow(corral: Platform, completion_id: str) -> dict[str, Any]:
    """The workflow behind an OpenAI id (chatcmpl-<workflow id>)."""
    workflow_id = completion_id.split("-", 1)[1]
    return corral.wait(workflow_id)


def wait_status(corral: Platform, workflow_id: str, status: str, timeout_s: float = 30) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        run: dict[str, Any] = corral.client.get(f"/v1/workflows/{workflow_id}").json()
        if run["status"] == status or time.monotonic() > deadline:
            return run
        time.sleep(0.1)


def test_models_list_and_retrieve(client: OpenAI) -> None:
    listed = {m.id: m for m in client.models.list()}
    assert set(listed) == {e.name for e in CATALOG.entries}
    assert all(m.object == "model" and m.owned_by == "corral" for m in listed.values())
    assert listed[CHAT].created > 0  # its file is here
    assert client.models.retrieve(CHAT).id == CHAT
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")


def test_chat_sync_and_async_run_as_workflows(client: OpenAI, corral: Platform) -> None:
    answer = client.chat.completions.create(model=CHAT, messages=ASK, max_tokens=24, temperature=0)
    assert answer.object == "chat.completion" and answer.model == CHAT
    choice = answer.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    if CHAT == REAL:
        assert "Paris" in choice.message.content
    assert answer.usage is not None and answer.usage.prompt_tokens > 0
    # The request was a one-step workflow, listed and readable like any other.
    run = workflow(corral, answer.id)
    assert run["name"] == "chat.completions" and run["status"] == "succeeded"
    (step,) = run["steps"]
    assert step["model"] == CHAT and step["output"]["text"] == choice.message.content
    assert step["output"]["completion_tokens"] == answer.usage.completion_tokens
    listed = corral.client.get("/v1/workflows", params={"limit": 50}).json()["items"]
    assert run["id"] in {w["id"] for w in listed}

    async def ask_async() -> str | None:
        async with AsyncOpenAI(base_url=f"{corral.url}/v1", api_key=corral.key) as aclient:
            got = await aclient.chat.completions.create(
                model=CHAT, messages=ASK, max_tokens=24, temperature=0
            )
            return got.choices[0].message.content

    assert asyncio.run(ask_async()) == choice.message.content


def test_streamed_chunks_join_to_the_unstreamed_answer(client: OpenAI) -> None:
    kwargs: dict[str, Any] = {"model": CHAT, "messages": ASK, "max_tokens": 48, "temperature": 0}
    whole = client.chat.completions.create(**kwargs)
    chunks = list(
        client.chat.completions.create(
            **kwargs, stream=True, stream_options={"include_usage": True}
        )
    )
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    pieces = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) > 1  # token by token, not the answer at the end
    finish = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert finish == [whole.choices[0].finish_reason]
    # Usage in the last chunk only (which has no choices), equal to the unstreamed one.
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    assert all(c.usage is None for c in chunks[:-1])


def test_the_first_token_arrives_while_the_model_generates(
    client: OpenAI, corral: Platform
) -> None:
    stream = client.chat.completions.create(
        model=CHAT,
        messages=ASK,
        max_tokens=400,
        temperature=0,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    with stream:
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                break
        run = corral.client.get(f"/v1/workflows/{chunk.id.split('-', 1)[1]}").json()
        assert run["steps"][0]["status"] == "running"  # the rest is still being decoded
        rest = [c for c in stream if c.choices and c.choices[0].finish_reason]
    assert rest[0].choices[0].finish_reason == "length"


def test_completions_whole_and_streamed(client: OpenAI) -> None:
    whole = client.completions.create(
        model=CHAT, prompt="The capital of France is", max_tokens=16, temperature=0
    )
    assert whole.object == "text_completion" and whole.choices[0].text
    assert whole.usage is not None and whole.usage.completion_tokens > 0
    streamed = client.completions.create(
        model=CHAT, prompt="The capital of France is", max_tokens=16, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed if c.choices) == whole.choices[0].text


def test_embeddings_as_floats_and_base64(client: OpenAI) -> None:
    one = client.embeddings.create(model=EMBED, input="a red apple")
    many = client.embeddings.create(model=EMBED, input=["a red apple", "a green pear"])
    assert [d.index for d in many.data] == [0, 1]
    assert many.data[0].embedding == pytest.approx(one.data[0].embedding, abs=1e-6)
    assert many.usage.prompt_tokens > one.usage.prompt_tokens > 0
    raw = httpx.post(
        f"{client.base_url}embeddings",
        json={"model": EMBED, "input": "a red apple", "encoding_format": "base64"},
        headers={"Authorization": f"Bearer {client.api_key}"},
    ).json()
    packed = base64.b64decode(raw["data"][0]["embedding"])
    floats = struct.unpack(f"<{len(packed) // 4}f", packed)
    assert list(floats) == pytest.approx(one.data[0].embedding, abs=1e-6)
    with pytest.raises(openai.BadRequestError) as refused:
        client.embeddings.create(model=EMBED, input="x", dimensions=8)
    assert refused.value.body["param"] == "dimensions"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as wrong_kind:
        client.embeddings.create(model=CHAT, input="x")
    assert wrong_kind.value.body["param"] == "model"  # type: ignore[index]


CITY = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 24},
        "country": {"type": "string", "enum": ["France", "Italy", "Spain"]},
        "population_millions": {"type": "integer"},
        "landmarks": {"type": "array", "items": {"type": "string", "maxLength": 24}, "maxItems": 3},
    },
    "required": ["city", "country", "population_millions", "landmarks"],
    "additionalProperties": False,
}


def check_city(text: str | None) -> None:
    value = json.loads(text or "")
    jsonschema_rs.validate(CITY, value)  # raises, saying why, if it does not validate
    assert value["country"] in ("France", "Italy", "Spain")


def test_a_json_schema_answer_parses_and_validates(client: OpenAI) -> None:
    answer = client.chat.completions.create(
        model=CHAT,
        messages=[{"role": "user", "content": "Describe the capital of France as JSON."}],
        max_tokens=96,
        temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": CITY}},
    )
    assert answer.choices[0].finish_reason == "stop"
    check_city(answer.choices[0].message.content)
    obj = client.chat.completions.create(
        model=CHAT,
        messages=[{"role": "user", "content": "Reply with a JSON object."}],
        max_tokens=96,
        temperature=0,
        response_format={"type": "json_object"},
    )
    if obj.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(obj.choices[0].message.content or ""), dict)
    # A keyword the grammar cannot enforce is refused, naming where it is.
    bounded = json.loads(json.dumps(CITY))
    bounded["properties"]["population_millions"]["maximum"] = 99
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(
            model=CHAT,
            messages=ASK,
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "c", "schema": bounded},
            },
        )
    assert refused.value.body["param"] == (  # type: ignore[index]
        "response_format.json_schema.schema.properties.population_millions.maximum"
    )


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 24},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}},
}


def check_weather_call(call: Any) -> dict[str, Any]:
    assert call.type == "function" and call.function.name == "get_weather" and call.id
    args: dict[str, Any] = json.loads(call.function.arguments)
    assert set(args) == {"city", "unit"} and args["unit"] in ("celsius", "fahrenheit")
    assert isinstance(args["city"], str) and len(args["city"]) <= 24
    return args


def test_a_forced_tool_call_has_valid_arguments(client: OpenAI) -> None:
    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
    for choice in ("required", {"type": "function", "function": {"name": "get_weather"}}):
        answer = client.chat.completions.create(
            model=CHAT,
            messages=ask,
            max_tokens=96,
            temperature=0,
            tools=[WEATHER, TIME],
            tool_choice=choice,  # type: ignore[arg-type]
        )
        done = answer.choices[0]
        assert done.finish_reason == "tool_calls" and done.message.content is None
        (call,) = done.message.tool_calls or []
        if choice != "required":
            check_weather_call(call)
    # The call and its result go back; the model answers in text.
    call = (answer.choices[0].message.tool_calls or [])[0]
    follow_up = client.chat.completions.create(
        model=CHAT,
        messages=[
            *ask,
            answer.choices[0].message.model_dump(exclude_none=True),  # type: ignore[list-item]
            {"role": "tool", "tool_call_id": call.id, "content": '{"temp_c": 21, "sky": "clear"}'},
        ],
        max_tokens=32,
        temperature=0,
        tools=[WEATHER],
        tool_choice="none",
    )
    assert follow_up.choices[0].message.content and not follow_up.choices[0].message.tool_calls
    # Streamed, the call comes as one tool_calls delta, then finish_reason tool_calls.
    chunks = list(
        client.chat.completions.create(
            model=CHAT,
            messages=ask,
            max_tokens=96,
            temperature=0,
            tools=[WEATHER],
            tool_choice="required",
            stream=True,
        )
    )
    deltas = [
        c.choices[0].delta.tool_calls for c in chunks if c.choices and c.choices[0].delta.tool_calls
    ]
    assert len(deltas) == 1
    check_weather_call(deltas[0][0])  # type: ignore[index]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_errors_take_openais_shape(client: OpenAI, corral: Platform) -> None:
    bad = OpenAI(base_url=f"{corral.url}/v1", api_key="wrong", max_retries=0)
    with bad, pytest.raises(openai.AuthenticationError):
        bad.models.list()
    with pytest.raises(openai.NotFoundError) as unknown:
        client.chat.completions.create(model="no-such-model", messages=ASK)
    assert unknown.value.body["code"] == "model_not_found"  # type: ignore[index]
    assert unknown.value.body["param"] == "model"  # type: ignore[index]
    cases: list[tuple[dict[str, Any], str]] = [
        ({"temperature": 5}, "temperature"),
        ({"n": 2}, "n"),
        ({"extra_body": {"not_a_field": 1}}, "not_a_field"),
        ({"messages": [{"role": "user"}]}, "messages[0]"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"seed": -1}, "seed"),
    ]
    for extra, param in cases:
        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.create(**{"model": CHAT, "messages": ASK, **extra})
        body = refused.value.body
        assert isinstance(body, dict) and body["param"] == param, (extra, body)
        assert body["type"] == "invalid_request_error" and body["message"]
    n_ctx = CATALOG.get(CHAT).n_ctx
    with pytest.raises(openai.BadRequestError) as too_long:
        client.chat.completions.create(
            model=CHAT, messages=[{"role": "user", "content": " Paris" * n_ctx}]
        )
    assert too_long.value.body["code"] == "context_length_exceeded"  # type: ignore[index]
    big = {"model": CHAT, "messages": [{"role": "user", "content": "x" * 2_000_000}]}
    with pytest.raises(openai.APIStatusError) as huge:
        client.chat.completions.create(**big)  # type: ignore[call-overload]
    assert huge.value.status_code == 413


def test_a_client_that_disconnects_mid_stream_cancels_its_step(corral: Platform) -> None:
    body = {
        "model": CHAT,
        "messages": ASK,
        "max_tokens": 400,
        "stream": True,
        "ignore_eos": True,
    }
    http = httpx.Client(base_url=corral.url, headers=corral.client.headers, timeout=30)
    with http, http.stream("POST", "/v1/chat/completions", json=body) as resp:
        workflow_id = resp.headers["X-Corral-Workflow-Id"]
        for line in resp.iter_lines():
            if '"content":"' in line.replace(" ", "") and '"content":""' not in line:
                break  # the first token: now hang up
    run = wait_status(corral, workflow_id, "cancelled")
    assert run["status"] == "cancelled", run
    step = run["steps"][0]
    assert step["status"] == "cancelled" and (step["output"] or {}).get("text") is None
    # The same without streaming: the client gives up waiting.
    impatient = httpx.Client(base_url=corral.url, headers=corral.client.headers, timeout=0.5)
    with impatient, pytest.raises(httpx.ReadTimeout):
        impatient.post("/v1/chat/completions", json={**body, "stream": False})
    latest = corral.client.get("/v1/workflows", params={"limit": 1}).json()["items"][0]
    assert wait_status(corral, latest["id"], "cancelled")["status"] == "cancelled"


def test_conversation_memory_through_extra_body(client: OpenAI, corral: Platform) -> None:
    conv = corral.client.post("/v1/conversations", json={"user_id": "oai-user"}).json()
    for content in ("My name is Ada.", "What is my name?"):
        answer = client.chat.completions.create(
            model=CHAT,
            messages=[{"role": "user", "content": content}],
            max_tokens=16,
            temperature=0,
            extra_body={"conversation_id": conv["id"]},
        )
        assert answer.choices[0].message.content
    history = corral.client.get(f"/v1/conversations/{conv['id']}/messages").json()["items"]
    assert [m["role"] for m in history] == ["user", "assistant", "user", "assistant"]
    assert [m["content"] for m in history[::2]] == ["My name is Ada.", "What is my name?"]
    assert history[3]["content"] == answer.choices[0].message.content


def test_workflow_events_stream_status_and_deltas(corral: Platform) -> None:
    spec = {
        "name": "events",
        "steps": [
            {"id": "draft", "kind": "generate", "model": CHAT,
             "input": {"prompt": "Once upon a time", "max_tokens": 24, "temperature": 0}},
            {"id": "reply", "kind": "chat", "model": CHAT, "depends_on": ["draft"],
             "input": {"messages": [{"role": "user", "content": "{{ steps.draft.output.text }}"}],
                       "max_tokens": 16, "temperature": 0}},
        ],
    }  # fmt: skip
    workflow_id = corral.submit(spec).json()["id"]

    def read_events() -> list[tuple[str, dict[str, Any]]]:
        got = []
        with corral.client.stream("GET", f"/v1/workflows/{workflow_id}/events") as resp:
            assert resp.headers["content-type"].startswith("text/event-stream")
            name = ""
            for line in resp.iter_lines():
                if line.startswith("event: "):
                    name = line[7:]
                elif line.startswith("data: "):
                    got.append((name, json.loads(line[6:])))
        return got

    live = read_events()
    run = corral.wait(workflow_id)
    assert live[-1] == ("workflow", {"id": workflow_id, "status": "succeeded", "error": None})
    for step in run["steps"]:
        states = [d["status"] for n, d in live if n == "step" and d["step_id"] == step["id"]]
        assert states[-1] == "succeeded" and len(set(states)) == len(states)
        text = "".join(d["text"] for n, d in live if n == "delta" and d["step_id"] == step["id"])
        assert text == step["output"]["text"]
    # A reader that comes after the end gets every delta all the same.
    late = read_events()
    assert [e for e in late if e[0] == "delta"] == [e for e in live if e[0] == "delta"]


def test_langchain_chat_openai(corral: Platform) -> None:
    langchain_openai = pytest.importorskip("langchain_openai")
    llm = langchain_openai.ChatOpenAI(
        model=CHAT, base_url=f"{corral.url}/v1", api_key=corral.key, temperature=0, max_tokens=24
    )
    reply = llm.invoke("What is the capital of France? Answer in one sentence.")
    assert isinstance(reply.content, str) and reply.content
    if CHAT == REAL:
        assert "Paris" in reply.content
