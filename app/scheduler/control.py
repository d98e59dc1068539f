"""Asking pools to act through Celery's remote control: release a GPU, pause or resume a
queue.

``corral_release`` is Corral's own command (``workers.control``): the pool refuses while a
step runs or is reserved, else releases its reservation and exits warmly.
``cancel_consumer`` and ``add_consumer`` are Celery's own: a pool stops or starts
consuming a queue, and what is on the queue waits there.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery

from app.scheduler import live
from app.workflows.names import queue_for

log = logging.getLogger(__name__)

RELEASE_COMMAND = "corral_release"
REPLY_TIMEOUT_S = 3.0


def release(app: Celery, node: str, reason: str) -> bool:
    """Ask the pool ``node`` (a Celery node name) to release its GPU and exit; whether it
    did (a busy pool refuses)."""
    try:
        replies = app.control.broadcast(
            RELEASE_COMMAND,
            arguments={"reason": reason},
            destination=[node],
            reply=True,
            timeout=REPLY_TIMEOUT_S,
        )
    except Exception as exc:  # kombu and redis errors alike: the pool was not asked
        log.warning("could not ask %s to release: %s", node, exc)
        return False
    return any(bool(r.get(node, {}).get("released")) for r in replies or [])


def model_nodes(model: str) -> list[str]:
    """The Celery nodes of ``model``'s live pools."""
    return sorted(
        {str(w["node"]) for w in live.live_workers() if w.get("model") == model and w.get("node")}
    )


def pause(app: Celery, model: str) -> list[str]:
    """Every live pool of ``model`` stops consuming its queue; the nodes that replied."""
    return _replied(
        app.control.cancel_consumer(queue_for(model), reply=True, timeout=REPLY_TIMEOUT_S)
    )


def resume(app: Celery, model: str) -> list[str]:
    """``model``'s live pools consume its queue again; the nodes that replied."""
    nodes = model_nodes(model)
    if not nodes:
        return []
    return _replied(
        app.control.add_consumer(
            queue_for(model), destination=nodes, reply=True, timeout=REPLY_TIMEOUT_S
        )
    )


def _replied(replies: list[dict[str, Any]] | None) -> list[str]:
    return sorted(node for reply in replies or [] for node in reply)
