"""The producer API: includes the routers, installs the error handler."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI
from fastapi.staticfiles import StaticFiles

from app.api import errors
from app.api.routes import (
    alerts,
    consolidation,
    conversations,
    gpus,
    health,
    memory,
    metrics,
    models,
    openai_compat,
    rules,
    workflows,
)
from app.core.process import freeze_startup_objects
from app.ui import routes as ui_routes
from app.workflows.events import FinishedListener


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    freeze_startup_objects()  # full collections then skip everything start-up made
    yield
    await app.state.finished.close()
    streams = getattr(app.state, "streams", None)
    if streams is not None:
        await streams.aclose()


def create_app() -> FastAPI:
    """Build the API on the settings in force."""
    app = FastAPI(
        title="Corral",
        version="0.1.0",
        description="Durable multi-step LLM workflows on per-model llama.cpp worker pools.",
        lifespan=_lifespan,
        dependencies=[Depends(errors.valid_params)],
    )
    app.state.finished = FinishedListener()  # wakes long-polling reads
    errors.install(app)
    app.mount("/ui/static", StaticFiles(directory=ui_routes.HERE / "static"), name="ui-static")
    routers = (
        health,
        metrics,
        workflows,
        models,
        openai_compat,
        gpus,
        conversations,
        consolidation,
        memory,
        rules,
        alerts,
        ui_routes,
    )
    for module in routers:
        app.include_router(module.router)
    return app
