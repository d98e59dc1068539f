"""`corral worker`: check the model, place it on a GPU (or the CPU), then run a Celery pool.

The placement happens before Celery starts and before llama.cpp initialises: the pool
processes inherit ``CUDA_VISIBLE_DEVICES``, and the model and its layer split as
``CORRAL_*`` settings, through the environment. Celery consumes with kombu's own Redis
transport. A model with one slot runs Celery's prefork pool (``--concurrency`` processes,
each with its own copy); a chat model with ``parallel`` slots runs the threads pool with
``parallel`` threads in one process that loads the model once and decodes their steps
together (:mod:`workers.batching`).
"""

from __future__ import annotations

import atexit
import json
import os

from app.core.config import get_settings, reload_settings
from app.core.errors import ConfigError, PlacementError, ServiceUnavailable
from app.core.redis import get_redis, ping
from app.scheduler.inventory import detect_inventory, format_bytes
from app.scheduler.placement import Placement
from app.scheduler.service import PoolScheduler
from app.workflows.names import queue_for
from models.catalog import load_catalog
from models.gguf_info import read_gguf_info
from workers.process import parallel_for


def run_worker(
    model: str,
    *,
    gpu: str = "auto",
    concurrency: int = 1,
    n_ctx: int | None = None,
    wait: bool = True,
    parallel: int | None = None,
) -> None:
    """Validate ``model`` and its GGUF (without llama.cpp), place it, then start the worker.

    ``parallel``: the sequences decoded at once (default: the catalog's ``parallel``).
    """
    settings = get_settings()
    settings.broker_url  # noqa: B018  (fail early with what to do)
    catalog = load_catalog(settings.catalog_path)
    entry = catalog.get(model)
    path = catalog.path_for(entry, settings.models_path)
    info = read_gguf_info(path)
    if gpu not in ("none", "auto") and not gpu.isdigit():
        raise ConfigError(f"--gpu must be 'none', 'auto' or a GPU index, got {gpu!r}")
    if n_ctx is not None and not 0 < n_ctx <= entry.context_length:
        raise ConfigError(
            f"--ctx must be between 1 and {entry.name}'s context_length {entry.context_length}, "
            f"got {n_ctx}"
        )
    if parallel is not None and parallel < 1:
        raise ConfigError(f"--parallel must be ≥ 1, got {parallel}")
    if parallel is not None and parallel > 1 and entry.kind == "embed":
        raise ConfigError(
            f"--parallel is for chat models; {entry.name} embeds: use --concurrency for copies"
        )
    slots = parallel_for(entry, parallel or settings.worker_parallel)
    if slots > 1 and concurrency != 1:
        raise ConfigError(
            f"--parallel {slots} decodes {slots} steps together in one process; use "
            "--concurrency 1 with it (or start more workers)"
        )
    try:  # the broker: an unreachable one is said now, not retried by Celery for minutes
        ping()
    except ServiceUnavailable as exc:
        raise ServiceUnavailable(
            f"{exc}; start it, or point CORRAL_REDIS_URL at a running Redis"
        ) from exc
    from workers import control
    from workers.celery_app import celery_app  # reads the settings: after the checks

    hostname = settings.host
    nodename = f"{entry.name}.{os.getpid()}@{hostname}"
    placement: Placement | None = None
    inventory = detect_inventory(settings.gpus, hostname) if gpu != "none" else None
    if gpu.isdigit() and (inventory is None or not inventory.gpus()):
        raise PlacementError(f"--gpu {gpu}: this host has no GPU", permanent=True)
    if inventory is not None and inventory.gpus():
        if concurrency != 1:
            raise ConfigError(
                "a GPU pool runs one model process per reservation: use --concurrency 1 and "
                "start more workers for more copies (or --gpu none for CPU pools)"
            )
        sched = PoolScheduler(
            settings,
            get_redis(),
            inventory,
            catalog,
            evict=lambda r: control.request_release(celery_app, r, f"needed by {entry.name}"),
        )
        placement = sched.acquire(
            entry, path, holder=nodename, gpu=gpu, n_ctx=n_ctx, wait=wait, parallel=slots
        )
        if placement is not None:
            _pin(placement)
            sched.keep(placement)
            atexit.register(sched.release, placement)
            control.hold(
                placement.reservations, lambda: sched.release(placement), queue_for(entry.name)
            )
    os.environ["CORRAL_WORKER_MODEL"] = entry.name
    os.environ["CORRAL_WORKER_NODE"] = nodename  # the pool processes announce it
    os.environ["CORRAL_WORKER_PARALLEL"] = str(slots)
    if n_ctx:
        os.environ["CORRAL_WORKER_CTX"] = str(n_ctx)
    # Settings are read once per process: read them again with the worker's own, which
    # the pool processes forked below inherit.
    reload_settings()
    where = "CPU"
    if placement is not None and placement.estimate is not None:
        gpus = ",".join(map(str, placement.indices))
        where = f"GPU {gpus} ({format_bytes(placement.estimate.total_bytes)} reserved)"
    print(
        f"corral worker: {entry.name} ({info.architecture}, {info.size_bytes / 1e6:.1f} MB, "
        f"n_ctx {n_ctx or entry.n_ctx}, {slots} slot(s)) on queue {queue_for(entry.name)}, "
        f"{where}",
        flush=True,
    )
    celery_app.worker_main(
        [
            "worker",
            "-Q",
            queue_for(entry.name),
            "--pool",
            "threads" if slots > 1 else "prefork",
            "--concurrency",
            str(slots if slots > 1 else concurrency),
            "-n",
            nodename,
            "--loglevel",
            settings.log_level,
            "--without-gossip",
            "--without-mingle",
        ]
    )


def _pin(placement: Placement) -> None:
    """Pin the pool to its GPUs before llama.cpp initialises (the children inherit this)."""
    os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in placement.indices)
    os.environ["CORRAL_N_GPU_LAYERS"] = "-1"
    os.environ["CORRAL_MAIN_GPU"] = "0"  # indices are renumbered from 0 after pinning
    if placement.split:
        os.environ["CORRAL_TENSOR_SPLIT"] = json.dumps(list(placement.split))
    os.environ["CORRAL_RESERVATIONS"] = json.dumps(
        [{"id": r.id, "host": r.host, "gpu": r.gpu} for r in placement.reservations]
    )


__all__ = ["PlacementError", "run_worker"]
