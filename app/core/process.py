"""Set-up shared by Corral's long-running processes (the API, model worker pools).

A long-running process holds some 180,000 objects from its imports and start-up (modules,
FastAPI's routes and models, SQLAlchemy's metadata, Celery's app) that live until it
exits. CPython's cyclic garbage collector walks every one of them at each full
collection: 120–150 ms in an API process on a 2-vCPU host, during which its event loop
serves nothing; one came in 10,000 submits (``python -m benchmarks.api_cost``: the
long-lived survivors of the young generations trigger it). :func:`freeze_startup_objects`
moves them to the collector's permanent generation once start-up is done, so a full
collection walks only what came after (under 4 ms in the same run).
"""

from __future__ import annotations

import gc


def freeze_startup_objects() -> int:
    """Collect once, then freeze every object alive now; returns how many are frozen.

    The collection first: what is frozen is never collected, so start-up's garbage must
    not be among it. Call it when start-up is done (after a model worker has loaded its
    model), and in a parent just before it forks (its children then share those pages
    instead of copying them when the collector would have touched them).
    """
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


def gc_metrics() -> list[str]:
    """This process's collector, in Prometheus' text format (``python_gc_*`` as the
    official client names them, and Corral's frozen count)."""
    lines = [
        "# HELP python_gc_collections_total Garbage collections by generation.",
        "# TYPE python_gc_collections_total counter",
    ]
    stats = gc.get_stats()
    for gen, s in enumerate(stats):
        lines.append(f'python_gc_collections_total{{generation="{gen}"}} {s["collections"]}')
    lines += [
        "# HELP python_gc_objects_collected_total Objects collected, by generation.",
        "# TYPE python_gc_objects_collected_total counter",
    ]
    for gen, s in enumerate(stats):
        lines.append(f'python_gc_objects_collected_total{{generation="{gen}"}} {s["collected"]}')
    lines += [
        "# HELP corral_gc_frozen_objects Start-up objects the collector no longer walks.",
        "# TYPE corral_gc_frozen_objects gauge",
        f"corral_gc_frozen_objects {gc.get_freeze_count()}",
    ]
    return lines
