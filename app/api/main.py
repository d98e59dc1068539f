"""The producer API: includes the routers, installs the error handler."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from app import loopdb
from app.api import errors
from app.api.routes import conversations, gpus, health, memory, metrics, models, workflows
from app.core.process import freeze_startup_objects
from app.dispatch import CeleryDispatcher
from app.engine import AsyncDispatcher, Dispatcher
from app.notify import FinishedListener


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    freeze_startup_objects()  # full collections then skip everything start-up made
    yield
    await app.state.finished.close()
    await loopdb.close_loop()
    if isinstance(app.state.dispatcher, CeleryDispatcher):
        await app.state.dispatcher.aclose()


def create_app(dispatcher: Dispatcher | None = None) -> FastAPI:
    """Build the API; ``dispatcher`` defaults to Celery on the settings' Redis."""
    app = FastAPI(
        title="Corral",
        version="0.1.0",
        description="Durable multi-step LLM workflows on per-model llama.cpp worker pools.",
        lifespan=_lifespan,
    )
    if dispatcher is None:
        from workers.celery_app import celery_app

        dispatcher = CeleryDispatcher(celery_app)
    app.state.dispatcher = dispatcher
    app.state.async_dispatcher = dispatcher if isinstance(dispatcher, AsyncDispatcher) else None
    app.state.finished = FinishedListener()  # wakes long-polling reads
    errors.install(app)
    app.include_router(health.router)
    app.include_router(metrics.router)
    app.include_router(workflows.router)
    app.include_router(models.router)
    app.include_router(gpus.router)
    app.include_router(conversations.router)
    app.include_router(memory.router)
    return app
