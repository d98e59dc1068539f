"""The producer API: includes the routers, installs the error handler."""

from __future__ import annotations

from fastapi import FastAPI

from app.api import errors
from app.api.routes import health, models, workflows
from app.dispatch import CeleryDispatcher
from app.engine import Dispatcher


def create_app(dispatcher: Dispatcher | None = None) -> FastAPI:
    """Build the API; ``dispatcher`` defaults to Celery on the settings' Redis."""
    app = FastAPI(
        title="Corral",
        version="0.1.0",
        description="Durable multi-step LLM workflows on per-model llama.cpp worker pools.",
    )
    if dispatcher is None:
        from workers.celery_app import celery_app

        dispatcher = CeleryDispatcher(celery_app)
    app.state.dispatcher = dispatcher
    errors.install(app)
    app.include_router(health.router)
    app.include_router(workflows.router)
    app.include_router(models.router)
    return app
