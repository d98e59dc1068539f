"""Token streams and change ticks on a real Redis: what a worker writes, a reader reads
in order, from the start, however late it comes."""

from __future__ import annotations

import asyncio
import time

import redis
import redis.asyncio as aioredis

from app.core.config import Settings, get_settings
from app.workflows import streams
from app.workflows.streams import Delta, DeltaWriter, Follower, Read


def test_the_first_piece_goes_at_once_and_later_ones_together(isolated: Settings) -> None:
    client = redis.Redis.from_url(isolated.broker_url)
    writer = DeltaWriter("wf-a", "step", attempt=1, client=client, flush_s=3600)
    writer("Hello")
    assert client.xlen(streams.tokens_key("wf-a", "step")) == 1  # the first token: now
    writer(",")
    writer(" world")
    assert client.xlen(streams.tokens_key("wf-a", "step")) == 1  # gathered for flush_s
    writer.close()
    entries = client.xrange(streams.tokens_key("wf-a", "step"))
    assert [e[1][b"t"] for e in entries] == [b"Hello", b", world"]
    assert all(e[1][b"a"] == b"1" for e in entries)
    ttl = client.ttl(streams.tokens_key("wf-a", "step"))
    assert 0 < ttl <= get_settings().stream_ttl_s


def test_a_writer_whose_redis_is_gone_drops_deltas_without_raising(isolated: Settings) -> None:
    dead = redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.2)
    writer = DeltaWriter("wf-b", "step", attempt=1, client=dead)
    writer("lost")
    writer("also lost")
    writer.close()
    assert writer.sent == 0


def test_a_late_reader_gets_every_delta_and_the_change_ticks(isolated: Settings) -> None:
    client = redis.Redis.from_url(isolated.broker_url)
    streams.note_change("wf-c")  # created
    writer = DeltaWriter("wf-c", "one", attempt=1, client=client, flush_s=0)
    for word in ("a", "b", "c"):
        writer(word)
    writer.close()
    DeltaWriter("wf-c", "two", attempt=2, client=client)("x")
    streams.note_change("wf-c")

    async def read() -> tuple[Read, Read, float, Read]:
        reader = aioredis.Redis.from_url(isolated.broker_url)
        follower = Follower(reader, "wf-c", ["one", "two"])
        got = await follower.next(1.0)
        started = time.monotonic()
        more = await follower.next(0.2)  # nothing new: waits, then returns empty
        waited = time.monotonic() - started
        streams.note_change("wf-c", ended=True)
        last = await follower.next(1.0)
        await reader.aclose()
        return got, more, waited, last

    got, more, waited, last = asyncio.run(read())
    assert got.changed and not got.ended
    deltas = got.deltas
    assert [(d.step_id, d.attempt, d.text) for d in deltas if d.step_id == "one"] == [
        ("one", 1, "a"),
        ("one", 1, "b"),
        ("one", 1, "c"),
    ]
    assert [(d.step_id, d.attempt, d.text) for d in deltas if d.step_id == "two"] == [
        ("two", 2, "x")
    ]
    assert more == Read([]) and waited >= 0.15
    assert last == Read([], changed=True, ended=True)


def test_a_reader_wakes_on_a_delta_written_while_it_waits(isolated: Settings) -> None:
    async def read() -> tuple[list[Delta], float]:
        reader = aioredis.Redis.from_url(isolated.broker_url)
        follower = Follower(reader, "wf-d", ["s"])

        async def write_soon() -> float:
            await asyncio.sleep(0.2)
            await asyncio.to_thread(DeltaWriter("wf-d", "s", attempt=1), "now")
            return time.monotonic()

        writing = asyncio.create_task(write_soon())
        deltas = (await follower.next(5.0)).deltas
        woke = time.monotonic() - await writing
        await reader.aclose()
        return deltas, woke

    deltas, woke = asyncio.run(read())
    assert [d.text for d in deltas] == ["now"]
    assert woke < 1.0  # woken by the write, not by the 5 s timeout
