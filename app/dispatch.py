"""Sending ready steps to their model's Celery queue (always after the commit)."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from celery import Celery
from kombu.exceptions import OperationalError as KombuOperationalError
from redis.exceptions import RedisError

from app import engine, live
from app.engine import Dispatch

log = logging.getLogger(__name__)


class CeleryDispatcher:
    """Publishes ``corral.step.run(step_run_id, attempt)`` on ``model.<name>``."""

    def __init__(self, celery: Celery) -> None:
        self.celery = celery

    def send(self, dispatches: Sequence[Dispatch]) -> None:
        from workers.celery_app import STEP_TASK, queue_for

        sent: list[str] = []
        try:
            for d in dispatches:
                self.celery.send_task(
                    STEP_TASK,
                    args=[d.step_run_id, d.attempt],
                    queue=queue_for(d.model),
                    countdown=d.countdown or None,
                )
                sent.append(d.step_run_id)
        except (KombuOperationalError, RedisError, OSError) as exc:
            # The steps stay `queued` with no dispatched_at; the reconciler sends them later.
            # They are committed; a broker outage delays them, it does not lose them.
            log.warning(
                "could not enqueue %d step(s), the reconciler will: %s",
                len(dispatches) - len(sent),
                exc,
            )
        finally:
            if sent:
                # Conditional on the attempt sent: never marks a later retry that was not.
                attempts = {d.step_run_id: d.attempt for d in dispatches if d.step_run_id in sent}
                engine.mark_dispatched(
                    sent, self._without_pool(dispatches, sent), attempts=attempts
                )

    @staticmethod
    def _without_pool(dispatches: Sequence[Dispatch], sent: list[str]) -> list[str]:
        """Sent steps whose model has no live worker right now."""
        try:
            live_models = {w.get("model") for w in live.live_workers(max_age_s=1.0)}
        except (RedisError, OSError):
            return []
        return [
            d.step_run_id
            for d in dispatches
            if d.step_run_id in sent and d.model not in live_models
        ]
