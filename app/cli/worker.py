"""`corral worker`: check the model, then run a Celery prefork pool on its queue only."""

from __future__ import annotations

import os

from app.core.config import get_settings
from app.errors import ConfigError
from models.catalog import load_catalog
from models.gguf_info import read_gguf_info


def run_worker(model: str, *, gpu: str = "none", concurrency: int = 1) -> None:
    """Validate ``model`` and its GGUF (without llama.cpp), then start the worker."""
    settings = get_settings()
    settings.broker_url  # noqa: B018  (fail early with what to do)
    catalog = load_catalog(settings.catalog_path)
    entry = catalog.get(model)
    info = read_gguf_info(catalog.path_for(entry, settings.models_path))
    if gpu not in ("none", "auto") and not gpu.isdigit():
        raise ConfigError(f"--gpu must be 'none', 'auto' or a GPU index, got {gpu!r}")
    if gpu.isdigit():
        # Pin before llama.cpp initialises: the pool processes inherit this environment.
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu
        os.environ.setdefault("CORRAL_N_GPU_LAYERS", "-1")
    os.environ["CORRAL_WORKER_MODEL"] = entry.name

    from workers.celery_app import celery_app, queue_for

    print(
        f"corral worker: {entry.name} ({info.architecture}, {info.size_bytes / 1e6:.1f} MB, "
        f"n_ctx {entry.n_ctx}) on queue {queue_for(entry.name)}",
        flush=True,
    )
    celery_app.worker_main(
        [
            "worker",
            "-Q",
            queue_for(entry.name),
            "--pool",
            "prefork",
            "--concurrency",
            str(concurrency),
            "-n",
            f"{entry.name}.{os.getpid()}@%h",
            "--loglevel",
            settings.log_level,
            "--without-gossip",
            "--without-mingle",
            "-E",
        ]
    )
