"""Remote control for model pools: ``corral_release`` asks an idle pool to give up its GPU.

A higher-priority placement sends it (Celery remote control, to one worker by name). The
worker refuses while a step runs or is reserved — a busy pool is never evicted — otherwise
it stops consuming, releases its reservation and shuts down warmly: it sets Celery's own
stop flag (what its SIGTERM handler sets), which the consumer's loop acts on after this
command has replied.
"""

from __future__ import annotations

import logging
from typing import Any

from celery.platforms import EX_OK
from celery.worker import state as worker_state
from celery.worker.control import control_command

from app.scheduler import control
from app.scheduler.ledger import Reservation

log = logging.getLogger(__name__)


class _Held:
    reservations: list[Reservation] = []  # noqa: RUF012
    release: Any = None  # callable releasing the reservations
    queue: str = ""


def hold(reservations: list[Reservation], release: Any, queue: str) -> None:
    """Record what this worker holds, for the release command."""
    _Held.reservations, _Held.release, _Held.queue = reservations, release, queue


@control_command(args=[("reason", str)], signature="[reason]")  # type: ignore[untyped-decorator]
def corral_release(state: Any, reason: str = "") -> dict[str, Any]:
    """Release this pool's GPU reservation and exit, unless it is running a step."""
    if worker_state.active_requests or worker_state.reserved_requests:
        return {"released": False, "reason": "busy: a step is running or reserved"}
    if _Held.queue:
        state.consumer.cancel_task_queue(_Held.queue)
    if worker_state.active_requests or worker_state.reserved_requests:
        state.consumer.add_task_queue(_Held.queue)
        return {"released": False, "reason": "busy: a step arrived"}
    if _Held.release is not None:
        _Held.release()
    log.warning(
        "evicted (%s): released %d reservation(s), shutting down", reason, len(_Held.reservations)
    )
    worker_state.should_stop = EX_OK
    return {"released": True}


def request_release(celery_app: Any, reservation: Reservation, reason: str) -> bool:
    """Ask the worker holding ``reservation`` to release it; True if it did."""
    return control.release(celery_app, reservation.holder, reason)
