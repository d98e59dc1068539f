"""A model worker process's lifecycle: load the model after the fork, heartbeat, unload.

``corral worker --model NAME`` sets ``CORRAL_WORKER_MODEL``, ``CORRAL_WORKER_PARALLEL`` (and
the placement's settings) and starts Celery. With one slot it runs the prefork pool: each
pool process reads the settings from :func:`get_settings`, loads the GGUF once in
``worker_process_init`` (after the fork, never at import) and announces itself in Redis
while it lives. With ``parallel`` slots it runs Celery's threads pool with ``parallel``
threads in one process, which loads the model once (a :class:`BatchingRuntime`) in
``worker_init`` (the prefork hook does not fire for threads) and records the steps it runs
(:mod:`workers.inflight`), so that they come back if the process dies.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any

from celery.signals import (
    task_postrun,
    task_received,
    worker_init,
    worker_process_init,
    worker_process_shutdown,
    worker_ready,
    worker_shutdown,
)

from app.core.config import Settings, get_settings
from app.core.errors import ModelFileError
from app.core.process import freeze_startup_objects
from app.core.redis import get_redis
from app.scheduler import live
from app.store import db
from app.workflows import routing
from app.workflows.names import STEP_TASK, queue_for
from models.catalog import CatalogEntry, load_catalog
from workers import inflight
from workers.runtime import LlamaCppRuntime, ModelRuntime, Placement

log = logging.getLogger(__name__)


class _State:
    runtime: ModelRuntime | None = None
    error: str | None = None
    worker_id: str = ""
    info: dict[str, Any] = {}  # noqa: RUF012
    stop = threading.Event()
    lock = threading.Lock()
    active = 0  # tasks running now (a threads pool runs up to `parallel`)
    tags: dict[str, str] = {}  # noqa: RUF012  (task id -> delivery tag, threads pool)


def worker_model() -> str | None:
    """The model this worker process serves (``CORRAL_WORKER_MODEL``), if any."""
    return get_settings().worker_model or None


def placement_from_settings(settings: Settings) -> Placement:
    """Where to put the model, as the scheduler (or the defaults) decided."""
    return Placement(
        n_gpu_layers=settings.n_gpu_layers,
        main_gpu=settings.main_gpu,
        tensor_split=list(settings.tensor_split) if settings.tensor_split else None,
        n_threads=settings.n_threads,
    )


def parallel_for(entry: CatalogEntry, requested: int | None = None) -> int:
    """The sequences a pool of ``entry`` decodes at once: ``requested`` (``--parallel``),
    else the catalog's ``parallel``; always 1 for embedding models."""
    return 1 if entry.kind == "embed" else requested or entry.parallel


def threaded() -> bool:
    """Whether this worker runs Celery's threads pool (a model with several slots)."""
    return (get_settings().worker_parallel or 1) > 1


def load_runtime(name: str) -> ModelRuntime:
    """Load ``name`` from the models directory into llama.cpp: a :class:`BatchingRuntime`
    for a chat model with several slots, else a :class:`LlamaCppRuntime`."""
    settings = get_settings()
    catalog = load_catalog(settings.catalog_path)
    entry = catalog.get(name)
    path = catalog.path_for(entry, settings.models_path)
    parallel = parallel_for(entry, settings.worker_parallel)
    if parallel > 1:
        from workers.batching import BatchingRuntime

        return BatchingRuntime(
            entry, path, placement_from_settings(settings), settings.worker_ctx, parallel
        )
    return LlamaCppRuntime(
        entry, path, placement_from_settings(settings), n_ctx=settings.worker_ctx
    )


def _mark_loaded() -> None:
    """Tell the ledger the reserved memory is now in use (the driver's figure counts it)."""
    settings = get_settings()
    if not settings.reservations:
        return
    from app.scheduler.ledger import Reservation
    from app.scheduler.service import make_ledger

    held = [
        Reservation(id=r.id, host=r.host, gpu=r.gpu, model="", holder="", bytes=0)
        for r in settings.reservations
    ]
    make_ledger(settings, get_redis()).mark_loaded(held)


def get_runtime() -> ModelRuntime:
    """This process's loaded model (loading it now if the init hook did not)."""
    if _State.runtime is None:
        name = worker_model()
        if name is None:
            raise ModelFileError("this process serves no model; set CORRAL_WORKER_MODEL")
        if _State.error is not None:
            raise ModelFileError(_State.error)
        _State.runtime = load_runtime(name)
    return _State.runtime


def _announce() -> None:
    try:
        live.register_worker(_State.worker_id, _State.info, get_settings().worker_heartbeat_s * 3)
    except Exception as exc:  # Redis down: keep trying, the worker keeps working.
        log.warning("heartbeat failed: %s", exc)


def _restore_orphans() -> None:
    """Hand back the steps of this model's pool processes that died running them."""
    name = worker_model()
    if name is None:
        return
    try:
        from workers.celery_app import celery_app

        inflight.restore_orphans(name, celery_app)
    except Exception as exc:  # Redis down: the next beat tries again
        log.warning("could not look for the steps of dead pools: %s", exc)


def _heartbeat() -> None:
    while not _State.stop.wait(get_settings().worker_heartbeat_s):
        _announce()
        _restore_orphans()


def pool_id() -> str:
    """This pool process's id (``model@host:pid``; empty until it has loaded its model)."""
    return _State.worker_id


def set_busy(busy: bool) -> None:
    """Count a task starting (``True``) or ending (``False``) in the heartbeat: ``busy``
    while any runs (issue #3 never evicts busy pools), and how many run (``active``)."""
    with _State.lock:
        _State.active = max(0, _State.active + (1 if busy else -1))
        _State.info["active"] = _State.active
        _State.info["busy"] = _State.active > 0
        if not busy:
            _State.info["steps_done"] = int(_State.info.get("steps_done", 0)) + 1
            if _State.active == 0:
                _State.info["idle_since"] = time.time()


@worker_init.connect  # type: ignore[untyped-decorator]
def _on_worker_init(**_: Any) -> None:
    # Celery's parent, before it forks the pool: the children inherit the frozen objects.
    freeze_startup_objects()
    if threaded():  # no fork comes: this process serves the model itself
        _on_process_init()


@worker_ready.connect  # type: ignore[untyped-decorator]
def _on_ready(sender: Any = None, **_: Any) -> None:
    # Celery's parent, consuming: a pool that starts while its model's queue is paused
    # (governance's pause_queue) stops consuming until resume_queue adds it back.
    name = worker_model()
    if name is None or sender is None:
        return
    try:
        if routing.is_paused(name):
            sender.cancel_task_queue(queue_for(name))
            log.warning("queue %s is paused: this pool consumes nothing until resumed", name)
    except Exception as exc:  # Redis down: consume as usual
        log.warning("could not read whether %s is paused: %s", name, exc)


@worker_process_init.connect  # type: ignore[untyped-decorator]
def _on_process_init(**_: Any) -> None:
    """Load the model in this pool process and announce it (prefork: after the fork)."""
    name = worker_model()
    if name is None:
        return
    db.dispose_engines()
    try:
        runtime = load_runtime(name)
    except Exception as exc:
        _State.error = f"worker could not load model {name!r}: {exc}"
        log.error("%s", _State.error)
        return
    _State.runtime = runtime
    try:
        _mark_loaded()
    except Exception as exc:
        log.warning("could not mark the reservation loaded: %s", exc)
    reservations = get_settings().reservations
    host = get_settings().host
    _State.worker_id = f"{name}@{host}:{os.getpid()}"
    _State.info = {
        "worker": _State.worker_id,
        "model": name,
        "host": host,
        "pid": os.getpid(),
        "n_ctx": runtime.n_ctx,
        "load_ms": round(getattr(runtime, "load_ms", 0.0), 1),
        "started_at": time.time(),
        "busy": False,
        "active": 0,
        "parallel": getattr(runtime, "parallel", 1),
        "idle_since": time.time(),
        # The Celery node this process belongs to: remote control (release, pause) names it.
        "node": os.environ.get("CORRAL_WORKER_NODE", ""),
        "gpus": os.environ.get("CUDA_VISIBLE_DEVICES", "") if reservations else "",
        "reservations": [r.model_dump() for r in reservations],
        "steps_done": 0,
        # What the loading made is frozen too; full collections walk only what comes later.
        "gc_frozen": freeze_startup_objects(),
    }
    # Announced before this process takes its first step: a submit that follows a step's
    # result sees the pool (and the context it serves), never a gap before the first beat.
    _announce()
    _restore_orphans()
    threading.Thread(target=_heartbeat, name="corral-heartbeat", daemon=True).start()


@task_received.connect  # type: ignore[untyped-decorator]
def _on_task_received(request: Any = None, **_: Any) -> None:
    # Threads pool: this process runs the step it received; record its message.
    if not threaded() or request is None or request.name != STEP_TASK or not _State.worker_id:
        return
    tag = str(request.message.delivery_tag)
    _State.tags[request.id] = tag
    try:
        inflight.started(worker_model() or "", _State.worker_id, tag)
    except Exception as exc:  # Redis down: kombu's visibility timeout still hands it back
        log.warning("could not record step message %s: %s", tag, exc)


@task_postrun.connect  # type: ignore[untyped-decorator]
def _on_task_postrun(task_id: str = "", **_: Any) -> None:
    tag = _State.tags.pop(task_id, None)
    if tag is None:
        return
    try:
        inflight.finished(_State.worker_id, tag)
    except Exception as exc:
        log.warning("could not forget step message %s: %s", tag, exc)


@worker_shutdown.connect  # type: ignore[untyped-decorator]
def _on_worker_shutdown(**_: Any) -> None:
    if threaded():
        _on_process_shutdown()


@worker_process_shutdown.connect  # type: ignore[untyped-decorator]
def _on_process_shutdown(**_: Any) -> None:
    _State.stop.set()
    if _State.worker_id:
        try:
            live.unregister_worker(_State.worker_id)
            if threaded():  # a warm shutdown handed its unacknowledged messages back
                inflight.forget_pool(worker_model() or "", _State.worker_id)
        except Exception as exc:
            log.warning("could not unregister %s: %s", _State.worker_id, exc)
    if _State.runtime is not None:
        _State.runtime.close()
        _State.runtime = None
