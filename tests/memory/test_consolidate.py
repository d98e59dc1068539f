"""Consolidation's parts on the session's real Redis and database: the commit that moves a
conversation's watermark with what was learnt (idempotent, deduplicated, within block
limits), the consolidate task of a chat step on the tiny model in this process, the
search for candidates and their claims, and the off-peak window."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pytest

from app.core.config import Settings, use_settings
from app.core.redis import get_redis
from app.core.window import in_window, parse_window
from app.memory import consolidate, learn
from app.memory.keys import Keys, key_id_of, tenant_of
from app.memory.learn import Fact, Learnt
from app.memory.options import MemoryOptions
from app.memory.service import Memory, build_memory
from app.memory.store import NewMessage
from workers.consolidate import consolidate as consolidate_step
from workers.runtime import LlamaCppRuntime, RunControl


@pytest.fixture
def no_embed(settings: Settings) -> Iterator[Memory]:
    """Memory on the session's Redis with embedding off (vectors are given by the test)."""
    with use_settings(settings.model_copy(update={"memory_embed_model": ""})) as s:
        yield build_memory(get_redis(), s)


def conversation(mem: Memory, tenant: str, user: str, turns: int) -> str:
    conv = mem.conversations.create(tenant, uuid.uuid4().hex, user, ttl_s=600)
    texts = [f"turn {i}: I like {w}" for i, w in enumerate(["tea", "Lisbon", "chess"][:turns])]
    mem.conversations.append(
        tenant,
        conv,
        [NewMessage("user" if i % 2 == 0 else "assistant", t) for i, t in enumerate(texts)],
        embed=False,
    )
    return conv.id


def unit(*values: float) -> np.ndarray[Any, np.dtype[np.float32]]:
    v = np.asarray(values, dtype=np.float32)
    return v / np.linalg.norm(v)


def test_a_commit_moves_the_watermark_with_its_entries_and_block_edits_once(
    no_embed: Memory, tenant: str
) -> None:
    mem = no_embed
    cid = conversation(mem, tenant, "ada", 3)
    learnt = Learnt(
        "Ada talked about tea and Lisbon.",
        [
            Fact("The user likes tea.", "preference", "user"),
            Fact("The user lives in Lisbon.", "fact", None),
        ],
    )
    first = learn.commit(
        mem, tenant, cid, "ada", expected=0, upto=3, learnt=learnt, vectors=None, run_id="r1"
    )
    assert not first.stale and len(first.entries) == 3  # two facts and the summary
    assert first.block_edits == [("user", "The user likes tea.")]
    assert mem.conversations.get(tenant, cid).consolidated_upto == 3
    entries = mem.archive.page(tenant, "ada").items
    assert sorted((e.kind, e.text) for e in entries) == [
        ("fact", "The user lives in Lisbon."),
        ("preference", "The user likes tea."),
        ("summary", "Ada talked about tea and Lisbon."),
    ]
    assert {(e.source.conversation_id, e.source.from_seq, e.source.to_seq) for e in entries} == {
        (cid, 1, 3)
    }
    assert mem.blocks.get(tenant, "ada", "user").value == "The user likes tea."
    [edit] = mem.blocks.history(tenant, "ada", "user")
    assert edit.source == "consolidation run=r1" and edit.op == "append"

    # The same commit again (a retried step, a second run): the watermark moved, so nothing.
    again = learn.commit(
        mem, tenant, cid, "ada", expected=0, upto=3, learnt=learnt, vectors=None, run_id="r2"
    )
    assert again.stale and again.entries == [] and again.block_edits == []
    assert mem.archive.count(tenant, "ada") == 3
    assert len(mem.blocks.history(tenant, "ada", "user")) == 1
    counters = mem.redis.hgetall(learn.run_counters("r1"))
    assert {k.decode(): int(v) for k, v in counters.items()} == {
        "conversations": 1,
        "facts": 2,
        "merged": 0,
        "block_edits": 1,
        "block_skipped": 0,
    }
    assert not mem.redis.exists(learn.run_counters("r2"))


def test_a_fact_near_a_stored_one_is_merged_not_repeated(no_embed: Memory, tenant: str) -> None:
    mem = no_embed
    cid = conversation(mem, tenant, "bo", 3)
    tea, lisbon = unit(1, 0, 0, 0), unit(0, 1, 0, 0)
    near_tea = unit(1, 0.1, 0, 0)  # cosine 0.995 with tea
    first = Learnt("s1", [Fact("Likes tea.", "preference", None)])
    learn.commit(
        mem, tenant, cid, "bo", expected=0, upto=1, learnt=first,
        vectors=np.vstack([tea, unit(0, 0, 1, 0)]), run_id="a",
    )  # fmt: skip
    second = Learnt(
        "s2",
        [
            Fact("Enjoys a cup of tea.", "preference", None),
            Fact("Lives in Lisbon.", "fact", None),
            Fact("Resides in Lisbon.", "fact", None),  # repeats the fact just before it
        ],
    )
    done = learn.commit(
        mem, tenant, cid, "bo", expected=1, upto=3, learnt=second,
        vectors=np.vstack([near_tea, lisbon, unit(0.02, 1, 0, 0), unit(0, 0, 0, 1)]),
        run_id="b",
    )  # fmt: skip
    texts = sorted(e.text for e in mem.archive.page(tenant, "bo").items)
    assert texts == ["Likes tea.", "Lives in Lisbon.", "s1", "s2"]
    [tea_entry] = [e for e in mem.archive.page(tenant, "bo").items if e.text == "Likes tea."]
    assert done.merged == [tea_entry.id] and tea_entry.seen == 2
    assert tea_entry.sources[-1]["conversation_id"] == cid
    hits = mem.archive.search(tenant, "bo", lisbon, 2)
    assert hits[0].entry.text == "Lives in Lisbon."


def test_block_limits_hold_and_known_text_is_not_appended_twice(
    no_embed: Memory, tenant: str
) -> None:
    mem = no_embed
    cid = conversation(mem, tenant, "cy", 2)
    mem.blocks.put(tenant, "cy", "project", "Builds a boat.", source="api", limit=40)
    learnt = Learnt(
        "",
        [
            Fact("builds a boat", "fact", "project"),  # already there
            Fact("The boat is made of oak.", "fact", "project"),  # 14 + 1 + 24 = 39: fits
            Fact("It will sail in May.", "event", "project"),  # would pass 40
        ],
    )
    done = learn.commit(
        mem, tenant, cid, "cy", expected=0, upto=2, learnt=learnt, vectors=None, run_id=None
    )
    block = mem.blocks.get(tenant, "cy", "project")
    assert block.value == "Builds a boat.\nThe boat is made of oak." and len(block.value) <= 40
    assert done.block_edits == [("project", "The boat is made of oak.")]
    assert [(b, t) for b, t, _ in done.block_skipped] == [
        ("project", "builds a boat"),
        ("project", "It will sail in May."),
    ]
    assert "limit 40" in done.block_skipped[1][2]
    assert mem.archive.count(tenant, "cy") == 3  # every fact is archived all the same


def test_the_consolidate_task_reads_new_turns_only_and_commits_once(
    no_embed: Memory, tenant: str, chat_runtime: LlamaCppRuntime
) -> None:
    mem = no_embed
    cid = conversation(mem, tenant, "di", 3)
    conv = mem.conversations.get(tenant, cid)
    params = {
        "max_tokens": 256,
        "temperature": 0.0,
        "top_p": 1.0,
        "top_k": 40,
        "repeat_penalty": 1.0,
        "seed": 0,
    }
    opts = MemoryOptions(task="consolidate", run="t1")
    out = consolidate_step(mem, tenant, conv, chat_runtime, params, opts, RunControl())
    assert (out["from_seq"], out["upto"]) == (1, 3)
    assert out["errors"] == [] or "schema" in out["errors"][0]["error"]
    assert out["entries"] == mem.archive.count(tenant, "di") >= 1  # the summary at least
    assert mem.conversations.get(tenant, cid).consolidated_upto == 3
    # New turns: only they are read; the earlier ones are not learnt again.
    mem.conversations.append(tenant, conv, [NewMessage("user", "I also like jazz.")], embed=False)
    before = mem.archive.count(tenant, "di")
    conv = mem.conversations.get(tenant, cid)
    out = consolidate_step(mem, tenant, conv, chat_runtime, params, opts, RunControl())
    assert (out["from_seq"], out["upto"]) == (4, 4)
    assert mem.archive.count(tenant, "di") == before + out["entries"]
    new = [e for e in mem.archive.page(tenant, "di").items if e.source.from_seq == 4]
    assert len(new) == out["entries"] and all(e.source.to_seq == 4 for e in new)
    # Nothing new: nothing read, nothing written.
    conv = mem.conversations.get(tenant, cid)
    out = consolidate_step(mem, tenant, conv, chat_runtime, params, opts, RunControl())
    assert out["chunks"] == [] and mem.archive.count(tenant, "di") == before + len(new)


def test_candidates_are_idle_unconsolidated_and_unclaimed(no_embed: Memory, tenant: str) -> None:
    mem = no_embed
    quiet = conversation(mem, tenant, "ed", 2)
    done = conversation(mem, tenant, "ed", 1)
    claimed = conversation(mem, tenant, "fy", 1)
    mem.redis.hset(Keys(tenant).conv(done), "consolidated_upto", 1)
    assert consolidate._claim(mem, "run-x", tenant, claimed)
    assert not consolidate._claim(mem, "run-y", tenant, claimed)  # one run per conversation
    found = consolidate.candidates(mem, 0, 100, tenant=tenant)
    assert [(t, c) for t, c, _ in found] == [(tenant, quiet)]
    assert found[0][2] == 2  # its last seq
    assert consolidate.candidates(mem, 3600, 100, tenant=tenant) == []  # not idle an hour
    assert consolidate.candidates(mem, 0, 100, tenant=tenant, user_id="fy") == []
    consolidate.release(mem, "run-y", tenant, claimed)  # not its claim: kept
    assert consolidate.candidates(mem, 0, 100, tenant=tenant, user_id="fy") == []
    consolidate.release(mem, "run-x", tenant, claimed)
    assert [c for _, c, _ in consolidate.candidates(mem, 0, 100, tenant=tenant, user_id="fy")] == [
        claimed
    ]


@pytest.mark.parametrize(
    ("window", "at", "inside"),
    [
        ("", "12:00", True),
        ("01:00-05:00", "01:00", True),
        ("01:00-05:00", "04:59", True),
        ("01:00-05:00", "05:00", False),
        ("01:00-05:00", "00:59", False),
        ("22:00-02:00", "23:30", True),
        ("22:00-02:00", "01:59", True),
        ("22:00-02:00", "02:00", False),
        ("22:00-02:00", "12:00", False),
    ],
)
def test_the_window_is_utc_and_may_run_past_midnight(window: str, at: str, inside: bool) -> None:
    hour, minute = (int(x) for x in at.split(":"))
    assert in_window(window, datetime(2026, 11, 23, hour, minute, tzinfo=UTC)) is inside


@pytest.mark.parametrize("bad", ["1-5", "01:00", "25:00-01:00", "01:00-01:00", "01:00-05:60"])
def test_a_malformed_window_is_refused_naming_the_format(bad: str) -> None:
    with pytest.raises(ValueError, match=r"HH:MM-HH:MM|must differ"):
        parse_window(bad)
    with pytest.raises(ValueError, match="consolidate_window"):
        Settings(consolidate_window=bad)


def test_outside_the_window_beat_starts_no_run(settings: Settings) -> None:
    closed = settings.model_copy(update={"consolidate_window": "03:00-04:00"})
    with use_settings(closed):
        before = len(consolidate.list_runs(500))
        assert consolidate.tick(datetime(2026, 11, 23, 12, 0, tzinfo=UTC)) is None
        assert len(consolidate.list_runs(500)) == before


def test_a_run_is_recorded_with_its_batches_and_not_finished_before_they_end(
    isolated: Settings,
) -> None:
    """No pool runs here, so the batch stays queued: the run stays running however often
    beat's tick looks at it, and finishes (cancelled batch: failed) once its workflow ends."""
    from app.store import db, keys
    from app.workflows import service

    with db.session_scope(write=True) as session:
        row, _key = keys.create_key(session, "consolidation")
    tenant = tenant_of(row.id)
    mem = build_memory(get_redis(), isolated)
    cid = conversation(mem, tenant, "gi", 2)
    run = consolidate.start("manual", idle_s=0, tenant=tenant, model="tiny-chat")
    assert run is not None and run["status"] == "running", run
    assert run["planned"] == 1 and len(run["workflow_ids"]) == 1
    assert run["options"] == {"idle_s": 0, "max_items": 200, "tenant": tenant, "user_id": None}
    for _ in range(3):
        consolidate.finish_ended()
        assert consolidate.get_run(run["id"])["status"] == "running"
    # A second run finds the conversation claimed.
    again = consolidate.start("manual", idle_s=0, tenant=tenant, model="tiny-chat")
    assert again is not None and again["planned"] == 0 and again["status"] == "empty"
    [wid] = run["workflow_ids"]
    service.cancel(wid, key_id_of(tenant))
    ended = consolidate.get_run(run["id"])
    assert ended["status"] == "failed" and ended["finished_at"] is not None
    assert ended["errors"] and ended["errors"][0]["status"] == "cancelled"
    assert mem.conversations.get(tenant, cid).consolidated_upto == 0
    # Its claim is released: the next run takes the conversation.
    assert [c for _, c, _ in consolidate.candidates(mem, 0, 10, tenant=tenant)] == [cid]
