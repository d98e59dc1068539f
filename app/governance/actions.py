"""Carrying out a rule's actions once the evaluation that decided them has committed.

=================  ==========================  ============================================
action             when                        what it does
=================  ==========================  ============================================
alert              fires                       nothing more: the alert is recorded
webhook            fires, every ``cooldown``   sends ``corral.governance.webhook`` (signed,
                   while firing, resolves      retried with backoff); muted by a silence
cleanup_memory     fires                       sends ``corral.memory.prune`` now
unload_idle        fires                       asks idle GPU pools to release (a busy pool
                                               refuses)
pause_queue        fires                       the model's pools stop consuming its queue
resume_queue       fires                       they consume it again
route_to_fallback  fires; undone on resolve    new steps of the model go to the fallback
=================  ==========================  ============================================

Each action's outcome (ok, queued, silenced, error, with details) goes to the history.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any, Literal

from app.core.config import get_settings
from app.core.redis import get_redis
from app.governance import notify
from app.governance.rules import RuleSpec
from app.scheduler import control, live
from app.scheduler.service import make_ledger
from app.store import db
from app.store.tables import GovernanceEvent
from app.workflows import routing
from app.workflows.dispatch import producer
from app.workflows.names import MEMORY_PRUNE_TASK, SYSTEM_QUEUE, WEBHOOK_TASK

log = logging.getLogger(__name__)

Event = Literal["firing", "repeat", "resolved"]


@dataclass(frozen=True)
class Fired:
    """An alert event whose actions run after the evaluation's commit."""

    event: Event
    rule: RuleSpec
    alert_id: str
    labels: dict[str, str]
    value: float | None
    started_at: float
    silenced: bool = False


def run(fired: list[Fired]) -> list[GovernanceEvent]:
    """Carry out each event's actions and record every outcome; the records."""
    records = []
    for f in fired:
        for index, action in enumerate(f.rule.actions):
            if f.event != "firing" and action.type not in ("webhook", "route_to_fallback"):
                continue
            if f.event == "repeat" and action.type != "webhook":
                continue
            try:
                outcome, detail = _carry_out(f, index, action)
            except Exception as exc:  # one action's failure never stops the others
                log.warning("action %s of rule %s failed: %s", action.type, f.rule.id, exc)
                outcome, detail = "error", {"error": f"{type(exc).__name__}: {exc}"}
            records.append(
                GovernanceEvent(
                    rule_id=str(f.rule.id),
                    alert_id=f.alert_id,
                    kind="action",
                    action=action.type,
                    outcome=outcome,
                    detail={"event": f.event, **detail},
                )
            )
    if records:
        with db.session_scope(write=True) as session:
            session.add_all(records)
    return records


def _model(f: Fired, action: Any) -> str:
    model = getattr(action, "model", None) or f.labels.get("model")
    if not model:
        raise ValueError(f"{action.type}: the alert has no model label and the action names none")
    return str(model)


def _carry_out(f: Fired, index: int, action: Any) -> tuple[str, dict[str, Any]]:
    kind = action.type
    if kind == "alert":
        return "ok", {}
    if kind == "webhook":
        if f.silenced:
            return "silenced", {"url": action.url}
        return "queued", _send_webhook(f, index)
    if kind == "cleanup_memory":
        producer().send_task(MEMORY_PRUNE_TASK, queue=SYSTEM_QUEUE)
        return "queued", {"task": MEMORY_PRUNE_TASK}
    if kind == "unload_idle":
        return "ok", _unload_idle(action.model, action.idle_s, f.rule.id)
    model = _model(f, action)
    if kind == "pause_queue":
        routing.set_paused(model, True, rule=f.rule.id, alert=f.alert_id)
        return "ok", {"model": model, "nodes": control.pause(producer(), model)}
    if kind == "resume_queue":
        routing.set_paused(model, False)
        return "ok", {"model": model, "nodes": control.resume(producer(), model)}
    if kind == "route_to_fallback":
        if f.event == "resolved":
            current = routing.route_details().get(model, {})
            if current.get("alert") != f.alert_id:
                return "skipped", {"model": model, "reason": "the route is not this alert's"}
            routing.clear_route(model)
            return "ok", {"model": model, "fallback": None}
        routing.set_route(model, action.fallback, rule=f.rule.id, alert=f.alert_id)
        return "ok", {"model": model, "fallback": action.fallback}
    raise ValueError(f"unknown action {kind!r}")


def _send_webhook(f: Fired, index: int) -> dict[str, Any]:
    event = "resolved" if f.event == "resolved" else "firing"
    body = notify.payload(
        event=event,
        rule=f.rule.model_dump(mode="json"),
        alert_id=f.alert_id,
        labels=f.labels,
        value=f.value,
        started_at=f.started_at,
        delivery=uuid.uuid4().hex,
    )
    producer().send_task(
        WEBHOOK_TASK, args=[f.rule.id, index, body, f.alert_id], queue=SYSTEM_QUEUE
    )
    return {"delivery": body["delivery"], "notification": event}


def _unload_idle(model: str | None, idle_s: float, rule_id: str | None) -> dict[str, Any]:
    """Ask each GPU pool (of ``model``) idle at least ``idle_s`` to release its GPU."""
    settings = get_settings()
    now = time.time()
    idle_since: dict[str, float] = {}
    for w in live.live_workers():
        node = str(w.get("node") or "")
        if not node:
            continue
        since = float(w.get("idle_since") or now) if not w.get("busy") else now
        # A node's pool is as idle as its least idle process.
        idle_since[node] = max(idle_since.get(node, 0.0), since)
    released, refused = [], []
    holders = {
        r.holder: r.model
        for r in make_ledger(settings, get_redis()).reservations()
        if not r.standing and (model is None or r.model == model)
    }
    for node in sorted(holders):
        if now - idle_since.get(node, now) < idle_s:
            refused.append({"node": node, "reason": f"not idle for {idle_s:g} s"})
            continue
        if control.release(producer(), node, f"governance rule {rule_id}"):
            released.append(node)
        else:
            refused.append({"node": node, "reason": "busy or not answering"})
    return {"released": released, "refused": refused}
