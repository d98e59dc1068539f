"""Memory blocks on a real Redis: limits, edits, history, concurrency, isolation."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from app.core.errors import NotFoundError, SpecError
from app.memory.service import Memory


def test_default_blocks_and_edits(mem: Memory, tenant: str) -> None:
    blocks = mem.blocks.all(tenant, "u1")
    assert list(blocks) == ["persona", "user", "project"]
    assert all(
        b.value == "" and b.limit == mem.settings.memory_block_limit for b in blocks.values()
    )
    mem.blocks.put(tenant, "u1", "user", "Name: Ada", source="api")
    mem.blocks.append(tenant, "u1", "user", "Likes tea", source="model:tiny-chat")
    block = mem.blocks.replace(tenant, "u1", "user", "tea", "coffee", source="model:tiny-chat")
    assert block.value == "Name: Ada\nLikes coffee" and block.version == 3
    mem.blocks.put(tenant, "u1", "notes", "free-form", source="api", limit=50, description="d")
    assert list(mem.blocks.all(tenant, "u1")) == ["persona", "user", "project", "notes"]
    history = mem.blocks.history(tenant, "u1", "user")
    assert [(e.op, e.source, e.version) for e in history] == [
        ("replace", "model:tiny-chat", 3),
        ("append", "model:tiny-chat", 2),
        ("put", "api", 1),
    ]
    assert history[0].old == "Name: Ada\nLikes tea"
    assert history[0].new == "Name: Ada\nLikes coffee"
    assert history[0].detail == {"old": "tea", "new": "coffee", "count": 1}


def test_limits_and_bad_edits_change_nothing(mem: Memory, tenant: str) -> None:
    mem.blocks.put(tenant, "u1", "persona", "short", source="api", limit=10)
    with pytest.raises(SpecError, match="would be 14 characters; its limit is 10"):
        mem.blocks.append(tenant, "u1", "persona", "and more", source="api")
    with pytest.raises(SpecError, match="does not contain"):
        mem.blocks.replace(tenant, "u1", "persona", "absent", "x", source="api")
    with pytest.raises(SpecError, match="CORRAL_MEMORY_MAX_BLOCK_LIMIT"):
        mem.blocks.put(tenant, "u1", "persona", "x", source="api", limit=10**9)
    with pytest.raises(SpecError, match="block name"):
        mem.blocks.put(tenant, "u1", "Bad Name", "x", source="api")
    with pytest.raises(NotFoundError):
        mem.blocks.get(tenant, "u1", "nosuch")
    assert mem.blocks.get(tenant, "u1", "persona").value == "short"
    assert len(mem.blocks.history(tenant, "u1", "persona")) == 1
    mem.blocks.delete(tenant, "u1", "persona", source="api")
    assert mem.blocks.get(tenant, "u1", "persona").value == ""


def test_concurrent_appends_to_one_block_all_land(mem: Memory, tenant: str) -> None:
    mem.blocks.put(tenant, "u1", "project", "", source="api", limit=5000)

    def add(i: int) -> None:
        mem.blocks.append(tenant, "u1", "project", f"line {i}", source="api")

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(add, range(40)))
    block = mem.blocks.get(tenant, "u1", "project")
    assert sorted(block.value.splitlines()) == sorted(f"line {i}" for i in range(40))
    assert block.version == 41


def test_blocks_are_per_tenant_and_per_user(mem: Memory, tenant: str) -> None:
    mem.blocks.put(tenant, "u1", "user", "mine", source="api")
    assert mem.blocks.get(tenant, "u2", "user").value == ""
    assert mem.blocks.get(tenant + "x", "u1", "user").value == ""
    assert mem.blocks.history(tenant + "x", "u1", "user") == []
