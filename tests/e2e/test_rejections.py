"""Bad input over HTTP: a clear 422 (or 401/409) naming the field and limit, and nothing changes."""

from __future__ import annotations

import time
from typing import Any

import httpx
import pytest
import redis

from tests.utils.platform import Platform

pytestmark = pytest.mark.e2e


def step(step_id: str = "s", **extra: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "id": step_id,
        "kind": "generate",
        "model": "tiny-chat",
        "input": {"prompt": "Hi", "max_tokens": 4},
    }
    base.update(extra)
    return base


CASES: list[tuple[str, Any, list[Any], str]] = [
    (
        "unknown model",
        {"name": "x", "steps": [step(model="gpt-5")]},
        ["steps", 0, "model"],
        "unknown model 'gpt-5'",
    ),
    (
        "unknown dependency",
        {"name": "x", "steps": [step(depends_on=["ghost"])]},
        ["steps", 0, "depends_on", 0],
        "unknown step id 'ghost'",
    ),
    (
        "duplicate ids",
        {"name": "x", "steps": [step("a"), step("a")]},
        ["steps", 1, "id"],
        "duplicate step id 'a'",
    ),
    (
        "cycle",
        {"name": "x", "steps": [step("a", depends_on=["b"]), step("b", depends_on=["a"])]},
        ["steps"],
        "cycle",
    ),
    (
        "template syntax",
        {
            "name": "x",
            "steps": [step(input={"prompt": "{{ steps.a.output.text ", "max_tokens": 4})],
        },
        ["steps", 0, "input", "prompt"],
        "invalid template",
    ),
    (
        "condition syntax",
        {"name": "x", "steps": [step(when="steps.a.output.text | int >")]},
        ["steps", 0, "when"],
        "invalid condition",
    ),
    (
        "template uses a step it does not depend on",
        {
            "name": "x",
            "steps": [step("a"), step("b", input={"prompt": "{{ steps.a.output.text }}"})],
        },
        ["steps", 1, "input", "prompt"],
        "does not depend on it",
    ),
    (
        "prompt longer than the context",
        {"name": "x", "steps": [step(input={"prompt": "hello world " * 9000, "max_tokens": 4})]},
        ["steps", 0, "input"],
        "8192-token context of model 'tiny-chat'",
    ),
    (
        "max_tokens over the context",
        {"name": "x", "steps": [step(input={"prompt": "Hi", "max_tokens": 100000})]},
        ["steps", 0, "input", "max_tokens"],
        "max_tokens must be < the context",
    ),
    (
        "wrong model kind",
        {"name": "x", "steps": [step(model="tiny-embed")]},
        ["steps", 0, "model"],
        "embed model",
    ),
    (
        "missing field",
        {"name": "x", "steps": [{"id": "a", "kind": "generate", "model": "tiny-chat"}]},
        ["steps", 0, "input"],
        "Field required",
    ),
    (
        "unknown step kind",
        {"name": "x", "steps": [step(kind="paint")]},
        ["steps", 0, "kind"],
        "generate",
    ),
    (
        "timeout over the limit",
        {"name": "x", "steps": [step(timeout_s=999999)]},
        ["steps", 0, "timeout_s"],
        "CORRAL_MAX_STEP_TIMEOUT_S",
    ),
    (
        "unknown input field",
        {"name": "x", "steps": [step(input={"prompt": "Hi", "temprature": 1})]},
        ["steps", 0, "input", "temprature"],
        "unknown field",
    ),
    ("not an object", [1, 2, 3], [], "must be an object"),
]


def _queued(platform: Platform) -> int:
    client = redis.Redis.from_url(platform.settings.broker_url)
    try:
        return sum(int(client.llen(q)) for q in ("model.tiny-chat", "model.tiny-embed"))
    finally:
        client.close()


def _count(platform: Platform) -> int:
    return len(platform.client.get("/v1/workflows", params={"limit": 200}).json()["items"])


@pytest.mark.parametrize(("case", "body", "loc", "message"), CASES, ids=[c[0] for c in CASES])
def test_invalid_workflow_is_rejected_and_changes_nothing(
    platform: Platform, case: str, body: Any, loc: list[Any], message: str
) -> None:
    before, queued = _count(platform), _queued(platform)
    resp = platform.client.post("/v1/workflows", json=body)
    assert resp.status_code == 422, resp.text
    details = resp.json()["detail"]
    assert any(d["loc"] == loc and message in d["msg"] for d in details), details
    assert _count(platform) == before
    assert _queued(platform) == queued


def test_oversize_body(platform: Platform) -> None:
    before = _count(platform)
    limit = platform.settings.max_body_bytes
    body = {"name": "big", "steps": [step(input={"prompt": "x" * (limit + 10), "max_tokens": 4})]}
    resp = platform.client.post("/v1/workflows", json=body)
    assert resp.status_code == 422
    detail = resp.json()["detail"][0]
    assert detail["loc"] == ["body"]
    assert str(limit) in detail["msg"] and "CORRAL_MAX_BODY_BYTES" in detail["msg"]
    assert _count(platform) == before


def test_malformed_json(platform: Platform) -> None:
    resp = platform.client.post(
        "/v1/workflows", content=b"{not json", headers={"Content-Type": "application/json"}
    )
    assert resp.status_code == 422
    assert resp.json()["detail"][0]["loc"] == ["body"]


@pytest.mark.parametrize("depth", [100, 5000])
def test_json_nested_past_the_limit_is_a_422(platform: Platform, depth: int) -> None:
    body = b"[" * depth + b"]" * depth
    resp = platform.client.post(
        "/v1/workflows", content=body, headers={"Content-Type": "application/json"}
    )
    assert resp.status_code == 422
    assert resp.json()["detail"][0]["loc"][0] == "body"


def test_every_v1_route_needs_a_key(platform: Platform) -> None:
    spec = {"name": "x", "steps": [step()]}
    before = _count(platform)
    with httpx.Client(base_url=platform.url) as anon:
        assert anon.get("/v1/catalog").status_code == 401
        assert anon.post("/v1/workflows", json=spec).status_code == 401
        wrong = anon.post(
            "/v1/workflows", json=spec, headers={"Authorization": "Bearer crl_0000_nope"}
        )
        assert wrong.status_code == 401
        assert wrong.json()["detail"] == "invalid API key"
        assert anon.get("/healthz").status_code == 200
    assert _count(platform) == before


def test_a_revoked_key_is_refused_within_the_key_cache_time(platform: Platform) -> None:
    from app.store import db, keys

    with db.session_scope(write=True) as session:
        row, key = keys.create_key(session, "short-lived")
    with httpx.Client(base_url=platform.url, headers={"Authorization": f"Bearer {key}"}) as c:
        assert c.get("/v1/catalog").status_code == 200  # verified, and now remembered
        with db.session_scope(write=True) as session:
            keys.revoke_key(session, row.prefix)
        revoked_at = time.monotonic()
        ttl = platform.settings.api_key_cache_s
        while c.get("/v1/catalog").status_code == 200:
            assert time.monotonic() - revoked_at < ttl + 3, "a revoked key kept working"
            time.sleep(0.1)
        refused = c.get("/v1/catalog")
        assert refused.status_code == 401
        assert refused.json()["detail"] == "invalid API key"


def test_workflows_of_another_key_are_invisible(platform: Platform) -> None:
    from app.store import db, keys

    wid = platform.submit({"name": "mine", "steps": [step()]}).json()["id"]
    with db.session_scope(write=True) as session:
        _row, other_key = keys.create_key(session, "other")
    with httpx.Client(
        base_url=platform.url, headers={"Authorization": f"Bearer {other_key}"}
    ) as other:
        assert other.get(f"/v1/workflows/{wid}").status_code == 404
        assert other.post(f"/v1/workflows/{wid}/cancel").status_code == 404
        assert other.get("/v1/workflows").json()["items"] == []
    platform.wait(wid)
