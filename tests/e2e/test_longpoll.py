"""Long-polling reads: ``GET /v1/workflows/{id}?wait_s=N`` over the real platform.

The answer comes when the workflow ends (woken by the engine's Redis notification) or when
the wait runs out; waiting requests hold no database connection.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest

from tests.utils.platform import Platform

pytestmark = pytest.mark.e2e


def long_step(step_id: str, **extra: Any) -> dict[str, Any]:
    """A generate step on tiny-chat that runs for a while (tiny-chat never stops early)."""
    return {
        "id": step_id,
        "kind": "generate",
        "model": "tiny-chat",
        "input": {"prompt": "Tell a long story", "max_tokens": 1500, "ignore_eos": True},
        **extra,
    }


def submit(platform: Platform, spec: dict[str, Any]) -> str:
    resp = platform.submit(spec)
    assert resp.status_code == 202, resp.text
    wid: str = resp.json()["id"]
    return wid


def wait_until_running(platform: Platform, wid: str, step_id: str) -> None:
    deadline = time.monotonic() + 30
    while True:
        run = platform.client.get(f"/v1/workflows/{wid}").json()
        status = {s["id"]: s["status"] for s in run["steps"]}[step_id]
        if status == "running":
            return
        assert status in ("pending", "queued"), run
        assert time.monotonic() < deadline, f"step {step_id} never started: {run}"
        time.sleep(0.02)


def test_long_poll_answers_when_the_workflow_ends(platform: Platform) -> None:
    wid = submit(platform, {"name": "longpoll", "steps": [long_step("long")]})
    wait_until_running(platform, wid, "long")
    asked_at = datetime.now(UTC)
    started = time.monotonic()
    resp = platform.client.get(f"/v1/workflows/{wid}", params={"wait_s": 25})
    elapsed = time.monotonic() - started
    assert resp.status_code == 200, resp.text
    run = resp.json()
    assert run["status"] == "succeeded", run
    # One request waited for the end: the step finished after the question was asked, and
    # the answer came long before the wait ran out.
    assert datetime.fromisoformat(run["steps"][0]["finished_at"]) > asked_at
    assert elapsed < 20


def test_long_poll_returns_the_running_state_when_the_wait_runs_out(platform: Platform) -> None:
    wid = submit(
        platform,
        {
            "name": "longpoll-timeout",
            "steps": [long_step("a"), long_step("b", depends_on=["a"])],
        },
    )
    try:
        started = time.monotonic()
        run = platform.client.get(f"/v1/workflows/{wid}", params={"wait_s": 0.3}).json()
        assert run["status"] == "running", run
        assert time.monotonic() - started >= 0.3
    finally:
        platform.client.post(f"/v1/workflows/{wid}/cancel")
    # A cancel ends the workflow: a waiting read learns it at once.
    run = platform.client.get(f"/v1/workflows/{wid}", params={"wait_s": 25}).json()
    assert run["status"] == "cancelled"


def test_waiting_reads_hold_no_database_connection(platform: Platform) -> None:
    # More waiters than the database pool has connections (5 + 10 overflow): if each held
    # one, the plain reads below would queue behind them until the waits ran out.
    wid = submit(
        platform,
        {
            "name": "longpoll-many",
            "steps": [
                long_step("a"),
                long_step("b", depends_on=["a"]),
                long_step("c", depends_on=["b"]),
            ],
        },
    )

    def wait_once(_: int) -> str:
        with httpx.Client(base_url=platform.url, headers=platform.client.headers) as client:
            resp = client.get(f"/v1/workflows/{wid}", params={"wait_s": 4}, timeout=30)
            status: str = resp.json()["status"]
            return status

    try:
        with ThreadPoolExecutor(24) as pool:
            waiting = [pool.submit(wait_once, i) for i in range(24)]
            time.sleep(0.5)
            for _ in range(5):
                plain = platform.client.get(f"/v1/workflows/{wid}", timeout=3)
                assert plain.status_code == 200
                listed = platform.client.get("/v1/workflows", params={"limit": 1}, timeout=3)
                assert listed.status_code == 200
            statuses = [f.result() for f in waiting]
        assert set(statuses) <= {"running", "succeeded"}
    finally:
        platform.client.post(f"/v1/workflows/{wid}/cancel")


def test_long_poll_checks_its_arguments(platform: Platform) -> None:
    too_long = platform.client.get("/v1/workflows/nope", params={"wait_s": 61})
    assert too_long.status_code == 422
    assert "wait_s" in too_long.text
    assert platform.client.get("/v1/workflows/nope", params={"wait_s": -1}).status_code == 422
    assert platform.client.get("/v1/workflows/nope", params={"wait_s": 1}).status_code == 404


def short_step(step_id: str, **extra: Any) -> dict[str, Any]:
    return {
        "id": step_id,
        "kind": "generate",
        "model": "tiny-chat",
        "input": {"prompt": "Say hello", "max_tokens": 8},
        **extra,
    }


def test_a_submit_with_wait_answers_with_the_final_state(platform: Platform) -> None:
    spec = {"name": "submit-wait", "steps": [short_step("a"), short_step("b", depends_on=["a"])]}
    resp = platform.client.post("/v1/workflows", json=spec, params={"wait_s": 25})
    assert resp.status_code == 200, resp.text
    run = resp.json()
    assert run["status"] == "succeeded", run
    assert [s["status"] for s in run["steps"]] == ["succeeded", "succeeded"]
    assert run["steps"][1]["output"]["completion_tokens"] == 8
    # The same state a read gives, at the URL the answer names.
    assert resp.headers["location"] == f"/v1/workflows/{run['id']}"
    assert platform.client.get(resp.headers["location"]).json() == run


def test_a_submit_whose_wait_runs_out_answers_202_with_the_running_state(
    platform: Platform,
) -> None:
    # The long step is ~0.3 s of model work alone on the tiny model (1500 tokens): a wait
    # of 0.1 s runs out well before it can end.
    started = time.monotonic()
    resp = platform.client.post(
        "/v1/workflows",
        json={"name": "submit-wait-timeout", "steps": [long_step("a")]},
        params={"wait_s": 0.1},
    )
    elapsed = time.monotonic() - started
    assert resp.status_code == 202, resp.text
    run = resp.json()
    try:
        assert run["status"] == "running", run
        assert run["steps"][0]["id"] == "a"
        assert elapsed >= 0.1
    finally:
        platform.client.post(f"/v1/workflows/{run['id']}/cancel")


def test_a_submit_with_wait_that_ends_at_once_answers_200(platform: Platform) -> None:
    # Every step skipped by its condition: the workflow ends in the submit's own commit.
    spec = {"name": "submit-wait-skip", "steps": [short_step("a", when="false")]}
    resp = platform.client.post("/v1/workflows", json=spec, params={"wait_s": 25})
    assert resp.status_code == 200, resp.text
    assert resp.json()["status"] == "succeeded"
    assert resp.json()["steps"][0]["status"] == "skipped"


def test_a_replayed_submit_with_wait_waits_for_the_first_workflow(platform: Platform) -> None:
    spec = {"name": "submit-wait-idem", "steps": [short_step("a")]}
    first = platform.submit(spec, **{"Idempotency-Key": "submit-wait-idem-1"})
    assert first.status_code == 202, first.text
    again = platform.client.post(
        "/v1/workflows",
        json=spec,
        params={"wait_s": 25},
        headers={"Idempotency-Key": "submit-wait-idem-1"},
    )
    assert again.status_code == 200, again.text
    assert again.headers["idempotent-replayed"] == "true"
    assert again.json()["id"] == first.json()["id"]
    assert again.json()["status"] == "succeeded"


def test_a_submit_with_wait_checks_its_arguments_and_stores_nothing(platform: Platform) -> None:
    def count() -> int:
        return len(platform.client.get("/v1/workflows", params={"limit": 200}).json()["items"])

    before = count()
    spec = {"name": "submit-wait-bad", "steps": [short_step("a")]}
    too_long = platform.client.post("/v1/workflows", json=spec, params={"wait_s": 61})
    assert too_long.status_code == 422
    assert "wait_s" in too_long.text
    negative = platform.client.post("/v1/workflows", json=spec, params={"wait_s": -1})
    assert negative.status_code == 422
    bad_model = {"name": "submit-wait-bad", "steps": [short_step("a", model="no-such-model")]}
    unknown = platform.client.post("/v1/workflows", json=bad_model, params={"wait_s": 5})
    assert unknown.status_code == 422
    assert "no-such-model" in unknown.text
    assert count() == before
