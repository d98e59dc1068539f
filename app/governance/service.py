"""Governance's one way in for every door (HTTP, CLI, beat): rules, alerts, silences.

Rules are per installation. Any key may read them; changing rules and silences takes an
admin key (``corral keys create NAME --admin``), which the routes check. The built-in
rules are seeded into an empty table on first use; deleting one leaves a tombstone, so
it is not seeded again.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from pydantic import ValidationError
from sqlalchemy import update
from sqlmodel import Session, col, select

from app.core.config import Settings, get_settings
from app.core.errors import ConflictError, FieldError, NotFoundError, SpecError
from app.governance.metrics import METRICS
from app.governance.rules import BUILTIN, MASK, RuleSpec, slug
from app.store import db
from app.store.tables import Alert, AlertState, GovernanceEvent, GovernanceRule, Silence, utcnow
from app.workflows.spec import pydantic_errors
from models.catalog import Catalog, load_catalog

_MODEL_ACTIONS = ("unload_idle", "pause_queue", "resume_queue", "route_to_fallback")


def _errors(exc: ValidationError) -> list[FieldError]:
    return [
        FieldError(tuple(p for p in e.loc if p not in _UNION_TAGS), e.msg, e.type)
        for e in pydantic_errors(exc)
    ]


# pydantic names the member of a tagged union in an error's location; clients wrote none.
_UNION_TAGS = frozenset(
    {"alert", "webhook", "cleanup_memory", "unload_idle", "pause_queue", "resume_queue"}
    | {"route_to_fallback", "float", "int"}
)


def check_rule(raw: Any, catalog: Catalog, settings: Settings) -> RuleSpec:
    """Validate a rule completely; one :class:`SpecError` naming every bad field."""
    if not isinstance(raw, dict):
        raise SpecError.single((), f"a rule must be an object, got {type(raw).__name__}")
    try:
        rule = RuleSpec.model_validate(raw)
    except ValidationError as exc:
        raise SpecError(_errors(exc)) from None
    problems: list[FieldError] = []
    labels = {label for c in rule.conditions for label in METRICS[c.metric].labels}
    for i, cond in enumerate(rule.conditions):
        wanted = cond.match.get("model")
        if wanted is not None and wanted not in catalog:
            problems.append(
                FieldError(("conditions", i, "match", "model"), f"unknown model {wanted!r}")
            )
    for i, action in enumerate(rule.actions):
        where: tuple[str | int, ...] = ("actions", i)
        if action.type == "webhook" and not (action.secret or settings.webhook_secret):
            problems.append(
                FieldError(
                    (*where, "secret"),
                    "a webhook is signed: give a secret (8 characters or more) or set "
                    "CORRAL_WEBHOOK_SECRET",
                )
            )
        if action.type not in _MODEL_ACTIONS:
            continue
        model = getattr(action, "model", None)
        if model is None and action.type != "unload_idle" and "model" not in labels:
            problems.append(
                FieldError(
                    (*where, "model"),
                    f"{action.type} needs a model: name one, or use a metric labelled by model",
                )
            )
        if model is not None and model not in catalog:
            problems.append(FieldError((*where, "model"), f"unknown model {model!r}"))
        if action.type == "route_to_fallback":
            fallback = action.fallback
            if fallback not in catalog:
                problems.append(FieldError((*where, "fallback"), f"unknown model {fallback!r}"))
            elif model is not None and model in catalog:
                if fallback == model:
                    problems.append(FieldError((*where, "fallback"), "a model is not its fallback"))
                elif catalog.get(fallback).kind != catalog.get(model).kind:
                    problems.append(
                        FieldError(
                            (*where, "fallback"),
                            f"{fallback} is a {catalog.get(fallback).kind} model and {model} a "
                            f"{catalog.get(model).kind} model: a fallback must be of the same kind",
                        )
                    )
    if problems:
        raise SpecError(problems)
    return rule.model_copy(update={"id": rule.id or slug(rule.name)})


def _seed(session: Session) -> None:
    have = set(session.exec(select(GovernanceRule.id)).all())
    for rule in BUILTIN:
        if rule.id not in have:
            session.add(_row(rule, builtin=True))


def _row(rule: RuleSpec, *, builtin: bool = False) -> GovernanceRule:
    assert rule.id is not None
    return GovernanceRule(
        id=rule.id,
        name=rule.name,
        enabled=rule.enabled,
        builtin=builtin,
        body=rule.model_dump(mode="json"),
    )


def _live(session: Session, rule_id: str) -> GovernanceRule:
    row = session.get(GovernanceRule, rule_id)
    if row is None or row.deleted_at is not None:
        raise NotFoundError(f"no rule {rule_id!r}")
    return row


def public(row: GovernanceRule) -> dict[str, Any]:
    """A rule as responses show it: its body (secrets masked) and its bookkeeping."""
    return {
        **RuleSpec.model_validate(row.body).public(),
        "builtin": row.builtin,
        "created_at": row.created_at,
        "updated_at": row.updated_at,
    }


def seeded_rules(session: Session) -> list[GovernanceRule]:
    """Every rule not deleted, the built-in ones seeded first if missing."""
    _seed(session)
    session.flush()
    query = select(GovernanceRule).where(col(GovernanceRule.deleted_at).is_(None))
    return list(session.exec(query.order_by(GovernanceRule.id)).all())


def list_rules() -> list[dict[str, Any]]:
    with db.session_scope(write=True) as session:
        return [public(r) for r in seeded_rules(session)]


def get_rule(rule_id: str) -> dict[str, Any]:
    with db.session_scope(write=True) as session:
        _seed(session)
        return public(_live(session, rule_id))


def create_rule(raw: Any) -> dict[str, Any]:
    """Store a new rule; 409 when its id is taken."""
    settings = get_settings()
    rule = check_rule(raw, load_catalog(settings.catalog_path), settings)
    assert rule.id is not None
    with db.session_scope(write=True) as session:
        _seed(session)
        row = session.get(GovernanceRule, rule.id)
        if row is not None and row.deleted_at is None:
            raise ConflictError(f"a rule {rule.id!r} exists: PUT /v1/rules/{rule.id} changes it")
        if row is None:
            row = _row(rule)
            session.add(row)
        else:  # a deleted rule's id, taken again
            _update(row, rule)
            row.deleted_at = None
        session.flush()
        return public(row)


def _update(row: GovernanceRule, rule: RuleSpec) -> None:
    row.name, row.enabled = rule.name, rule.enabled
    row.body = rule.model_dump(mode="json")
    row.updated_at = utcnow()


def replace_rule(rule_id: str, raw: Any) -> dict[str, Any]:
    """Replace a rule's whole body (its id stays). A masked secret keeps the stored one."""
    settings = get_settings()
    if isinstance(raw, dict):
        raw = {**raw, "id": rule_id}
    with db.session_scope(write=True) as session:
        _seed(session)
        row = _live(session, rule_id)
        raw = _unmask(raw, row.body)
        rule = check_rule(raw, load_catalog(settings.catalog_path), settings)
        _update(row, rule)
        session.flush()
        return public(row)


def _unmask(raw: Any, stored: dict[str, Any]) -> Any:
    if not isinstance(raw, dict) or not isinstance(raw.get("actions"), list):
        return raw
    old = {a.get("url"): a.get("secret") for a in stored.get("actions", [])}
    actions = [
        {**a, "secret": old.get(a.get("url"))}
        if isinstance(a, dict) and a.get("secret") == MASK
        else a
        for a in raw["actions"]
    ]
    return {**raw, "actions": actions}


def delete_rule(rule_id: str) -> None:
    """Delete a rule; its open alerts close at the next evaluation."""
    with db.session_scope(write=True) as session:
        _seed(session)
        row = _live(session, rule_id)
        row.deleted_at = row.updated_at = utcnow()
        row.enabled = False


# ---- alerts and silences -----------------------------------------------------------------


def alert_public(a: Alert) -> dict[str, Any]:
    return {
        "id": a.id,
        "rule": a.rule_id,
        "severity": a.severity,
        "state": a.state,
        "labels": a.labels,
        "value": a.value,
        "started_at": a.started_at,
        "fired_at": a.fired_at,
        "ended_at": a.ended_at,
        "last_eval_at": a.last_eval_at,
        "last_notified_at": a.last_notified_at,
        "notifications": a.notifications,
    }


def list_alerts(
    state: AlertState | None = None, rule_id: str | None = None, limit: int = 100
) -> list[dict[str, Any]]:
    """Alerts, newest first; open ones by default include every state."""
    query = select(Alert)
    if state is not None:
        query = query.where(Alert.state == state)
    if rule_id is not None:
        query = query.where(Alert.rule_id == rule_id)
    with db.session_scope() as session:
        rows = session.exec(query.order_by(col(Alert.started_at).desc()).limit(limit)).all()
        return [alert_public(a) for a in rows]


def get_alert(alert_id: str) -> dict[str, Any]:
    """One alert with its history (transitions, actions, notifications), oldest first."""
    with db.session_scope() as session:
        alert = session.get(Alert, alert_id)
        if alert is None:
            raise NotFoundError(f"no alert {alert_id!r}")
        events = session.exec(
            select(GovernanceEvent)
            .where(GovernanceEvent.alert_id == alert_id)
            .order_by(col(GovernanceEvent.id))
        ).all()
        return {**alert_public(alert), "history": [event_public(e) for e in events]}


def event_public(e: GovernanceEvent) -> dict[str, Any]:
    return e.model_dump(exclude={"alert_id"} if e.alert_id is None else set())


def history(rule_id: str | None = None, limit: int = 200) -> list[dict[str, Any]]:
    """The governance history, newest first."""
    query = select(GovernanceEvent)
    if rule_id is not None:
        query = query.where(GovernanceEvent.rule_id == rule_id)
    with db.session_scope() as session:
        rows = session.exec(query.order_by(col(GovernanceEvent.id).desc()).limit(limit)).all()
        return [event_public(e) for e in rows]


def create_silence(
    *,
    rule_id: str | None,
    matchers: dict[str, str],
    ends_at: datetime | None,
    duration_s: float | None,
    comment: str,
    created_by: int | None,
) -> dict[str, Any]:
    """Mute notifications of matching alerts until ``ends_at`` (or for ``duration_s``)."""
    now = utcnow()
    if (ends_at is None) == (duration_s is None):
        raise SpecError.single(("body",), "give exactly one of ends_at and duration_s")
    end = ends_at if ends_at is not None else now + timedelta(seconds=duration_s or 0)
    if end.tzinfo is None:
        end = end.replace(tzinfo=UTC)
    if end <= now:
        raise SpecError.single(("body", "ends_at"), "a silence must end in the future")
    if rule_id is None and not matchers:
        raise SpecError.single(("body",), "a silence names a rule, label matchers, or both")
    with db.session_scope(write=True) as session:
        if rule_id is not None:
            _seed(session)
            _live(session, rule_id)
        row = Silence(
            rule_id=rule_id, matchers=matchers, comment=comment, ends_at=end, created_by=created_by
        )
        session.add(row)
        session.flush()
        return row.model_dump()


def active_silences(now: datetime | None = None) -> list[dict[str, Any]]:
    now = now or utcnow()
    with db.session_scope() as session:
        rows = session.exec(
            select(Silence).where(Silence.starts_at <= now, Silence.ends_at > now)
        ).all()
        return [r.model_dump() for r in rows]


def expire_silence(silence_id: str) -> None:
    with db.session_scope(write=True) as session:
        result = session.exec(
            update(Silence)
            .where(col(Silence.id) == silence_id, col(Silence.ends_at) > utcnow())
            .values(ends_at=utcnow())
        )
        if not result.rowcount:
            raise NotFoundError(f"no active silence {silence_id!r}")
