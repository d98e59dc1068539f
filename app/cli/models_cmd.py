"""`corral models`: list the catalog, pull a model, make the tiny test models."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from app.core.config import get_settings
from app.errors import CorralError
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
    try:
        path = do_pull(load_catalog(settings.catalog_path).get(name), settings.models_path)
    except CorralError as exc:
        Console(stderr=True).print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from exc
    console.print(f"{name}: {path}")


@app.command("make-tiny")
def make_tiny(
    force: Annotated[bool, typer.Option(help="Rewrite files that exist.")] = False,
) -> None:
    """Write the tiny deterministic GGUF models used by the tests and the demo."""
    from models.tiny import make_tiny as do_make

    for path in do_make(get_settings().models_path, force=force):
        console.print(f"wrote {path}")
