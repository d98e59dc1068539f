"""`corral models`: list the catalog, pull a model, make the tiny test models.

Errors (an unknown model, a missing or corrupt file, a failed download) propagate to the
CLI's entry point, :func:`app.cli.main.main`, which prints them as one line and exits 2.
"""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from app.core.config import get_settings
from models.catalog import load_catalog

app = typer.Typer(help="The model catalog and model files.", no_args_is_help=True)
console = Console()


@app.command("list")
def list_models() -> None:
    """Catalog models, their context, and whether their file is present."""
    settings = get_settings()
    catalog = load_catalog(settings.catalog_path)
    table = Table(title=f"models in {settings.models_path}")
    for col in ("name", "kind", "n_ctx", "size", "present", "file"):
        table.add_column(col)
    for e in catalog.entries:
        present = catalog.path_for(e, settings.models_path).is_file()
        size = f"{e.size_bytes / 1e9:.2f} GB" if e.size_bytes else "?"
        table.add_row(e.name, e.kind, str(e.n_ctx), size, "yes" if present else "no", e.file)
    console.print(table)


@app.command()
def pull(name: Annotated[str, typer.Argument(help="Catalog name.")]) -> None:
    """Download a model with resume, size and sha256 checks."""
    from models.pull import pull as do_pull

    settings = get_settings()
    path = do_pull(load_catalog(settings.catalog_path).get(name), settings.models_path)
    console.print(f"{name}: {path}")


@app.command("make-tiny")
def make_tiny(
    force: Annotated[bool, typer.Option(help="Rewrite files that exist.")] = False,
) -> None:
    """Write the tiny deterministic GGUF models used by the tests and the demo."""
    from models.tiny import make_tiny as do_make

    for path in do_make(get_settings().models_path, force=force):
        console.print(f"wrote {path}")


@app.command()
def estimate(
    name: Annotated[str, typer.Argument(help="Catalog name (its GGUF must be present).")],
    ctx: Annotated[int | None, typer.Option(help="Context (default: the catalog's n_ctx).")] = None,
    parallel: Annotated[int, typer.Option(min=1, help="Parallel sequences.")] = 1,
    gpus: Annotated[
        str | None,
        typer.Option(help="Split across GPUs of these sizes, e.g. '8GiB,8GiB'."),
    ] = None,
) -> None:
    """Print the GPU memory a model needs, part by part, read from its GGUF header."""
    from app.scheduler.estimate import estimate as do_estimate
    from app.scheduler.estimate import plan_split
    from app.scheduler.inventory import format_bytes, parse_bytes
    from app.scheduler.service import estimate_for

    settings = get_settings()
    catalog = load_catalog(settings.catalog_path)
    entry = catalog.get(name)
    est = estimate_for(
        settings, catalog.path_for(entry, settings.models_path), ctx or entry.n_ctx, parallel
    )
    sizes = [parse_bytes(g) for g in gpus.split(",")] if gpus else []
    if len(sizes) > 1:
        split = plan_split(est, sizes)
        if split is None:
            Console(stderr=True, soft_wrap=True).print(
                f"[red]does not fit[/red]: needs {format_bytes(est.total_bytes)} on one GPU; "
                f"no split over {gpus} holds it"
            )
            raise typer.Exit(1)
        est = do_estimate(
            est.shape,
            est.n_ctx,
            parallel=parallel,
            cache_type=est.cache_type,
            flash_attention=est.flash_attention,
            overhead_bytes=est.overhead_bytes,
            split=split,
        )
    table = Table(title=f"{name} at n_ctx {est.n_ctx} × {parallel}")
    table.add_column("part")
    table.add_column("bytes", justify="right")
    table.add_column("", justify="right")
    for label, n in est.breakdown():
        table.add_row(label, str(n), format_bytes(n))
    if est.split:
        for i, (layers, n) in enumerate(zip(est.split, est.per_gpu_bytes(), strict=True)):
            table.add_row(f"GPU {i}: {layers} layers", str(n), format_bytes(n))
    console.print(table)
