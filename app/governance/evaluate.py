"""One governance evaluation: what beat's ``corral.governance.evaluate`` runs.

::

    gather the snapshot (Redis, the ledger, the database)          no lock held
    one write transaction:
        claim the tick (time // CORRAL_GOVERNANCE_INTERVAL_S)      lost: stop, nothing done
        read the open alerts; for each rule and series:
            rules.transitions → insert/update alerts, history rows
    after the commit: actions (webhooks, pause, route, …), their outcomes recorded

Claiming the tick is a conditional ``UPDATE governance_tick … WHERE tick < :tick`` in the
same transaction as the transitions: a second beat at the same tick changes no row and
stops; one at the next tick waits for the row lock (PostgreSQL) or the write lock
(SQLite) and then reads the alerts the first committed. So each tick is evaluated once,
and two evaluations never decide the same transition.

A rule whose metrics' source could not be read this time (Redis or the database down) is
skipped: its alerts keep their state rather than resolve for want of data.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import update
from sqlmodel import Session, col, select

from app.core.config import get_settings
from app.governance import actions
from app.governance.actions import Event, Fired
from app.governance.metrics import METRICS, Snapshot, gather
from app.governance.rules import RuleSpec, Series, active_series, notify_due, silenced
from app.governance.rules import transitions as next_states
from app.governance.service import active_silences, seeded_rules
from app.store import db
from app.store.tables import Alert, AlertState, GovernanceEvent, GovernanceRule, GovernanceTick

log = logging.getLogger(__name__)


@dataclass
class Evaluation:
    """What one evaluation did."""

    tick: int
    at: float
    rules: int = 0
    transitions: list[tuple[str, str | None, str]] = field(default_factory=list)
    fired: list[Fired] = field(default_factory=list)
    skipped_rules: list[str] = field(default_factory=list)


def claim_tick(session: Session, tick: int, at: datetime) -> bool:
    """Take ``tick`` for this evaluation (inside its write transaction); False when another
    evaluation has it."""
    result = session.exec(
        update(GovernanceTick)
        .where(col(GovernanceTick.id) == 1, col(GovernanceTick.tick) < tick)
        .values(tick=tick, at=at)
    )
    if result.rowcount:
        return True
    if session.get(GovernanceTick, 1) is None:  # a database from before the seed row
        session.add(GovernanceTick(id=1, tick=tick, at=at))
        session.flush()
        return True
    return False


def last_tick() -> datetime | None:
    """When beat last evaluated the rules (None: never)."""
    with db.session_scope() as session:
        row = session.get(GovernanceTick, 1)
        return row.at if row is not None and row.tick > 0 else None


def evaluate(now: float | None = None) -> Evaluation | None:
    """Evaluate every enabled rule once for the current tick; None when another evaluation
    already took it."""
    settings = get_settings()
    now = time.time() if now is None else now
    at = datetime.fromtimestamp(now, UTC)
    tick = math.floor(now / settings.governance_interval_s)
    with db.session_scope(write=True) as session:
        rules = [RuleSpec.model_validate(r.body) for r in seeded_rules(session) if r.enabled]
    windows = {w for r in rules for w in r.windows()}
    snap = gather(windows, settings)
    snap.at = now
    silences = active_silences(at)
    result = Evaluation(tick=tick, at=now, rules=len(rules))
    with db.session_scope(write=True) as session:
        if not claim_tick(session, tick, at):
            return None
        open_alerts = session.exec(
            select(Alert).where(col(Alert.state).in_([AlertState.pending, AlertState.firing]))
        ).all()
        by_rule: dict[str, dict[str, Alert]] = {}
        for alert in open_alerts:
            by_rule.setdefault(alert.rule_id, {})[alert.fingerprint] = alert
        enabled = {r.id for r in rules}
        for rule in rules:
            if _blind(rule, snap):
                result.skipped_rules.append(str(rule.id))
                continue
            series = active_series(rule, snap)
            _apply(session, rule, series, by_rule.get(str(rule.id), {}), silences, now, result)
        gone = [rule_id for rule_id in by_rule if rule_id not in enabled]
        for row in session.exec(select(GovernanceRule).where(col(GovernanceRule.id).in_(gone))):
            # Disabled or deleted: its alerts end, and what they started (a route) is undone.
            rule = RuleSpec.model_validate(row.body)
            for alert in by_rule.pop(row.id).values():
                _close(session, alert, at, result, "the rule is disabled or deleted")
                if alert.state is AlertState.resolved:
                    mute = silenced(alert.labels, row.id, silences)
                    result.fired.append(
                        Fired(
                            "resolved",
                            rule,
                            alert.id,
                            alert.labels,
                            alert.value,
                            alert.started_at.timestamp(),
                            mute,
                        )
                    )
        for rule_id in gone:  # rules removed from the table altogether
            for alert in by_rule.get(rule_id, {}).values():
                _close(session, alert, at, result, "the rule no longer exists")
    if result.fired:
        actions.run(result.fired)
    return result


def _blind(rule: RuleSpec, snap: Snapshot) -> bool:
    return any(METRICS[c.metric].source in snap.errors for c in rule.conditions)


def _record(
    session: Session,
    alert: Alert,
    before: AlertState | None,
    after: AlertState,
    at: datetime,
    result: Evaluation,
    **detail: object,
) -> None:
    session.add(
        GovernanceEvent(
            at=at,
            rule_id=alert.rule_id,
            alert_id=alert.id,
            kind="transition",
            from_state=before.value if before else None,
            to_state=after.value,
            detail={"labels": alert.labels, "value": alert.value, **detail},
        )
    )
    result.transitions.append((alert.id, before.value if before else None, after.value))


def _apply(
    session: Session,
    rule: RuleSpec,
    series: dict[str, Series],
    open_alerts: dict[str, Alert],
    silences: list[dict[str, Any]],
    now: float,
    result: Evaluation,
) -> None:
    at = datetime.fromtimestamp(now, UTC)
    for fp in sorted(series.keys() | open_alerts.keys()):
        alert, found = open_alerts.get(fp), series.get(fp)
        state = alert.state if alert is not None else None
        pending_s = now - alert.started_at.timestamp() if alert is not None else 0.0
        moves = next_states(state, found is not None, pending_s, rule.for_s)
        if alert is None:
            if not moves:
                continue
            assert found is not None
            alert = Alert(
                rule_id=str(rule.id),
                fingerprint=fp,
                labels=found.labels,
                severity=rule.severity,
                value=found.value,
                started_at=at,
            )
            session.add(alert)
        alert.last_eval_at = at
        if found is not None:
            alert.value = found.value
        for after in moves:
            _record(session, alert, state, after, at, result)
            alert.state, state = after, after
            if after is AlertState.firing:
                alert.fired_at = at
            elif not after.open:
                alert.ended_at = at
        event = _event(alert, moves, now, rule)
        if event is not None:
            mute = silenced(alert.labels, str(rule.id), silences)
            if _notifies(rule):  # a muted notification keeps the cooldown's cadence
                alert.last_notified_at = at
                alert.notifications += 0 if mute else 1
            started = alert.started_at.timestamp()
            result.fired.append(
                Fired(event, rule, alert.id, alert.labels, alert.value, started, mute)
            )
        session.add(alert)
    session.flush()


def _notifies(rule: RuleSpec) -> bool:
    return any(a.type == "webhook" for a in rule.actions)


def _event(alert: Alert, moves: tuple[AlertState, ...], now: float, rule: RuleSpec) -> Event | None:
    """The event this evaluation raises for ``alert``: firing, a repeat, resolved, or none."""
    if AlertState.firing in moves:
        return "firing"
    if AlertState.resolved in moves:
        return "resolved"
    if alert.state is AlertState.firing and _notifies(rule):
        last = alert.last_notified_at
        ago = now - last.timestamp() if last is not None else None
        if notify_due(ago, rule.cooldown_s):
            return "repeat"
    return None


def _close(session: Session, alert: Alert, at: datetime, result: Evaluation, why: str) -> None:
    after = AlertState.resolved if alert.state is AlertState.firing else AlertState.inactive
    _record(session, alert, alert.state, after, at, result, reason=why)
    alert.state, alert.ended_at, alert.last_eval_at = after, at, at
    session.add(alert)


__all__ = ["Evaluation", "claim_tick", "evaluate", "last_tick"]
