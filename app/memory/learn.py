"""What one consolidation of one conversation learns, and its commit.

The consolidation model reads the conversation's new turns (after its watermark) and the
user's memory blocks, and answers under a JSON-schema grammar: a short summary of the new
turns and a few facts, each with a kind and, optionally, the block it belongs in.
:func:`commit` stores the result in one optimistic Redis transaction (WATCH/MULTI) that
also moves the watermark: new archival entries (a fact whose vector is within
``CORRAL_CONSOLIDATE_DEDUPE`` of a stored entry is merged into it instead), the block
appends that fit, and the run's counters. Either all of it happens or none; a transaction
that finds the watermark moved (another run consolidated those turns) writes nothing.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
from redis.client import Pipeline

from app.memory import archive
from app.memory.archive import Kind, Merge, NewEntry
from app.memory.keys import Keys
from app.memory.schemas import Block, Message
from app.memory.service import Memory
from app.memory.vectors import Vectors, normalise

FACT_KINDS = ("fact", "preference", "event")
SUMMARY_CHARS = 400
FACT_CHARS = 240
RUN_COUNTERS_TTL_S = 7 * 86400

SYSTEM = (
    "You maintain a long-term memory about a user. Read the new turns of a conversation and "
    "note what is worth remembering in later, unrelated conversations: facts about the user, "
    "their preferences, notable events and decisions. Write each fact as one short, "
    "self-contained sentence in the third person ('The user ...'). Leave out small talk, "
    "anything the memory blocks already say, and anything only true for this moment. "
    "Put a fact in a block only when it belongs there: 'user' for who the user is and what "
    "they like, 'project' for their current work; otherwise null. "
    "Answer with JSON only: a one- or two-sentence summary of the new turns, and the facts "
    "(none when nothing is worth keeping)."
)


def blocks_for(blocks: dict[str, Block]) -> list[str]:
    """The blocks a fact may be aimed at: the user's, without the assistant's persona."""
    return [name for name in blocks if name != "persona"]


def schema(block_names: Sequence[str], max_facts: int) -> dict[str, Any]:
    """The JSON schema the model answers under (bounded, so max_tokens can hold it)."""
    return {
        "type": "object",
        "properties": {
            "summary": {"type": "string", "maxLength": SUMMARY_CHARS},
            "facts": {
                "type": "array",
                "maxItems": max_facts,
                "items": {
                    "type": "object",
                    "properties": {
                        "text": {"type": "string", "minLength": 1, "maxLength": FACT_CHARS},
                        "kind": {"enum": list(FACT_KINDS)},
                        "block": {"enum": [*block_names, None]},
                    },
                    "required": ["text", "kind", "block"],
                    "additionalProperties": False,
                },
            },
        },
        "required": ["summary", "facts"],
        "additionalProperties": False,
    }


def prompt(blocks: dict[str, Block], messages: Sequence[Message]) -> list[dict[str, Any]]:
    """The chat messages that ask for one consolidation of ``messages``."""
    shown = [f"[{name}]\n{b.value}" for name, b in blocks.items() if b.value]
    turns = "\n".join(f"{m.role}: {m.content}" for m in messages)
    first, last = messages[0].seq, messages[-1].seq
    user = (
        "Memory blocks:\n"
        + ("\n\n".join(shown) if shown else "(all empty)")
        + f"\n\nNew turns (messages {first} to {last}):\n{turns}"
    )
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]


@dataclass
class Fact:
    text: str
    kind: Kind
    block: str | None


@dataclass
class Learnt:
    """A model's answer, read: the summary and the facts (empty when unreadable)."""

    summary: str
    facts: list[Fact]
    error: str | None = None


_SPACE = re.compile(r"\s+")


def clean(text: str) -> str:
    return _SPACE.sub(" ", text).strip()


def parse(text: str, block_names: Sequence[str]) -> Learnt:
    """The model's JSON answer as a :class:`Learnt`; an answer that is not the schema's
    (cut off by max_tokens) learns nothing and says why."""
    try:
        data = json.loads(text)
        summary = clean(str(data["summary"]))
        facts = []
        for item in data["facts"]:
            fact_text = clean(str(item["text"]))
            kind = item["kind"] if item["kind"] in FACT_KINDS else "fact"
            block = item.get("block") if item.get("block") in block_names else None
            if fact_text:
                facts.append(Fact(fact_text, cast(Kind, kind), block))
    except (ValueError, KeyError, TypeError) as exc:
        return Learnt("", [], f"the model's answer is not the schema's JSON: {exc}")
    return Learnt(summary, facts)


def _key(text: str) -> str:
    return clean(text).casefold().rstrip(".")


@dataclass
class Committed:
    """What a commit wrote (all zero when the watermark had moved: ``stale``)."""

    stale: bool = False
    entries: list[str] = field(default_factory=list)
    merged: list[str] = field(default_factory=list)
    block_edits: list[tuple[str, str]] = field(default_factory=list)
    block_skipped: list[tuple[str, str, str]] = field(default_factory=list)


def run_counters(run_id: str) -> str:
    """The Redis hash that counts what a run's commits wrote."""
    return f"corral:mem:_consolidate:run:{run_id}"


def commit(
    mem: Memory,
    tenant: str,
    cid: str,
    user_id: str,
    *,
    expected: int,
    upto: int,
    learnt: Learnt,
    vectors: Vectors | None,
    run_id: str | None,
) -> Committed:
    """Store what was learnt from messages ``expected`` + 1 to ``upto`` and move the
    watermark to ``upto``, in one transaction; nothing when the watermark is no longer
    ``expected``. ``vectors``: one row per fact, then the summary's (None: no embedding)."""
    k = Keys(tenant)
    threshold = mem.settings.consolidate_dedupe
    source = f"consolidation run={run_id}" if run_id else "consolidation"
    result: list[Committed] = []

    def txn(pipe: Pipeline) -> None:
        done = Committed()
        result[:] = [done]
        raw_mark = pipe.hget(k.conv(cid), "consolidated_upto")
        if not pipe.exists(k.conv(cid)) or int(cast(bytes | None, raw_mark) or 0) != expected:
            done.stale = True
            pipe.multi()
            return
        ids, matrix = archive.watched(pipe, tenant, user_id)
        known = _known_texts(pipe, k, user_id) if vectors is None else {}
        entries: list[NewEntry] = []
        merges: list[Merge] = []
        fresh: list[Vectors] = []  # vectors of this commit's new facts
        appends: list[tuple[str, str]] = []
        for i, fact in enumerate(learnt.facts):
            vec = normalise(vectors[i])[0] if vectors is not None else None
            same = (
                _same(vec, ids, matrix, threshold)
                if vec is not None
                else known.get(_key(fact.text))
            )
            if same is not None:
                merges.append(Merge(same, cid, upto, run_id))
                continue
            if vec is not None and any(float(v @ vec) >= threshold for v in fresh):
                continue  # repeats a fact of this same answer
            if vec is None and any(_key(e.text) == _key(fact.text) for e in entries):
                continue
            if vec is not None:
                fresh.append(vec)
            entries.append(
                NewEntry(fact.text, fact.kind, cid, expected + 1, upto, run_id, fact.block, vec)
            )
            if fact.block:
                appends.append((fact.block, fact.text))
        if learnt.summary:
            vec = normalise(vectors[-1])[0] if vectors is not None else None
            entries.append(
                NewEntry(learnt.summary, "summary", cid, expected + 1, upto, run_id, None, vec)
            )
        merged_into = {
            m.entry_id: json.loads(cast(bytes, pipe.hget(k.archive(user_id), m.entry_id)))
            for m in merges
        }
        seconds, micros = pipe.time()
        now = seconds * 1000 + micros // 1000
        applied, skipped, write_blocks = mem.blocks.stage_appends(
            pipe, tenant, user_id, appends, source=source, now=now
        )
        pipe.multi()
        archive.stage(pipe, tenant, user_id, now, entries, merges, merged_into)
        write_blocks(pipe)
        pipe.hset(k.conv(cid), "consolidated_upto", upto)
        if run_id:
            counters = run_counters(run_id)
            pipe.hincrby(counters, "conversations", 1)
            pipe.hincrby(counters, "facts", sum(e.kind != "summary" for e in entries))
            pipe.hincrby(counters, "merged", len(merges))
            pipe.hincrby(counters, "block_edits", len(applied))
            pipe.hincrby(counters, "block_skipped", len(skipped))
            pipe.expire(counters, RUN_COUNTERS_TTL_S)
        done.entries = [e.id for e in entries]
        done.merged = [m.entry_id for m in merges]
        done.block_edits, done.block_skipped = applied, skipped

    watch = [k.conv(cid), k.blocks(user_id), k.archive(user_id), k.archive_vec(user_id)]
    mem.redis.transaction(txn, *watch)
    return result[0]


def _same(vec: Vectors, ids: list[str], matrix: Vectors | None, threshold: float) -> str | None:
    """The stored entry ``vec`` repeats (the nearest at or above ``threshold``), if any."""
    if matrix is None or matrix.shape[1] != vec.shape[0]:
        return None
    scores = matrix @ vec
    best = int(np.argmax(scores))
    return ids[best] if float(scores[best]) >= threshold else None


def _known_texts(pipe: Pipeline, k: Keys, user_id: str) -> dict[str, str]:
    """Without embeddings a fact repeats an entry when their texts match: text → entry id."""
    raw = cast(dict[bytes, bytes], pipe.hgetall(k.archive(user_id)))
    out = {}
    for entry_id, body in raw.items():
        data = json.loads(body)
        if data["kind"] != "summary":
            out[_key(data["text"])] = entry_id.decode()
    return out


EmbedFn = Callable[[list[str]], Vectors]


def embed_learnt(learnt: Learnt, embed: EmbedFn | None) -> Vectors | None:
    """One vector per fact, then the summary's; None without an embedding model."""
    if embed is None:
        return None
    texts = [f.text for f in learnt.facts] + [learnt.summary or " "]
    return embed(texts)
