"""End to end: HTTP → Redis → real `corral worker` processes → llama.cpp (tiny model) → DB.

Runs once per database backend (SQLite, and PostgreSQL when CORRAL_TEST_DATABASE_URL is set).
"""

from __future__ import annotations

import time
from datetime import datetime
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from app.scheduler import live
from tests.utils.platform import Platform

pytestmark = pytest.mark.e2e


def gen(step_id: str, prompt: str, **extra: Any) -> dict[str, Any]:
    """A deterministic generate step on tiny-chat."""
    inp = {"prompt": prompt, "max_tokens": 8, "temperature": 0, "seed": 1}
    inp.update(extra.pop("input", {}))
    return {"id": step_id, "kind": "generate", "model": "tiny-chat", "input": inp, **extra}


def steps_by_id(run: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {s["id"]: s for s in run["steps"]}


def ts(value: str) -> datetime:
    return datetime.fromisoformat(value)


def scrape(platform: Platform) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """The API's /metrics (no key needed), each sample by (name, labels)."""
    with httpx.Client(base_url=platform.url) as anon:
        text = anon.get("/metrics").text
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_three_step_chain(platform: Platform) -> None:
    run = platform.run(
        {
            "name": "chain",
            "steps": [
                gen("a", "The first step says"),
                gen("b", "Echo: {{ steps.a.output.text }}", depends_on=["a"]),
                {
                    "id": "c",
                    "kind": "chat",
                    "model": "tiny-chat",
                    "depends_on": ["b"],
                    "input": {
                        "messages": [{"role": "user", "content": "{{ steps.b.output.text }}"}],
                        "max_tokens": 8,
                        "temperature": 0,
                    },
                },
            ],
        }
    )
    assert run["status"] == "succeeded", run
    s = steps_by_id(run)
    for sid in "abc":
        out = s[sid]["output"]
        assert s[sid]["status"] == "succeeded"
        assert s[sid]["attempts"] == 1
        assert out["completion_tokens"] > 0
        assert out["finish_reason"] in ("length", "stop")
        assert out["timings"]["total_ms"] > 0
        assert "queue_ms" in out["timings"]
    assert ts(s["b"]["started_at"]) >= ts(s["a"]["finished_at"])
    assert ts(s["c"]["started_at"]) >= ts(s["b"]["finished_at"])
    # b's prompt really was rendered from a's output: its token count is that of "Echo: " + text.
    from llama_cpp import Llama

    vocab = Llama(
        model_path=str(platform.settings.models_path / "tiny-chat.gguf"),
        vocab_only=True,
        verbose=False,
    )
    rendered = "Echo: " + s["a"]["output"]["text"]
    assert s["b"]["output"]["prompt_tokens"] == len(vocab.tokenize(rendered.encode()))
    vocab.close()


def test_parallel_branches_join(platform: Platform) -> None:
    run = platform.run(
        {
            "name": "diamond",
            "steps": [
                gen("root", "Start"),
                gen("left", "Left {{ steps.root.output.text }}", depends_on=["root"]),
                gen("right", "Right {{ steps.root.output.text }}", depends_on=["root"]),
                gen(
                    "join",
                    "L={{ steps.left.output.text }} R={{ steps.right.output.text }}",
                    depends_on=["left", "right"],
                ),
            ],
        }
    )
    assert run["status"] == "succeeded", run
    s = steps_by_id(run)
    assert s["join"]["attempts"] == 1
    assert ts(s["join"]["started_at"]) >= max(
        ts(s["left"]["finished_at"]), ts(s["right"]["finished_at"])
    )
    assert ts(s["left"]["started_at"]) >= ts(s["root"]["finished_at"])


def test_condition_skips_a_branch(platform: Platform) -> None:
    run = platform.run(
        {
            "name": "branching",
            "steps": [
                gen("score", "Rate this from 0 to 100:"),
                # The tiny model does not answer with a number: | int gives 0.
                gen(
                    "high",
                    "Great!",
                    depends_on=["score"],
                    when="steps.score.output.text | int > 50",
                ),
                gen("high_followup", "More {{ steps.high.output.text }}", depends_on=["high"]),
                gen(
                    "low",
                    "Try again",
                    depends_on=["score"],
                    when="steps.score.output.text | int <= 50",
                ),
                gen(
                    "report",
                    "high={{ steps.high.status }} low={{ steps.low.output.text }}",
                    depends_on=["high_followup", "low"],
                ),
            ],
        }
    )
    assert run["status"] == "succeeded", run
    s = steps_by_id(run)
    assert s["high"]["status"] == "skipped"
    assert "condition" in s["high"]["error"]
    assert s["high_followup"]["status"] == "skipped"
    assert s["low"]["status"] == "succeeded"
    assert s["report"]["status"] == "succeeded"
    assert s["high"]["attempts"] == 0 and s["high"]["output"] is None


def test_step_fails_once_then_succeeds_on_retry(platform: Platform) -> None:
    run = platform.run(
        {
            "name": "retry",
            "steps": [
                gen(
                    "flaky",
                    "Hello",
                    retry={"max_attempts": 3, "backoff_s": 0.2, "max_backoff_s": 1},
                ),
                gen("after", "{{ steps.flaky.output.text }}", depends_on=["flaky"]),
            ],
        }
    )
    assert run["status"] == "succeeded", run
    s = steps_by_id(run)
    assert s["flaky"]["status"] == "succeeded"
    assert s["flaky"]["attempts"] == 2
    assert s["flaky"]["output"]["attempt"] == 2
    assert s["after"]["status"] == "succeeded"


def test_step_that_fails_for_good(platform: Platform) -> None:
    run = platform.run(
        {
            "name": "doomed",
            "steps": [
                gen(
                    "doomed",
                    "Hello",
                    retry={"max_attempts": 2, "backoff_s": 0.1, "max_backoff_s": 0.2},
                ),
                gen("after", "{{ steps.doomed.output.text }}", depends_on=["doomed"]),
                gen("after_after", "x {{ steps.after.output.text }}", depends_on=["after"]),
            ],
        }
    )
    assert run["status"] == "failed", run
    assert "doomed" in run["error"]
    s = steps_by_id(run)
    assert s["doomed"]["status"] == "failed"
    assert s["doomed"]["attempts"] == 2
    assert "injected fault" in s["doomed"]["error"]
    assert s["after"]["status"] == "cancelled"
    assert s["after_after"]["status"] == "cancelled"
    assert s["after"]["attempts"] == 0


def test_step_timeout_is_a_real_failure(platform: Platform) -> None:
    run = platform.run(
        {
            "name": "timeout",
            "steps": [
                gen(
                    "slow",
                    "Go on forever",
                    timeout_s=0.05,
                    input={"max_tokens": 6000, "ignore_eos": True},
                )
            ],
        }
    )
    assert run["status"] == "failed"
    step = run["steps"][0]
    assert step["status"] == "failed"
    assert "timeout_s of 0.05" in step["error"]


def test_cancel_a_running_workflow(platform: Platform) -> None:
    resp = platform.submit(
        {
            "name": "long",
            "steps": [
                gen("long", "Tell a long story", input={"max_tokens": 8000, "ignore_eos": True}),
                gen("next", "{{ steps.long.output.text }}", depends_on=["long"]),
            ],
        }
    )
    assert resp.status_code == 202
    wid = resp.json()["id"]
    deadline = time.monotonic() + 30
    while (
        steps_by_id(platform.client.get(f"/v1/workflows/{wid}").json())["long"]["status"]
        != "running"
    ):
        assert time.monotonic() < deadline, "the long step never started"
        time.sleep(0.02)
    cancelled = platform.client.post(f"/v1/workflows/{wid}/cancel")
    assert cancelled.status_code == 200, cancelled.text
    assert cancelled.json()["status"] == "cancelled"
    # A second cancel is a conflict, not a change.
    assert platform.client.post(f"/v1/workflows/{wid}/cancel").status_code == 409
    # The worker notices, stops llama.cpp early and records how far it got.
    deadline = time.monotonic() + 30
    while True:
        run = platform.client.get(f"/v1/workflows/{wid}").json()
        s = steps_by_id(run)
        if "stopped the model after" in (s["long"]["error"] or ""):
            break
        assert time.monotonic() < deadline, run
        time.sleep(0.05)
    assert run["status"] == "cancelled"
    assert s["long"]["status"] == "cancelled"
    assert s["long"]["output"] is None
    stopped_after = int(s["long"]["error"].split("after ")[1].split(" ")[0])
    assert stopped_after < 8000
    assert s["next"]["status"] == "cancelled"
    assert s["next"]["attempts"] == 0


def test_idempotent_resubmit(platform: Platform) -> None:
    spec = {"name": "idem", "steps": [gen("only", "Once")]}
    first = platform.submit(spec, **{"Idempotency-Key": "idem-test-1"})
    second = platform.submit(spec, **{"Idempotency-Key": "idem-test-1"})
    assert first.status_code == second.status_code == 202
    assert first.json()["id"] == second.json()["id"]
    assert second.headers.get("Idempotent-Replayed") == "true"
    other = platform.submit({**spec, "name": "different"}, **{"Idempotency-Key": "idem-test-1"})
    assert other.status_code == 409
    assert "Idempotency-Key" in other.json()["detail"]
    run = platform.wait(first.json()["id"])
    assert run["status"] == "succeeded"
    assert run["steps"][0]["attempts"] == 1
    page = platform.client.get("/v1/workflows", params={"limit": 200}).json()
    assert sum(1 for w in page["items"] if w["name"] == "idem") == 1


def test_list_filters_and_pages(platform: Platform) -> None:
    ids = [
        platform.submit({"name": f"page{i}", "steps": [gen("s", "Hi")]}).json()["id"]
        for i in range(3)
    ]
    for wid in ids:
        platform.wait(wid)
    seen: list[str] = []
    cursor = None
    while True:
        params: dict[str, Any] = {"limit": 2, "status": "succeeded"}
        if cursor:
            params["cursor"] = cursor
        page = platform.client.get("/v1/workflows", params=params).json()
        seen += [w["id"] for w in page["items"]]
        assert all(w["status"] == "succeeded" for w in page["items"])
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert len(seen) == len(set(seen))
    assert set(ids) <= set(seen)
    assert platform.client.get("/v1/workflows", params={"status": "bogus"}).status_code == 422
    assert platform.client.get("/v1/workflows", params={"cursor": "!!"}).status_code == 422


def test_models_health_and_docs(platform: Platform) -> None:
    models = {m["name"]: m for m in platform.client.get("/v1/catalog").json()}
    assert models["tiny-chat"]["present"] and models["tiny-chat"]["workers"] >= 2
    assert models["tiny-embed"]["queue"] == "model.tiny-embed"
    assert models["qwen2.5-7b"]["present"] is False
    assert platform.client.get("/healthz").json() == {"status": "ok"}
    ready = platform.client.get("/readyz").json()
    assert ready["checks"] == {"redis": "ok", "database": "ok"}
    schema = platform.client.get("/openapi.json").json()
    assert "/v1/workflows" in schema["paths"]
    assert platform.client.get("/docs").status_code == 200
    samples = scrape(platform)
    assert samples["corral_workers", frozenset({("model", "tiny-chat")})] == 2
    assert samples["corral_workflows", frozenset({("status", "succeeded")})] >= 1
    assert samples["corral_queue_length", frozenset({("model", "tiny-embed")})] == 0


def test_long_running_processes_freeze_their_start_up_objects(platform: Platform) -> None:
    """The API and every model pool process move what start-up made out of the garbage
    collector's way (a full collection otherwise walks it all: over 100 ms of a stalled
    event loop here); the API's collector shows in /metrics, each pool's in its heartbeat."""
    samples = scrape(platform)
    assert samples["corral_gc_frozen_objects", frozenset()] > 10_000, samples
    assert ("python_gc_collections_total", frozenset({("generation", "2")})) in samples
    pools = [w for w in live.live_workers() if w.get("model") == "tiny-chat"]
    assert len(pools) == 2
    for pool in pools:
        assert pool["gc_frozen"] > 10_000, pool  # the loaded model's objects included
