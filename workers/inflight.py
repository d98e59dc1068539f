"""The steps a pool process is running, recorded in Redis so that they come back if it dies.

With ``acks_late`` a step's message stays in kombu's unacknowledged set while it runs.
Celery's prefork parent hands a dead child's messages back at once
(``task_reject_on_worker_lost``); a parallel pool runs Celery's threads pool in one
process, with no parent to do that, and kombu's Redis transport restores the messages of
a consumer that vanished only after the visibility timeout (longer than any step may run).
So each pool process records the delivery tags of the steps it runs under
``corral:inflight:<pool id>`` (and its id under ``corral:inflight-pools:<model>``), and
each pool of the model, when it starts and on every heartbeat, hands back the messages
recorded by pool processes whose heartbeat is gone, with kombu's own
``QoS.restore_by_tag``. A message already acknowledged, or handed back already, is no
longer unacknowledged, and handing it back again does nothing.
"""

from __future__ import annotations

import logging
from typing import Any

from app.core.config import get_settings
from app.core.redis import get_redis
from app.scheduler.live import WORKER_KEY

log = logging.getLogger(__name__)

INFLIGHT_KEY = "corral:inflight:{pool}"
POOLS_KEY = "corral:inflight-pools:{model}"


def _ttl_s() -> int:
    # Past the visibility timeout kombu hands the messages back by itself.
    return int(get_settings().max_step_timeout_s + 600)


def started(model: str, pool: str, tag: str) -> None:
    """Record that ``pool`` (a pool process of ``model``) runs the message ``tag``."""
    pipe = get_redis().pipeline()
    key = INFLIGHT_KEY.format(pool=pool)
    pipe.sadd(key, tag)
    pipe.expire(key, _ttl_s())
    pipe.sadd(POOLS_KEY.format(model=model), pool)
    pipe.execute()


def finished(pool: str, tag: str) -> None:
    """Forget the message ``tag`` of ``pool`` (its step ended; Celery acknowledges it next)."""
    get_redis().srem(INFLIGHT_KEY.format(pool=pool), tag)


def forget_pool(model: str, pool: str) -> None:
    """Forget ``pool`` (a clean exit: its unacknowledged messages went back with it)."""
    pipe = get_redis().pipeline()
    pipe.delete(INFLIGHT_KEY.format(pool=pool))
    pipe.srem(POOLS_KEY.format(model=model), pool)
    pipe.execute()


def restore_orphans(model: str, celery_app: Any) -> int:
    """Hand back the messages of ``model``'s pool processes that died running them;
    returns how many tags were handed back (or found acknowledged already)."""
    client = get_redis()
    restored = 0
    for raw in client.smembers(POOLS_KEY.format(model=model)):
        pool = raw.decode() if isinstance(raw, bytes) else str(raw)
        if client.exists(WORKER_KEY.format(hostname=pool)):
            continue  # alive (or not announced yet: its heartbeat key comes with its load)
        key = INFLIGHT_KEY.format(pool=pool)
        tags = [t.decode() if isinstance(t, bytes) else str(t) for t in client.smembers(key)]
        if tags:
            with celery_app.connection_for_write() as conn:
                qos = conn.default_channel.qos
                for tag in tags:
                    qos.restore_by_tag(tag)  # to the front of its queue
            log.warning(
                "pool process %s died running %d step(s): handed them back", pool, len(tags)
            )
            restored += len(tags)
        client.delete(key)
        client.srem(POOLS_KEY.format(model=model), pool)
    return restored
