"""Rules as data: validation that names the field, the series a rule yields, the alert state
machine, cooldowns and silences (pure functions, no I/O)."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from app.core.config import Settings
from app.core.errors import SpecError
from app.governance.metrics import Sample, Snapshot
from app.governance.rules import (
    BUILTIN,
    MASK,
    RuleSpec,
    active_series,
    notify_due,
    silenced,
    slug,
    transitions,
)
from app.governance.service import check_rule
from app.store.tables import AlertState
from models.catalog import load_catalog

CATALOG = load_catalog()
SETTINGS = Settings(webhook_secret="")


def rule(**kw: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "name": "Error rate",
        "category": "quality",
        "severity": "warning",
        "conditions": [{"metric": "step_error_rate", "op": ">", "threshold": 0.05}],
    }
    return {**base, **kw}


def locs(raw: Any) -> list[tuple[str | int, ...]]:
    with pytest.raises(SpecError) as info:
        check_rule(raw, CATALOG, SETTINGS)
    return [e.loc for e in info.value.errors]


def test_a_good_rule_gets_an_id_from_its_name_and_an_alert_action() -> None:
    checked = check_rule(rule(name="Error rate: chat!"), CATALOG, SETTINGS)
    assert checked.id == "error-rate-chat"
    assert [a.type for a in checked.actions] == ["alert"]
    assert check_rule(rule(**{"for": 30, "cooldown": 60}), CATALOG, SETTINGS).for_s == 30


@pytest.mark.parametrize(
    ("change", "where"),
    [
        (
            {"conditions": [{"metric": "nope", "op": ">", "threshold": 1}]},
            ("conditions", 0, "metric"),
        ),
        (
            {"conditions": [{"metric": "step_error_rate", "op": "=>", "threshold": 1}]},
            ("conditions", 0, "op"),
        ),
        (
            {"conditions": [{"metric": "step_error_rate", "op": ">", "threshold": "high"}]},
            ("conditions", 0, "threshold"),
        ),
        (
            {"conditions": [{"metric": "step_error_rate", "op": ">", "threshold": True}]},
            ("conditions", 0, "threshold"),
        ),
        (
            {
                "conditions": [
                    {"metric": "step_error_rate", "op": ">", "threshold": 1, "match": {"gpu": "0"}}
                ]
            },
            ("conditions", 0),
        ),
        (
            {"conditions": [{"metric": "queue_depth", "op": ">", "threshold": 1, "window_s": 60}]},
            ("conditions", 0),
        ),
        (
            {"conditions": [{"metric": "step_error_rate", "op": ">", "threshold": float("nan")}]},
            ("conditions", 0, "threshold"),
        ),
        ({"severity": "apocalyptic"}, ("severity",)),
        ({"category": "vibes"}, ("category",)),
        ({"conditions": []}, ("conditions",)),
        ({"for_s": -1}, ("for_s",)),
        ({"colour": "red"}, ("colour",)),
        ({"actions": [{"type": "explode"}]}, ("actions", 0)),
        ({"actions": [{"type": "webhook", "url": "ftp://x"}]}, ("actions", 0, "url")),
        (
            {"actions": [{"type": "webhook", "url": "http://127.0.0.1:9/x"}]},
            ("actions", 0, "secret"),
        ),
        ({"actions": [{"type": "pause_queue", "model": "gpt-9"}]}, ("actions", 0, "model")),
        (
            {
                "actions": [
                    {"type": "route_to_fallback", "model": "tiny-chat", "fallback": "tiny-embed"}
                ]
            },
            ("actions", 0, "fallback"),
        ),
        (
            {
                "conditions": [{"metric": "redis_used_bytes", "op": ">", "threshold": 1}],
                "actions": [{"type": "pause_queue"}],
            },
            ("actions", 0, "model"),
        ),
    ],
)
def test_a_bad_rule_names_the_field(change: dict[str, Any], where: tuple[str | int, ...]) -> None:
    assert where in locs(rule(**change))


def test_a_rule_that_is_not_an_object_is_refused() -> None:
    assert locs([1, 2]) == [()]


def test_the_builtin_rules_hold_the_seed_targets() -> None:
    by_id = {r.id: r for r in BUILTIN}
    assert by_id["gpu-memory-high"].conditions[0].threshold == 0.8
    assert by_id["step-latency-high"].conditions[0].threshold == 3.0
    assert by_id["step-error-rate-high"].conditions[0].threshold == 0.05
    assert by_id["handoff-success-low"].conditions[0].threshold == 0.9
    assert by_id["workflow-success-low"].conditions[0].threshold == 0.9
    assert {c.metric for c in by_id["queue-unserved"].conditions} == {
        "queue_oldest_wait_s",
        "pools_live",
    }
    for r in BUILTIN:
        assert check_rule(r.model_dump(), CATALOG, SETTINGS).id == r.id


def test_public_masks_webhook_secrets() -> None:
    checked = check_rule(
        rule(actions=[{"type": "webhook", "url": "http://h/x", "secret": "s3cret-value"}]),
        CATALOG,
        SETTINGS,
    )
    assert checked.public()["actions"][0]["secret"] == MASK


def snap(*samples: Sample, windowed: list[Sample] | None = None) -> Snapshot:
    s = Snapshot(at=0.0, instant=list(samples))
    s.windowed = {SETTINGS.governance_window_s: windowed or []}
    return s


def test_each_label_set_where_a_rule_holds_is_its_own_series() -> None:
    r = RuleSpec.model_validate(rule())
    s = snap(
        windowed=[
            Sample("step_error_rate", {"model": "a"}, 0.5),
            Sample("step_error_rate", {"model": "b"}, 0.01),
            Sample("step_error_rate", {"model": "c"}, 0.2),
        ]
    )
    assert sorted(x.labels["model"] for x in active_series(r, s).values()) == ["a", "c"]


def test_all_joins_conditions_on_the_labels_they_share() -> None:
    r = RuleSpec.model_validate(
        BUILTIN[[b.id for b in BUILTIN].index("queue-unserved")].model_dump()
    )
    s = snap(
        Sample("queue_oldest_wait_s", {"model": "a"}, 500),
        Sample("queue_oldest_wait_s", {"model": "b"}, 500),
        Sample("queue_oldest_wait_s", {"model": "c"}, 5),
        Sample("pools_live", {"model": "a"}, 0),
        Sample("pools_live", {"model": "b"}, 2),
        Sample("pools_live", {"model": "c"}, 0),
    )
    assert [x.labels for x in active_series(r, s).values()] == [{"model": "a"}]
    any_rule = RuleSpec.model_validate({**r.model_dump(), "combine": "any"})
    # a and b wait, a and c have no pool: three label sets, a once
    assert sorted(x.labels["model"] for x in active_series(any_rule, s).values()) == ["a", "b", "c"]


def test_match_narrows_and_a_missing_sample_never_holds() -> None:
    r = RuleSpec.model_validate(
        rule(
            conditions=[
                {"metric": "queue_depth", "op": ">=", "threshold": 0, "match": {"model": "x"}}
            ]
        )
    )
    assert active_series(r, snap(Sample("queue_depth", {"model": "y"}, 3))) == {}
    assert len(active_series(r, snap(Sample("queue_depth", {"model": "x"}, 0)))) == 1


def test_the_alert_state_machine() -> None:
    p, f = AlertState.pending, AlertState.firing
    assert transitions(None, False, 0, 10) == ()
    assert transitions(None, True, 0, 10) == (p,)
    assert transitions(None, True, 0, 0) == (p, f)
    assert transitions(p, True, 5, 10) == ()
    assert transitions(p, True, 10, 10) == (f,)
    assert transitions(p, False, 5, 10) == (AlertState.inactive,)
    assert transitions(f, True, 99, 10) == ()
    assert transitions(f, False, 99, 10) == (AlertState.resolved,)


@given(st.floats(0, 1e6), st.floats(0, 1e6))
def test_notifications_repeat_only_after_the_cooldown(ago: float, cooldown: float) -> None:
    assert notify_due(ago, cooldown) == (ago >= cooldown)
    assert notify_due(None, cooldown)


def test_silences_match_a_rule_labels_or_both() -> None:
    labels = {"model": "a", "gpu": "h:0"}
    assert silenced(labels, "r", [{"rule_id": "r", "matchers": {}}])
    assert silenced(labels, "r", [{"rule_id": None, "matchers": {"model": "a"}}])
    assert not silenced(labels, "r", [{"rule_id": "other", "matchers": {}}])
    assert not silenced(labels, "r", [{"rule_id": "r", "matchers": {"model": "b"}}])


def test_slug() -> None:
    assert slug("  GPU memory > 80%  ") == "gpu-memory-80"
    assert slug("!!!") == "rule"
