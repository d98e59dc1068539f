"""`corral memory`: consolidation runs, from the same service the API calls."""

from __future__ import annotations

import time
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(help="Conversation memory: consolidation into long-term memory.")
console = Console()

_COLUMNS = ("id", "trigger", "status", "started", "finished", "planned", "done", "facts")


def _row(run: dict[str, Any]) -> tuple[str, ...]:
    def when(value: Any) -> str:
        return value.isoformat(timespec="seconds") if value is not None else ""

    return (
        run["id"][:12],
        run["trigger"],
        run["status"],
        when(run["started_at"]),
        when(run["finished_at"]),
        str(run["planned"]),
        str(run["conversations"]),
        f"{run['facts']} (+{run['merged']} merged)",
    )


def _table(title: str, runs: list[dict[str, Any]]) -> Table:
    table = Table(title=title)
    for col in _COLUMNS:
        table.add_column(col)
    for run in runs:
        table.add_row(*_row(run))
    return table


@app.command()
def consolidate(
    idle_s: Annotated[
        float | None,
        typer.Option(
            min=0, help="Conversations quiet this long (default CORRAL_CONSOLIDATE_IDLE_S)."
        ),
    ] = None,
    max_items: Annotated[
        int | None, typer.Option(min=1, help="At most this many conversations.")
    ] = None,
    model: Annotated[
        str | None, typer.Option(help="The chat model (default CORRAL_CONSOLIDATE_MODEL).")
    ] = None,
    wait: Annotated[bool, typer.Option(help="Wait until the run has finished.")] = True,
    timeout_s: Annotated[float, typer.Option(min=1, help="How long --wait waits.")] = 600.0,
) -> None:
    """Start a consolidation run now (whatever CORRAL_CONSOLIDATE_WINDOW says)."""
    from app.core.errors import SpecError
    from app.memory import consolidate as service

    try:
        started = service.start("manual", idle_s=idle_s, max_items=max_items, model=model)
    except SpecError as exc:
        console.print(f"[red]error[/]: --model: {exc.errors[0].msg}")
        raise typer.Exit(2) from exc
    assert started is not None  # a manual run is always recorded
    run = started
    deadline = time.monotonic() + timeout_s
    while wait and run["status"] == "running" and time.monotonic() < deadline:
        time.sleep(1.0)
        run = service.get_run(run["id"])
    console.print(_table("consolidation run", [run]))
    for error in run["errors"]:
        console.print(f"[red]error[/]: {error}")
    if run["status"] == "running" and wait:
        console.print(f"still running after {timeout_s:g} s; see `corral memory consolidations`")
        raise typer.Exit(1)
    raise typer.Exit(1 if run["status"] == "failed" else 0)


@app.command()
def consolidations(
    limit: Annotated[int, typer.Option(min=1, max=500, help="At most this many.")] = 20,
) -> None:
    """Consolidation runs, newest first."""
    from app.memory import consolidate as service

    console.print(_table("consolidation runs", service.list_runs(limit)))
