"""The API's cache of verified keys (app.store.keys.VerifiedKeys): a cachetools TTLCache."""

from __future__ import annotations

import threading

from app.store.keys import VerifiedKeys
from app.store.tables import ApiKey


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def row(name: str) -> ApiKey:
    return ApiKey(id=len(name), name=name, prefix=name[:12], key_hash="0" * 64)


def test_a_verified_key_is_trusted_until_its_ttl_runs_out() -> None:
    clock = Clock()
    cache = VerifiedKeys(5.0, timer=clock)
    alice = row("alice")
    assert cache.get("crl_a_secret") is None
    cache.put("crl_a_secret", alice)
    assert cache.get("crl_a_secret") is alice
    assert cache.get("crl_a_other") is None  # another key is looked up on its own
    clock.now += 4.9
    assert cache.get("crl_a_secret") is alice  # a read does not extend it
    clock.now += 0.2
    assert cache.get("crl_a_secret") is None  # so a revoked key stops working within 5 s


def test_zero_ttl_remembers_nothing() -> None:
    cache = VerifiedKeys(0)
    cache.put("crl_a_secret", row("alice"))
    assert cache.get("crl_a_secret") is None


def test_a_full_cache_drops_the_least_recently_used_key() -> None:
    cache = VerifiedKeys(60.0, max_entries=2)
    a, b, c = row("a"), row("bb"), row("ccc")
    cache.put("crl_a_1", a)
    cache.put("crl_b_2", b)
    assert cache.get("crl_a_1") is a  # a is now the most recently used
    cache.put("crl_c_3", c)
    assert (cache.get("crl_a_1"), cache.get("crl_b_2"), cache.get("crl_c_3")) == (a, None, c)


def test_threads_share_it() -> None:
    cache = VerifiedKeys(60.0, max_entries=50)
    rows = {f"crl_k{i}_s": row(f"k{i}") for i in range(200)}
    wrong: list[str] = []

    def churn() -> None:
        for _ in range(20):
            for key, value in rows.items():
                cache.put(key, value)
                found = cache.get(key)
                if found is not None and found is not value:
                    wrong.append(key)

    threads = [threading.Thread(target=churn) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert wrong == []
    assert sum(cache.get(key) is not None for key in rows) <= 50
