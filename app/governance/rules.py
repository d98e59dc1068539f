"""Governance rules as data, the built-in defaults, and the pure functions that evaluate them.

A rule's conditions each select samples of one metric (optionally matching labels, over
an optional window) and compare them with a threshold. Like a Prometheus alerting rule,
a rule yields one *series* per label set where it holds, and each series becomes its own
alert: ``step_error_rate > 0.05`` fires for each model whose error rate is high. With
``combine: all`` the conditions join on the labels they share (``queue_oldest_wait_s``
and ``pools_live`` of the same model); with ``any`` every series of every condition
counts. Nothing here does I/O: :mod:`app.governance.evaluate` does it around these.
"""

from __future__ import annotations

import hashlib
import json
import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    StrictFloat,
    StrictInt,
    field_validator,
    model_validator,
)

from app.governance.metrics import METRICS, Snapshot
from app.store.tables import AlertState

Category = Literal["safety", "quality", "performance", "collaboration", "resource"]
Severity = Literal["info", "warning", "critical"]
Operator = Literal[">", ">=", "<", "<=", "==", "!="]

OPERATORS: dict[str, Callable[[float, float], bool]] = {
    ">": operator.gt,
    ">=": operator.ge,
    "<": operator.lt,
    "<=": operator.le,
    "==": operator.eq,
    "!=": operator.ne,
}
RULE_ID = r"^[a-z0-9][a-z0-9_.-]{0,63}$"
MASK = "********"


class _Strict(BaseModel):
    # Non-finite numbers are refused: JSON columns (PostgreSQL's) cannot store them.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class Condition(_Strict):
    """``metric`` (matching ``match``, over ``window_s``) ``op`` ``threshold``."""

    metric: str
    match: dict[str, str] = Field(default_factory=dict, description="labels a sample must have")
    op: Operator
    threshold: StrictFloat | StrictInt
    window_s: float | None = Field(
        default=None, gt=0, le=7 * 86400, description="windowed metrics only"
    )

    @field_validator("metric")
    @classmethod
    def _known(cls, value: str) -> str:
        if value not in METRICS:
            raise ValueError(f"unknown metric {value!r}; known: {', '.join(sorted(METRICS))}")
        return value

    @model_validator(mode="after")
    def _labels_and_window(self) -> Condition:
        known = METRICS[self.metric]
        for label in self.match:
            if label not in known.labels:
                have = ", ".join(known.labels) or "none"
                raise ValueError(f"match: {self.metric} has no label {label!r} (labels: {have})")
        if self.window_s is not None and not known.windowed:
            raise ValueError(f"window_s: {self.metric} is not a windowed metric")
        return self


class AlertAction(_Strict):
    """Record the alert (every rule does; this names it explicitly)."""

    type: Literal["alert"]


class WebhookAction(_Strict):
    """POST the alert as JSON to ``url``, signed with HMAC-SHA256 (``X-Corral-Signature``)."""

    type: Literal["webhook"]
    url: str = Field(pattern=r"^https?://[^\s/$.?#][^\s]*$", max_length=2000)
    secret: str | None = Field(
        default=None, min_length=8, max_length=256, description="default CORRAL_WEBHOOK_SECRET"
    )


class CleanupMemoryAction(_Strict):
    """Run the conversation-memory cleanup job now."""

    type: Literal["cleanup_memory"]


class UnloadIdleAction(_Strict):
    """Ask idle pools (of ``model``, or every model) to release their GPUs; never a busy one."""

    type: Literal["unload_idle"]
    model: str | None = None
    idle_s: float = Field(default=0.0, ge=0, description="only pools idle at least this long")


class PauseQueueAction(_Strict):
    """The model's pools stop consuming its queue (``model``: default the alert's model)."""

    type: Literal["pause_queue"]
    model: str | None = None


class ResumeQueueAction(_Strict):
    """The model's pools consume its queue again (``model``: default the alert's model)."""

    type: Literal["resume_queue"]
    model: str | None = None


class RouteToFallbackAction(_Strict):
    """New steps for ``model`` go to ``fallback`` (same kind) until the alert resolves."""

    type: Literal["route_to_fallback"]
    model: str | None = None
    fallback: str


Action = Annotated[
    AlertAction
    | WebhookAction
    | CleanupMemoryAction
    | UnloadIdleAction
    | PauseQueueAction
    | ResumeQueueAction
    | RouteToFallbackAction,
    Field(discriminator="type"),
]


def _only_alert() -> list[Action]:
    return [AlertAction(type="alert")]


class RuleSpec(_Strict):
    """A governance rule as clients write it (``POST /v1/rules``)."""

    id: str | None = Field(default=None, pattern=RULE_ID, description="default: from name")
    name: str = Field(min_length=1, max_length=200)
    category: Category
    severity: Severity
    description: str = Field(default="", max_length=2000)
    conditions: list[Condition] = Field(min_length=1, max_length=10)
    combine: Literal["all", "any"] = "all"
    for_s: float = Field(
        default=0.0,
        ge=0,
        le=7 * 86400,
        validation_alias=AliasChoices("for_s", "for"),
        description="how long the condition holds (pending) before the alert fires",
    )
    cooldown_s: float = Field(
        default=300.0,
        ge=0,
        le=7 * 86400,
        validation_alias=AliasChoices("cooldown_s", "cooldown"),
        description="the least time between two notifications of one alert",
    )
    actions: list[Action] = Field(default_factory=_only_alert, max_length=10)
    enabled: bool = True

    def windows(self) -> set[float]:
        return {c.window_s for c in self.conditions if c.window_s is not None}

    def public(self) -> dict[str, Any]:
        """The rule as responses show it: webhook secrets masked."""
        body = self.model_dump(mode="json")
        for action in body["actions"]:
            if action.get("secret"):
                action["secret"] = MASK
        return body


def slug(name: str) -> str:
    """A rule id from its name: lower case, runs of other characters as ``-``."""
    out = "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")
    while "--" in out:
        out = out.replace("--", "-")
    return out[:64] or "rule"


# ---- evaluation (pure) ------------------------------------------------------------------


@dataclass(frozen=True)
class Series:
    """One label set where a rule holds, and the value of its first condition there."""

    labels: dict[str, str]
    value: float

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.labels)


def fingerprint(labels: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(labels, sort_keys=True).encode()).hexdigest()[:32]


def _holding(cond: Condition, snap: Snapshot) -> list[tuple[dict[str, str], float]]:
    test = OPERATORS[cond.op]
    return [
        (s.labels, s.value)
        for s in snap.samples(cond.metric, cond.window_s)
        if all(s.labels.get(k) == v for k, v in cond.match.items())
        and test(s.value, float(cond.threshold))
    ]


def _compatible(a: dict[str, str], b: dict[str, str]) -> bool:
    return all(a[k] == b[k] for k in a.keys() & b.keys())


def active_series(rule: RuleSpec, snap: Snapshot) -> dict[str, Series]:
    """Every label set where ``rule`` holds in ``snap``, by fingerprint."""
    found: list[tuple[dict[str, str], float]] = []
    if rule.combine == "any":
        for cond in rule.conditions:
            found += _holding(cond, snap)
    else:
        found = _holding(rule.conditions[0], snap)
        for cond in rule.conditions[1:]:
            other = _holding(cond, snap)
            found = [
                ({**labels, **theirs}, value)
                for labels, value in found
                for theirs, _ in other
                if _compatible(labels, theirs)
            ]
    out: dict[str, Series] = {}
    for labels, value in found:
        series = Series(labels, value)
        out.setdefault(series.fingerprint, series)
    return out


def transitions(
    state: AlertState | None, holds: bool, pending_s: float, for_s: float
) -> tuple[AlertState, ...]:
    """The states an alert moves through at one evaluation (none: it stays).

    ``state`` is the open alert's (None: no open alert for this series), ``pending_s``
    how long it has been pending.
    """
    if state is None:
        if not holds:
            return ()
        return (AlertState.pending, AlertState.firing) if for_s == 0 else (AlertState.pending,)
    if state is AlertState.pending:
        if not holds:
            return (AlertState.inactive,)
        return (AlertState.firing,) if pending_s >= for_s else ()
    if state is AlertState.firing and not holds:
        return (AlertState.resolved,)
    return ()


def notify_due(last_notified_s_ago: float | None, cooldown_s: float) -> bool:
    """Whether a firing alert notifies again now."""
    return last_notified_s_ago is None or last_notified_s_ago >= cooldown_s


def silenced(labels: dict[str, str], rule_id: str, silences: list[dict[str, Any]]) -> bool:
    """Whether any silence (``rule_id`` and/or ``matchers``) covers this alert."""
    for s in silences:
        if s.get("rule_id") not in (None, rule_id):
            continue
        if all(labels.get(k) == v for k, v in (s.get("matchers") or {}).items()):
            return True
    return False


# ---- the built-in defaults -------------------------------------------------------------


def _rule(**kw: Any) -> RuleSpec:
    return RuleSpec.model_validate(kw)


def _c(metric: str, op: str, threshold: float) -> dict[str, Any]:
    return {"metric": metric, "op": op, "threshold": threshold}


BUILTIN: tuple[RuleSpec, ...] = (
    _rule(
        id="gpu-memory-high",
        name="GPU memory over 80% reserved",
        category="resource",
        severity="warning",
        conditions=[_c("gpu_utilization", ">", 0.8)],
        for_s=60,
        cooldown_s=900,
    ),
    _rule(
        id="step-latency-high",
        name="Step response time p95 over 3 s",
        category="performance",
        severity="warning",
        conditions=[_c("step_latency_p95_s", ">", 3.0), _c("steps_finished", ">=", 5)],
        for_s=120,
        cooldown_s=900,
    ),
    _rule(
        id="step-error-rate-high",
        name="Step error rate over 5%",
        category="quality",
        severity="critical",
        conditions=[_c("step_error_rate", ">", 0.05), _c("steps_finished", ">=", 5)],
        for_s=60,
        cooldown_s=900,
    ),
    _rule(
        id="handoff-success-low",
        name="Handoff success under 90%",
        category="collaboration",
        severity="warning",
        conditions=[_c("handoff_success_rate", "<", 0.9)],
        for_s=300,
        cooldown_s=1800,
    ),
    _rule(
        id="workflow-success-low",
        name="Workflow success under 90%",
        category="quality",
        severity="warning",
        conditions=[_c("workflow_success_rate", "<", 0.9)],
        for_s=300,
        cooldown_s=1800,
    ),
    _rule(
        id="queue-unserved",
        name="Steps wait over 2 minutes with no live pool",
        category="resource",
        severity="critical",
        conditions=[_c("queue_oldest_wait_s", ">", 120), _c("pools_live", "==", 0)],
        for_s=0,
        cooldown_s=900,
    ),
    _rule(
        id="pool-heartbeat-stopped",
        name="A pool's heartbeat stopped",
        category="safety",
        severity="critical",
        conditions=[_c("pool_heartbeat_age_s", ">", 60)],
        for_s=0,
        cooldown_s=1800,
    ),
    _rule(
        id="redis-memory-high",
        name="Redis memory over 80% of maxmemory",
        category="resource",
        severity="warning",
        conditions=[_c("redis_utilization", ">", 0.8)],
        for_s=60,
        cooldown_s=900,
        actions=[{"type": "alert"}, {"type": "cleanup_memory"}],
    ),
)
