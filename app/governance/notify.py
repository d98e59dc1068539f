"""Webhook notifications: the JSON an alert is sent as, its HMAC-SHA256 signature, delivery.

Each POST carries ``X-Corral-Signature: t=<unix time>,v1=<hex>``, where ``v1`` is
HMAC-SHA256 with the secret over ``"<t>." + body``: a receiver recomputes it
(:func:`verify`) and refuses a stale ``t``, so a captured request cannot be replayed.
``X-Corral-Event`` says ``firing`` or ``resolved`` and ``X-Corral-Delivery`` identifies
the notification (the same on every retry of it).

Delivery runs in the Celery task ``corral.governance.webhook`` on the system queue, never
in the evaluation: a failed POST (a network error, or a status other than 2xx) is retried
with exponential backoff up to ``CORRAL_WEBHOOK_MAX_RETRIES`` times, and the outcome goes
to the governance history.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from typing import Any

import httpx

from app.core.config import get_settings
from app.core.errors import CorralError
from app.store import db
from app.store.tables import GovernanceEvent, GovernanceRule

SIGNATURE_HEADER = "X-Corral-Signature"


class DeliveryFailed(CorralError):
    """A webhook POST failed (network error or a non-2xx status); it may be retried."""


def sign(body: bytes, secret: str, timestamp: int | None = None) -> str:
    """The signature header's value for ``body``."""
    t = int(time.time()) if timestamp is None else timestamp
    mac = hmac.new(secret.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={t},v1={mac}"


def verify(body: bytes, header: str, secret: str, tolerance_s: float = 300.0) -> bool:
    """Whether ``header`` signs ``body`` with ``secret`` within ``tolerance_s`` of now."""
    try:
        parts = dict(p.split("=", 1) for p in header.split(","))
        t = int(parts["t"])
    except (KeyError, ValueError):
        return False
    if abs(time.time() - t) > tolerance_s:
        return False
    expected = sign(body, secret, t).split("v1=", 1)[1]
    return hmac.compare_digest(expected, parts.get("v1", ""))


def payload(
    *,
    event: str,
    rule: dict[str, Any],
    alert_id: str,
    labels: dict[str, str],
    value: float | None,
    started_at: float,
    delivery: str,
) -> dict[str, Any]:
    """The JSON body of one notification."""
    return {
        "delivery": delivery,
        "event": event,
        "alert": {
            "id": alert_id,
            "rule": rule["id"],
            "name": rule["name"],
            "category": rule["category"],
            "severity": rule["severity"],
            "description": rule.get("description", ""),
            "labels": labels,
            "value": value,
            "started_at": started_at,
            "state": "resolved" if event == "resolved" else "firing",
        },
        "sent_at": time.time(),
    }


def _target(rule_id: str, action_index: int) -> tuple[str, str]:
    with db.session_scope() as session:
        row = session.get(GovernanceRule, rule_id)
        actions = row.body["actions"] if row is not None else []
        action = actions[action_index] if action_index < len(actions) else {}
        if action.get("type") != "webhook":
            raise CorralError(f"rule {rule_id!r} has no webhook at actions[{action_index}] now")
    secret = action.get("secret") or get_settings().webhook_secret
    return str(action["url"]), str(secret)


def deliver(rule_id: str, action_index: int, body: dict[str, Any]) -> int:
    """POST ``body`` to the rule's webhook, signed; its HTTP status. Raises
    :class:`DeliveryFailed` for a network error or a non-2xx answer."""
    url, secret = _target(rule_id, action_index)
    raw = json.dumps(body, separators=(",", ":")).encode()
    headers = {
        "Content-Type": "application/json",
        "User-Agent": "corral-governance/1",
        "X-Corral-Event": str(body["event"]),
        "X-Corral-Delivery": str(body["delivery"]),
        SIGNATURE_HEADER: sign(raw, secret),
    }
    try:
        resp = httpx.post(
            url, content=raw, headers=headers, timeout=get_settings().webhook_timeout_s
        )
    except httpx.HTTPError as exc:
        raise DeliveryFailed(f"POST {url}: {type(exc).__name__}: {exc}") from exc
    if not 200 <= resp.status_code < 300:
        raise DeliveryFailed(f"POST {url}: HTTP {resp.status_code}")
    return resp.status_code


def record_delivery(
    rule_id: str, alert_id: str | None, outcome: str, detail: dict[str, Any]
) -> None:
    """Write a delivery's outcome to the governance history."""
    with db.session_scope(write=True) as session:
        session.add(
            GovernanceEvent(
                rule_id=rule_id,
                alert_id=alert_id,
                kind="notification",
                action="webhook",
                outcome=outcome,
                detail=detail,
            )
        )


def backoff_s(retries: int) -> float:
    """Seconds before retry number ``retries + 1``: 1, 2, 4, … capped at 60."""
    return float(min(60, 2**retries))
