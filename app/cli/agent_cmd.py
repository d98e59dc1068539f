"""`corral agent`: the host agent (see :mod:`app.scheduler.agent`)."""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType
from typing import Annotated

import typer

from app.core.config import get_settings
from app.core.errors import ConfigError, ServiceUnavailable
from app.core.redis import get_redis, ping
from app.scheduler.agent import Agent
from app.scheduler.inventory import detect_inventory, format_bytes
from app.workflows.dispatch import producer
from models.catalog import load_catalog


def agent(
    model: Annotated[
        list[str] | None,
        typer.Option(help="Only this model (repeatable; default: every model present here)."),
    ] = None,
) -> None:
    """Run the host agent: start pools when steps wait, unload idle ones, carry out cleanup."""
    settings = get_settings()
    logging.basicConfig(
        level=settings.log_level, format="[%(asctime)s: %(levelname)s/%(name)s] %(message)s"
    )
    catalog = load_catalog(settings.catalog_path)
    for name in model or []:
        catalog.get(name)  # an unknown name fails here, naming the catalog's models
    present = {e.name for e in catalog.present(settings.models_path)}
    missing = sorted(set(model or []) - present)
    if missing:
        raise ConfigError(
            f"--model {', '.join(missing)}: no GGUF in {settings.models_path}; "
            "run `corral models pull NAME` first"
        )
    try:
        ping()
    except ServiceUnavailable as exc:
        raise ServiceUnavailable(
            f"{exc}; start it, or point CORRAL_REDIS_URL at a running Redis"
        ) from exc
    inventory = detect_inventory(settings.gpus, settings.host)
    gpus = inventory.gpus()
    where = ", ".join(f"GPU {g.index} ({format_bytes(g.total_bytes)})" for g in gpus) or "CPU"
    models = sorted(set(model) if model else present)
    print(
        f"corral agent: host {settings.host}, {where}; models {', '.join(models) or 'none'}; "
        f"keep-alive {settings.keep_alive_s:g} s",
        flush=True,
    )
    stop = threading.Event()

    def on_signal(_signum: int, _frame: FrameType | None) -> None:
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, on_signal)
    Agent(settings, catalog, get_redis(), inventory, producer(), models=model or None).run(stop)
