"""`corral rules`, `corral alerts` and `corral health`: governance as tables, from the same
services the API calls."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from app.store.tables import AlertState

console = Console()

_STYLE = {"ok": "green", "degraded": "yellow", "down": "red", "unknown": "yellow"}


def _when(value: Any) -> str:
    return value.isoformat(timespec="seconds") if value is not None else ""


def _conditions(rule: dict[str, Any]) -> str:
    parts = []
    for c in rule["conditions"]:
        match = ",".join(f"{k}={v}" for k, v in c["match"].items())
        where = f"{{{match}}}" if match else ""
        window = f" over {c['window_s']:g}s" if c.get("window_s") else ""
        parts.append(f"{c['metric']}{where} {c['op']} {c['threshold']:g}{window}")
    return (" and " if rule["combine"] == "all" else " or ").join(parts)


def rules() -> None:
    """Governance rules: condition, for, cooldown, actions, enabled."""
    from app.governance.service import list_rules

    table = Table(title="rules")
    for col in ("id", "category", "severity", "condition", "for", "cooldown", "actions", "on"):
        table.add_column(col)
    for r in list_rules():
        table.add_row(
            r["id"],
            r["category"],
            r["severity"],
            _conditions(r),
            f"{r['for_s']:g}s",
            f"{r['cooldown_s']:g}s",
            ", ".join(a["type"] for a in r["actions"]),
            "yes" if r["enabled"] else "no",
        )
    console.print(table)


def alerts(
    state: Annotated[AlertState | None, typer.Option(help="Only alerts in this state.")] = None,
    limit: Annotated[int, typer.Option(min=1, max=500, help="At most this many.")] = 50,
) -> None:
    """Alerts, newest first: rule, severity, state, labels, value, since."""
    from app.governance.service import list_alerts

    table = Table(title="alerts")
    for col in ("id", "rule", "severity", "state", "labels", "value", "started", "ended"):
        table.add_column(col)
    for a in list_alerts(state, None, limit):
        table.add_row(
            a["id"][:12],
            a["rule"],
            a["severity"],
            a["state"],
            ",".join(f"{k}={v}" for k, v in a["labels"].items()),
            f"{a['value']:.4g}" if a["value"] is not None else "",
            _when(a["started_at"]),
            _when(a["ended_at"]),
        )
    console.print(table)


def health() -> None:
    """Overall health and each component's; exits 1 unless everything is ok."""
    from app.governance.health import health as read

    view = read()
    status = view["status"]
    console.print(f"health: [{_STYLE.get(status, 'white')}]{status}[/]")
    table = Table(title="components")
    for col in ("component", "status", "detail"):
        table.add_column(col)
    comps = view["components"]
    for name in ("database", "redis", "beat", "alerts"):
        c = comps[name]
        detail = ", ".join(f"{k}={v}" for k, v in c.items() if k != "status")
        table.add_row(name, f"[{_STYLE.get(c['status'], 'white')}]{c['status']}[/]", detail)
    for model, m in comps["models"].items():
        detail = (
            f"pools={m['pools_live']} queue={m['queue_depth']} "
            f"oldest={m['oldest_wait_s']}s"
            + (" paused" if m["paused"] else "")
            + (f" routed to {m['routed_to']}" if m["routed_to"] else "")
            + (f" ({m['reason']})" if m.get("reason") else "")
        )
        table.add_row(f"model {model}", f"[{_STYLE[m['status']]}]{m['status']}[/]", detail)
    for gpu, g in comps["gpus"].items():
        table.add_row(
            f"gpu {gpu}", f"[{_STYLE[g['status']]}]{g['status']}[/]", f"{g['utilization']:.0%}"
        )
    console.print(table)
    raise typer.Exit(0 if status == "ok" else 1)
