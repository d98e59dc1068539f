"""Bare Celery, the baseline: the same llama.cpp call as a plain Celery task, nothing else.

The worker is started by the benchmark as::

    celery -A benchmarks.bare:app worker -Q bench.bare --pool prefork --concurrency N

with ``CORRAL_BENCH_BROKER_URL`` (the same Redis as Corral's), ``CORRAL_BENCH_MODEL_PATH``
and ``CORRAL_BENCH_N_CTX``. Each pool process loads the GGUF once after the fork, as
Corral's worker does. Delivery settings match Corral's (JSON, ``acks_late``, prefetch 1,
``reject_on_worker_lost``); results go to a Redis result backend, which is how a bare
Celery client learns that a task finished (and what chords need).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from celery import Celery
from celery.signals import worker_process_init

from benchmarks.work import GenCall, complete, load_llama

BROKER_ENV = "CORRAL_BENCH_BROKER_URL"
MODEL_ENV = "CORRAL_BENCH_MODEL_PATH"
N_CTX_ENV = "CORRAL_BENCH_N_CTX"
QUEUE = "bench.bare"
GENERATE = "bench.generate"


def make_app(broker_url: str) -> Celery:
    """The baseline's Celery app on ``broker_url`` (also its result backend)."""
    app = Celery("corral-bench-bare", broker=broker_url, backend=broker_url, set_as_current=False)
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_default_queue=QUEUE,
        broker_connection_retry_on_startup=True,
        result_expires=3600,
        worker_hijack_root_logger=False,
    )
    app.task(name=GENERATE)(generate)
    return app


class _State:
    llm: Any = None


def generate(call: dict[str, Any]) -> dict[str, Any]:
    """Run one completion on this process's model; the fields a client would need."""
    if _State.llm is None:
        _load()
    out = complete(_State.llm, GenCall(**call))
    return {"text": out["choices"][0]["text"], "usage": out["usage"]}


@worker_process_init.connect  # type: ignore[untyped-decorator]
def _load(**_: Any) -> None:
    path = os.environ.get(MODEL_ENV)
    if path:
        _State.llm = load_llama(Path(path), int(os.environ.get(N_CTX_ENV, "8192")))


app = make_app(os.environ.get(BROKER_ENV, "redis://127.0.0.1:6379/0"))
