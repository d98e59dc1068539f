"""kombu's Redis transport, with one client object per channel instead of one per command.

kombu's Redis channel builds a new ``redis.Redis`` for every operation that does not bring
its own (``conn_or_acquire``): with late acks that is twice per task in a worker's main
process, once to record the delivered message as unacked and once to ack it. Each new
client copies redis-py's table of response callbacks (a few hundred entries), which
py-spy showed as a fifth of the consumer's CPU per step on the tiny model. The client is
only a handle on the channel's connection pool, and safe to share between threads, so
this channel keeps one per pool. Everything else is kombu's: same keys, messages, acks.

Its QoS records a delivered message as unacked, and removes the record on ack, with one
script call each where kombu's sends a MULTI/EXEC pipeline (four commands, four replies,
and a pipeline object): the same keys and values, as atomic, for less of the consumer's
CPU on the path from the queue to the pool.

``corral worker`` uses it for ``redis://`` brokers (``app/cli/worker.py``). ``rediss://``
keeps kombu's own transport (kombu turns TLS on from that scheme name), as do Sentinel and
the others.
"""

from __future__ import annotations

from time import time
from typing import Any

from kombu.transport import redis as kombu_redis
from kombu.utils.json import dumps

# The unacked index (a sorted set of delivery tags by delivery time) and the unacked hash
# (tag: the message, its exchange and routing key), written and cleared as kombu's QoS
# does in its MULTI/EXEC pipelines; a script is as atomic.
_RECORD = """
redis.call('ZADD', KEYS[1], ARGV[1], ARGV[2])
redis.call('HSET', KEYS[2], ARGV[2], ARGV[3])
return 1
"""
_FORGET = """
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
return 1
"""


class QoS(kombu_redis.QoS):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[no-untyped-call]
        self._scripts: dict[tuple[int, str], Any] = {}

    def _script(self, client: Any, source: str) -> Any:
        """``source`` registered with ``client`` (EVALSHA; redis-py loads it if missing)."""
        script = self._scripts.get((id(client), source))
        if script is None or script.registered_client is not client:
            script = self._scripts[(id(client), source)] = client.register_script(source)
        return script

    def _keys(self) -> list[str]:
        return [self.unacked_index_key, self.unacked_key]

    def append(self, message: Any, delivery_tag: Any) -> None:
        delivery = message.delivery_info
        raw = dumps([message._raw, delivery["exchange"], delivery["routing_key"]])  # type: ignore[no-untyped-call]
        with self.channel.conn_or_acquire() as client:
            self._script(client, _RECORD)(keys=self._keys(), args=[time(), delivery_tag, raw])
        # The in-process bookkeeping of kombu's virtual QoS (what kombu's redis one calls).
        super(kombu_redis.QoS, self).append(message, delivery_tag)  # type: ignore[no-untyped-call]

    def _forget(self, delivery_tag: Any) -> None:
        with self.channel.conn_or_acquire() as client:
            self._script(client, _FORGET)(keys=self._keys(), args=[delivery_tag])

    def ack(self, delivery_tag: Any) -> None:
        self._forget(delivery_tag)
        super(kombu_redis.QoS, self).ack(delivery_tag)  # type: ignore[no-untyped-call]

    def reject(self, delivery_tag: Any, requeue: bool = False) -> None:
        if requeue:
            self.restore_by_tag(delivery_tag, leftmost=True)  # type: ignore[no-untyped-call]
        else:
            self._forget(delivery_tag)
        super(kombu_redis.QoS, self).ack(delivery_tag)  # type: ignore[no-untyped-call]


class Channel(kombu_redis.Channel):
    QoS = QoS
    _shared_client: Any = None

    def _create_client(self, asynchronous: bool = False) -> Any:
        if asynchronous:  # the BRPOP / publish client: kombu already keeps one
            return super()._create_client(asynchronous=True)  # type: ignore[no-untyped-call]
        pool = self.pool  # a new one after a connection error closes the old
        client = self._shared_client
        if client is None or client.connection_pool is not pool:
            client = self._shared_client = super()._create_client()  # type: ignore[no-untyped-call]
        return client


class Transport(kombu_redis.Transport):
    Channel = Channel


TRANSPORT = f"{__name__}:Transport"


def transport_for(broker_url: str) -> str | None:
    """This transport for a ``redis://`` URL; None (kombu's choice) for any other."""
    return TRANSPORT if broker_url.split("://", 1)[0].lower() == "redis" else None
