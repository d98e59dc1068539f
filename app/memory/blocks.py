"""Memory blocks: named, size-limited texts a user's conversations share (Letta's core memory).

Every user has ``persona``, ``user`` and ``project`` (empty until written) and any other
block the API or the model creates. Each edit — through the API or through a model's
``memory_append`` / ``memory_replace`` tool call — is an optimistic transaction on the
block (WATCH/MULTI), checked against the block's character limit, and leaves an entry in
the block's edit history naming who made it.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any, Literal, cast

import redis
from redis.client import Pipeline

from app.core.errors import NotFoundError, SpecError
from app.memory.keys import Keys, check_block_name
from app.memory.schemas import Block, BlockEdit, from_ms

DEFAULT_BLOCKS = ("persona", "user", "project")
Op = Literal["put", "append", "replace", "delete"]


def _now_ms(client: redis.Redis) -> int:
    seconds, micros = client.time()
    return seconds * 1000 + micros // 1000


class BlockStore:
    """Memory blocks of every user of every tenant."""

    def __init__(
        self, client: redis.Redis, *, default_limit: int, max_limit: int, history: int
    ) -> None:
        self.redis = client
        self.default_limit = default_limit
        self.max_limit = max_limit
        self.history_max = history

    def _parse(self, name: str, raw: bytes | None) -> Block | None:
        if raw is None:
            return None
        data = json.loads(raw)
        at = data.get("updated_at")
        return Block(
            name=name,
            value=data["value"],
            limit=data["limit"],
            description=data.get("description"),
            version=data.get("version", 0),
            updated_at=from_ms(at) if at else None,
        )

    def _empty(self, name: str) -> Block:
        return Block(name=name, value="", limit=self.default_limit)

    def all(self, tenant: str, user_id: str) -> dict[str, Block]:
        """Every block of the user: the defaults (maybe empty) first, then the rest by name."""
        raw = cast(dict[bytes, bytes], self.redis.hgetall(Keys(tenant).blocks(user_id)))
        stored = {k.decode(): self._parse(k.decode(), v) for k, v in raw.items()}
        out = {name: stored.pop(name, None) or self._empty(name) for name in DEFAULT_BLOCKS}
        for name in sorted(stored):
            block = stored[name]
            if block is not None:
                out[name] = block
        return out

    def get(self, tenant: str, user_id: str, name: str) -> Block:
        check_block_name(name)
        raw = cast(bytes | None, self.redis.hget(Keys(tenant).blocks(user_id), name))
        block = self._parse(name, raw)
        if block is None:
            if name in DEFAULT_BLOCKS:
                return self._empty(name)
            raise NotFoundError(f"user {user_id!r} has no memory block {name!r}")
        return block

    def put(
        self,
        tenant: str,
        user_id: str,
        name: str,
        value: str,
        *,
        source: str,
        limit: int | None = None,
        description: str | None = None,
    ) -> Block:
        """Set a block's value (creating the block), optionally with a new limit."""
        if limit is not None and limit > self.max_limit:
            raise SpecError.single(
                ("limit",),
                f"limit must be ≤ {self.max_limit} characters (CORRAL_MEMORY_MAX_BLOCK_LIMIT), "
                f"got {limit}",
                "limit",
            )

        def change(block: Block) -> tuple[str, dict[str, Any]]:
            if limit is not None:
                block.limit = limit
            if description is not None:
                block.description = description
            return value, {}

        return self._edit(tenant, user_id, name, "put", source, change, create=True)

    def append(self, tenant: str, user_id: str, name: str, text: str, *, source: str) -> Block:
        """Add ``text`` on a new line at the end of the block."""
        if not text:
            raise SpecError.single(("text",), "text to append must not be empty", "empty")

        def change(block: Block) -> tuple[str, dict[str, Any]]:
            return (f"{block.value}\n{text}" if block.value else text), {"text": text}

        return self._edit(tenant, user_id, name, "append", source, change, create=True)

    def replace(
        self, tenant: str, user_id: str, name: str, old: str, new: str, *, source: str
    ) -> Block:
        """Replace every occurrence of ``old`` in the block by ``new`` (empty deletes it)."""
        if not old:
            raise SpecError.single(("old",), "old text must not be empty", "empty")

        def change(block: Block) -> tuple[str, dict[str, Any]]:
            count = block.value.count(old)
            if count == 0:
                raise SpecError.single(
                    ("old",), f"block {name!r} does not contain {old!r}", "not_found"
                )
            return block.value.replace(old, new), {"old": old, "new": new, "count": count}

        return self._edit(tenant, user_id, name, "replace", source, change, create=False)

    def delete(self, tenant: str, user_id: str, name: str, *, source: str) -> None:
        """Remove a block (a default block reads as empty afterwards)."""

        def change(block: Block) -> tuple[str, dict[str, Any]]:
            return "", {}

        self._edit(tenant, user_id, name, "delete", source, change, create=False)

    def history(self, tenant: str, user_id: str, name: str, limit: int = 50) -> list[BlockEdit]:
        """The block's edits, newest first."""
        check_block_name(name)
        raw = cast(
            list[bytes], self.redis.lrange(Keys(tenant).block_log(user_id, name), 0, limit - 1)
        )
        out = []
        for item in raw:
            data = json.loads(item)
            data["at"] = from_ms(data["at"])
            out.append(BlockEdit.model_validate(data))
        return out

    def _edit(
        self,
        tenant: str,
        user_id: str,
        name: str,
        op: Op,
        source: str,
        change: Callable[[Block], tuple[str, dict[str, Any]]],
        *,
        create: bool,
    ) -> Block:
        check_block_name(name, ("block",))
        k = Keys(tenant)
        blocks_key, log_key = k.blocks(user_id), k.block_log(user_id, name)
        result: list[Block] = []

        def txn(pipe: Pipeline) -> None:
            raw = cast(bytes | None, pipe.hget(blocks_key, name))
            current = self._parse(name, raw)
            if current is None:
                if not create and name not in DEFAULT_BLOCKS:
                    raise NotFoundError(f"user {user_id!r} has no memory block {name!r}")
                current = self._empty(name)
            old = current.value
            block = current.model_copy()
            value, detail = change(block)
            if len(value) > block.limit:
                raise SpecError.single(
                    ("value",) if op == "put" else ("args", "text"),
                    f"block {name!r} would be {len(value)} characters; its limit is {block.limit}",
                    "block_limit",
                )
            now = _now_ms(self.redis)
            block.value, block.version = value, current.version + 1
            edit = {
                "version": block.version,
                "op": op,
                "source": source,
                "old": old,
                "new": value,
                "at": now,
                "detail": detail,
            }
            pipe.multi()
            self._write(pipe, blocks_key, log_key, block, edit, now, delete=op == "delete")
            result[:] = [block.model_copy(update={"updated_at": from_ms(now)})]

        self.redis.transaction(txn, blocks_key)
        return result[0]

    def _write(
        self,
        pipe: Pipeline,
        blocks_key: str,
        log_key: str,
        block: Block,
        edit: dict[str, Any],
        now: int,
        *,
        delete: bool = False,
    ) -> None:
        """Queue a block's new value and its history entry on a MULTI pipeline."""
        if delete:
            pipe.hdel(blocks_key, block.name)
        else:
            stored = {
                "value": block.value,
                "limit": block.limit,
                "description": block.description,
                "version": block.version,
                "updated_at": now,
            }
            pipe.hset(blocks_key, block.name, json.dumps(stored))
        if self.history_max:
            pipe.lpush(log_key, json.dumps(edit))
            pipe.ltrim(log_key, 0, self.history_max - 1)

    def stage_appends(
        self,
        pipe: Pipeline,
        tenant: str,
        user_id: str,
        appends: Sequence[tuple[str, str]],
        *,
        source: str,
        now: int,
    ) -> tuple[list[tuple[str, str]], list[tuple[str, str, str]], Callable[[Pipeline], None]]:
        """Plan appending each (block, text) inside a caller's transaction: ``pipe`` WATCHes
        the user's blocks and has not begun MULTI. A text the block already holds, or one
        that would take the block past its limit, is skipped with the reason. Returns the
        appends made, the skipped ones, and the function that queues the writes after MULTI."""
        k = Keys(tenant)
        raw = cast(dict[bytes, bytes], pipe.hgetall(k.blocks(user_id)))
        blocks = {n.decode(): self._parse(n.decode(), v) for n, v in raw.items()}
        changed: dict[str, tuple[Block, list[dict[str, Any]]]] = {}
        applied: list[tuple[str, str]] = []
        skipped: list[tuple[str, str, str]] = []
        for name, text in appends:
            if name in changed:
                block = changed[name][0]
            else:
                block = (blocks.get(name) or self._empty(name)).model_copy()
            value = f"{block.value}\n{text}" if block.value else text
            if text.casefold() in block.value.casefold():
                skipped.append((name, text, "already in the block"))
            elif len(value) > block.limit:
                skipped.append(
                    (name, text, f"would make it {len(value)} characters; limit {block.limit}")
                )
            else:
                old = block.value
                block.value, block.version = value, block.version + 1
                edit = {
                    "version": block.version,
                    "op": "append",
                    "source": source,
                    "old": old,
                    "new": value,
                    "at": now,
                    "detail": {"text": text},
                }
                changed.setdefault(name, (block, []))[1].append(edit)
                applied.append((name, text))

        def write(multi: Pipeline) -> None:
            for name, (block, edits) in changed.items():
                for edit in edits:
                    self._write(
                        multi, k.blocks(user_id), k.block_log(user_id, name), block, edit, now
                    )

        return applied, skipped, write
