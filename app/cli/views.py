"""Tables the CLI prints: GPUs, reservations, pending placements."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from app.api.routes.gpus import gpus_view
from app.scheduler.inventory import format_bytes


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
