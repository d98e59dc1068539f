"""Tables the CLI prints: status, GPUs, reservations, pending placements."""

from __future__ import annotations

from collections import Counter
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table
from sqlalchemy import func
from sqlmodel import select

from app.core.config import get_settings
from app.core.errors import CorralError, ServiceUnavailable
from app.core.redis import get_redis, ping
from app.scheduler import live, pools
from app.scheduler.inventory import format_bytes
from app.scheduler.service import gpus_view
from app.store import db
from app.store.tables import WorkflowRun
from app.workflows.names import queue_keys
from models.catalog import load_catalog


def print_gpus(console: Console) -> None:
    """`corral gpus`: the same as GET /v1/gpus, as tables."""
    view = gpus_view()
    table = Table(title="GPUs")
    for col in (
        "gpu",
        "name",
        "source",
        "total",
        "reported free",
        "reserved",
        "free",
        "reservations",
    ):
        table.add_column(col)
    for g in view["gpus"]:
        res = "; ".join(
            f"{r['model']} {format_bytes(r['bytes'])}{' (standing)' if r['standing'] else ''}"
            for r in g["reservations"]
        )
        table.add_row(
            g["key"],
            g["name"],
            g["source"],
            format_bytes(g["total_bytes"]),
            format_bytes(g["reported_free_bytes"]),
            format_bytes(g["reserved_bytes"]),
            format_bytes(g["free_bytes"]),
            res or "-",
        )
    console.print(table)
    if view["pending"]:
        waiting = Table(title="waiting for room")
        for col in ("pool", "model", "needs", "since", "reason"):
            waiting.add_column(col)
        for p in view["pending"]:
            waiting.add_row(
                p["holder"], p["model"], p["need"], f"{p['waiting_s']:.0f} s", p["reason"]
            )
        console.print(waiting)
    else:
        console.print("no pool is waiting for room")
    _print_fragmentation(console)


def _print_fragmentation(console: Console) -> None:
    """Beat's last fragmentation report: stranded memory per host, and the plans."""
    from app.scheduler.fragmentation import latest

    report = latest()
    if report is None:
        console.print("no fragmentation report yet (beat's corral.scheduler.cleanup makes one)")
        return
    hosts = Table(title="fragmentation (beat's last cleanup pass)")
    for col in ("host", "free", "stranded", "largest hole"):
        hosts.add_column(col)
    for h in report["hosts"]:
        hosts.add_row(
            h["host"],
            format_bytes(h["free"]),
            format_bytes(h["stranded"]),
            format_bytes(h["largest_hole"]),
        )
    console.print(hosts)
    for p in report["plans"]:
        moves = ", ".join(f"{m['model']} {m['from_gpu']}→{m['to_gpu']}" for m in p["moves"])
        where = ", ".join(k for k, _ in p["placement"])
        detail = p["reason"] or (f"after moving {moves}: " if moves else "") + where
        console.print(f"{p['model']} ({format_bytes(p['need_bytes'])}): {p['action']} {detail}")


# What to do when a service does not answer, after what the probe says.
_FIX = {
    "redis": "start it, or point CORRAL_REDIS_URL at a running Redis "
    "(`corral up` starts an embedded one)",
    "database": "check CORRAL_DATABASE_URL and that the database server is running",
}


def pool_states(view: dict[str, Any]) -> dict[str, str]:
    """Per model, its pools' states in a few words: ``idle 12 s, starting``, or why it waits."""
    out = {}
    for p in view["pools"]:
        parts = [
            f"idle {w['idle_s']:.0f} s" if w["state"] == "idle" and "idle_s" in w else w["state"]
            for w in p["workers"]
        ]
        parts += [s["state"] for s in p["starting"]]
        if not parts and p["waiting"]:
            parts.append(pools.waiting_reason(p["waiting"]))
        out[p["model"]] = ", ".join(parts)
    return out


def print_status(console: Console) -> int:
    """`corral status`: 0 when Redis and the database answer; otherwise each one's line
    says ``unavailable`` and ServiceUnavailable says why and what to do (the CLI prints
    it as one line on stderr)."""
    problems = []
    for name, probe in (("redis", ping), ("database", db.ping)):
        try:
            probe()
            console.print(f"{name:9} ok")
        except CorralError as exc:
            console.print(f"{name:9} [red]unavailable[/red]")
            fix = f"; {_FIX[name]}" if isinstance(exc, ServiceUnavailable) else ""
            problems.append(f"{exc}{fix}")
    if problems:
        raise ServiceUnavailable("; ".join(problems))
    settings = get_settings()
    workers = Counter(str(w.get("model")) for w in live.live_workers())
    states = pool_states(pools.pools_view())
    client = get_redis()
    table = Table(title="models")
    for col in ("model", "kind", "file", "workers", "queued", "pools"):
        table.add_column(col)
    for e in load_catalog(settings.catalog_path).entries:
        present = (settings.models_path / e.file).is_file()
        table.add_row(
            e.name,
            e.kind,
            "present" if present else "-",
            str(workers.get(e.name, 0)),
            str(sum(client.llen(k) for k in queue_keys(e.name))),
            escape(states.get(e.name, "")),
        )
    console.print(table)
    with db.session_scope() as session:
        counts = session.exec(
            select(WorkflowRun.status, func.count()).group_by(WorkflowRun.status)
        ).all()
    console.print("workflows " + (", ".join(f"{s}: {n}" for s, n in counts) or "none yet"))
    return 0
