"""Placement policies, splits and refusals against the real ledger."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from app.core.embedded import EmbeddedRedis
from app.scheduler.estimate import MemoryEstimate, estimate, read_shape
from app.scheduler.inventory import DeclaredInventory
from app.scheduler.ledger import Ledger
from app.scheduler.placement import Binpack, Pinned, Placement, Refusal, Spread, place
from tests.utils.gguf_shapes import QWEN25_7B, write_sparse_gguf

GIB = 2**30


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedRedis]:
    srv = EmbeddedRedis(tmp_path_factory.mktemp("placement-redis"), persist=False).start()
    yield srv
    srv.stop()


@pytest.fixture
def ledger(server: EmbeddedRedis) -> Iterator[Ledger]:
    c = redis.Redis.from_url(server.url)
    c.flushdb()
    yield Ledger(c, headroom_bytes=0)
    c.close()


@pytest.fixture(scope="module")
def qwen(tmp_path_factory: pytest.TempPathFactory) -> MemoryEstimate:
    path = tmp_path_factory.mktemp("q") / "q.gguf"
    write_sparse_gguf(path, QWEN25_7B)
    return estimate(read_shape(path), 32768)


def gpus(spec: str, ledger: Ledger, host: str = "h") -> list[tuple[str, int, int]]:
    inv = DeclaredInventory(spec, host).gpus()
    ledger.register_gpus(inv, ttl_s=300)
    return [(g.host, g.index, g.total_bytes) for g in inv]


def small(models_dir: Path) -> MemoryEstimate:
    return estimate(read_shape(models_dir / "tiny-chat.gguf"), 512, overhead_bytes=GIB)


def test_binpack_fills_the_fullest_gpu_spread_the_emptiest(
    ledger: Ledger, models_dir: Path
) -> None:
    g = gpus("0:8GiB,1:8GiB,2:8GiB", ledger)
    assert ledger.reserve("other", "x", [("h", 1, 5 * GIB)]).ok
    est = small(models_dir)
    packed = place(ledger, est, model="m", holder="a", gpus=g, policy=Binpack())
    assert isinstance(packed, Placement)
    assert packed.indices == [1]  # the fullest that fits
    spread = place(ledger, est, model="m", holder="b", gpus=g, policy=Spread())
    assert isinstance(spread, Placement)
    assert spread.indices == [0]  # the emptiest (0 and 2 tie; lowest key first)
    pinned = place(ledger, est, model="m", holder="c", gpus=g, policy=Pinned(2))
    assert isinstance(pinned, Placement)
    assert pinned.indices == [2]


def test_split_when_allowed(ledger: Ledger, qwen: MemoryEstimate) -> None:
    g = gpus("0:6GiB,1:6GiB", ledger)

    def resplit(split: tuple[int, ...]) -> MemoryEstimate:
        return estimate(qwen.shape, qwen.n_ctx, split=split)

    refused = place(ledger, qwen, model="q", holder="a", gpus=g, policy=Binpack())
    assert isinstance(refused, Refusal)
    assert refused.permanent
    assert "does not allow splitting" in refused.reason
    split = place(
        ledger,
        qwen,
        model="q",
        holder="a",
        gpus=g,
        policy=Binpack(),
        split_allowed=True,
        estimate_split=resplit,
    )
    assert isinstance(split, Placement)
    assert sorted(split.indices) == [0, 1]
    assert sum(split.split) == 28
    reserved = {r.gpu: r.bytes for r in ledger.reservations()}
    assert all(b <= 6 * GIB for b in reserved.values())
    assert sum(reserved.values()) > qwen.total_bytes  # each GPU pays its own buffers


def test_too_big_for_the_host_names_the_numbers(ledger: Ledger, qwen: MemoryEstimate) -> None:
    g = gpus("0:4GiB,1:2GiB", ledger)
    refused = place(
        ledger,
        qwen,
        model="q",
        holder="a",
        gpus=g,
        policy=Binpack(),
        split_allowed=True,
        estimate_split=lambda s: estimate(qwen.shape, qwen.n_ctx, split=s),
    )
    assert isinstance(refused, Refusal)
    assert refused.permanent
    assert f"({qwen.total_bytes} bytes)" in refused.reason
    assert "GPU h:0: 4.00 GiB" in refused.reason
    assert "GPU h:1: 2.00 GiB" in refused.reason


def test_no_room_now_is_not_permanent(ledger: Ledger, models_dir: Path) -> None:
    g = gpus("0:4GiB", ledger)
    assert ledger.reserve("other", "x", [("h", 0, 3 * GIB + GIB // 2)]).ok
    refused = place(ledger, small(models_dir), model="m", holder="a", gpus=g, policy=Binpack())
    assert isinstance(refused, Refusal)
    assert not refused.permanent
    assert "free now: GPU h:0: 512.00 MiB" in refused.reason
