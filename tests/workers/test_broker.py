"""The worker's broker transport: kombu's Redis one with a client object per channel and
its unacked records written by script calls.

Against a real Redis: messages consumed with late acks are recorded as unacked and removed
on ack exactly as kombu does it (the same record, which kombu's own restore hands back
after the visibility timeout), a rejected message is handed back and delivered again, and
a run builds one ``redis.Redis`` where kombu's own transport builds one per operation.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from kombu import Connection, Consumer, Exchange, Producer, Queue

from tests.utils.databases import with_database
from workers.broker import TRANSPORT, transport_for

REDIS_DB = "11"  # of the test Redis; no other test uses it


@pytest.fixture
def broker_url(redis_base_url: str) -> Iterator[str]:
    url = with_database(redis_base_url, REDIS_DB)
    yield url
    with redis.Redis.from_url(url) as client:
        client.flushdb()


def _inits(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """A list that grows by one for every ``redis.Redis`` built from now on."""
    made: list[int] = []
    original = redis.Redis.__init__

    def counting(self: Any, *args: Any, **kwargs: Any) -> None:
        made.append(1)
        original(self, *args, **kwargs)

    monkeypatch.setattr(redis.Redis, "__init__", counting)
    return made


def _consume_and_ack(url: str, transport: str | None, n: int) -> tuple[int, int]:
    """Publish ``n`` messages, take each with a late ack; (unacked seen, left after acks)."""
    queue = Queue(f"test.broker.{uuid.uuid4().hex}", Exchange("", type="direct"))
    queue = Queue(queue.name, routing_key=queue.name)
    received: list[Any] = []
    with Connection(url, transport=transport) as conn:
        channel = conn.channel()
        producer = Producer(channel)
        for i in range(n):
            producer.publish({"i": i}, routing_key=queue.name, declare=[queue])
        with Consumer(channel, [queue], callbacks=[lambda _b, m: received.append(m)]):
            channel.basic_qos(0, n, False)
            while len(received) < n:
                conn.drain_events(timeout=5)
        with redis.Redis.from_url(url) as client:
            unacked_seen = client.hlen("unacked")
            for message in received:
                message.ack()
            left = client.hlen("unacked") + client.zcard("unacked_index")
        assert sorted(m.payload["i"] for m in received) == list(range(n))
        channel.close()
    return unacked_seen, left


def test_late_acks_are_recorded_and_removed_as_kombu_does(broker_url: str) -> None:
    assert _consume_and_ack(broker_url, TRANSPORT, 5) == (5, 0)
    assert _consume_and_ack(broker_url, None, 5) == (5, 0)  # kombu's own: the same


def test_one_client_object_per_channel(broker_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    made = _inits(monkeypatch)
    _consume_and_ack(broker_url, None, 20)
    kombu_made = len(made)
    made.clear()
    _consume_and_ack(broker_url, TRANSPORT, 20)
    # kombu's transport builds a client per unacked record and per ack (2 × 20 and more);
    # this one builds the channel's two (commands, and BRPOP/publish) plus this test's own.
    assert kombu_made >= 40
    assert len(made) <= 4, len(made)


def test_a_rejected_message_is_handed_back_and_delivered_again(broker_url: str) -> None:
    # What task_reject_on_worker_lost does when a pool process dies mid-step.
    name = f"test.broker.{uuid.uuid4().hex}"
    queue = Queue(name, routing_key=name)
    with Connection(broker_url, transport=TRANSPORT) as conn:
        channel = conn.channel()
        Producer(channel).publish({"x": 1}, routing_key=name, declare=[queue])
        got: list[Any] = []
        with Consumer(channel, [queue], callbacks=[lambda _b, m: got.append(m)]):
            channel.basic_qos(0, 1, False)
            conn.drain_events(timeout=5)
            got[0].reject(requeue=True)
            conn.drain_events(timeout=5)
            assert len(got) == 2 and got[1].payload == {"x": 1}
            got[1].ack()
        with redis.Redis.from_url(broker_url) as client:
            assert client.llen(name) == 0
            assert client.hlen("unacked") == 0
        channel.close()


def test_only_plain_redis_urls_get_it() -> None:
    assert transport_for("redis://127.0.0.1:6379/0") == TRANSPORT
    assert transport_for("REDIS://h/1") == TRANSPORT
    # rediss: kombu turns TLS on from the scheme's name; keep its transport.
    assert transport_for("rediss://h:6380/0") is None
    assert transport_for("sentinel://h:26379") is None
    assert transport_for("amqp://guest@localhost//") is None


def test_unacked_records_are_kombus_own_and_come_back_after_the_visibility_timeout(
    broker_url: str,
) -> None:
    """A worker that dies without acking leaves the record this QoS wrote (by one script
    call, not kombu's pipeline); kombu's own restore puts the message back on its queue."""
    name = f"test.broker.{uuid.uuid4().hex}"
    queue = Queue(name, routing_key=name)
    options = {"visibility_timeout": 0}  # every unacked message is overdue at once
    with Connection(broker_url, transport=TRANSPORT, transport_options=options) as conn:
        channel = conn.channel()
        Producer(channel).publish({"x": 2}, routing_key=name, declare=[queue])
        got: list[Any] = []
        with Consumer(channel, [queue], callbacks=[lambda _b, m: got.append(m)]):
            channel.basic_qos(0, 1, False)
            conn.drain_events(timeout=5)
        (message,) = got
        with redis.Redis.from_url(broker_url) as client:
            tag = message.delivery_tag
            stored = json.loads(client.hget("unacked", tag))
            assert stored == [json.loads(json.dumps(message._raw)), "", name]
            assert abs(float(client.zscore("unacked_index", tag)) - time.time()) < 60
            assert client.llen(name) == 0
            channel.qos.restore_visible(num=10)  # kombu's: what a live worker runs
            assert client.llen(name) == 1
            assert client.hlen("unacked") == 0 and client.zcard("unacked_index") == 0
        channel.close()
