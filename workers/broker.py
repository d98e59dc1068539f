"""kombu's Redis transport, with one client object per channel instead of one per command.

kombu's Redis channel builds a new ``redis.Redis`` for every operation that does not bring
its own (``conn_or_acquire``): with late acks that is twice per task in a worker's main
process, once to record the delivered message as unacked and once to ack it. Each new
client copies redis-py's table of response callbacks (a few hundred entries), which
py-spy showed as a fifth of the consumer's CPU per step on the tiny model. The client is
only a handle on the channel's connection pool, and safe to share between threads, so
this channel keeps one per pool. Everything else is kombu's: same keys, messages, acks.

``corral worker`` uses it for ``redis://`` brokers (``app/cli/worker.py``). ``rediss://``
keeps kombu's own transport (kombu turns TLS on from that scheme name), as do Sentinel and
the others.
"""

from __future__ import annotations

from typing import Any

from kombu.transport import redis as kombu_redis


class Channel(kombu_redis.Channel):
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
