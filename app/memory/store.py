"""Conversations and their messages in Redis: ordered, lossless appends with a renewed TTL.

An append is one Lua script: it takes the next sequence numbers from the conversation's
counter (``HINCRBY``), stores each message under its seq, stamps them with the server's
clock, renews the TTL of every key of the conversation and queues the new messages for
embedding — all atomically, so concurrent appends never interleave, reorder or lose a
message, and a retried append with the same idempotency key returns the first one's seqs.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import redis

from app.core.errors import NotFoundError, SpecError
from app.memory.keys import EMBED_PENDING, ROOT, Keys, is_conversation_id, pending_member
from app.memory.schemas import Conversation, Message, from_ms

# Times are the server's (TIME), in ms. redis.replicate_commands() lets a script write after
# TIME on Redis 6 (a no-op on 7). KEYS: the six conversation keys (meta first).
_CREATE = """
redis.replicate_commands()
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('HSET', KEYS[1], 'created_at', now, 'updated_at', now, 'seq', 0, 'embedded', 0,
    'summary_upto', 0, unpack(ARGV, 3))
redis.call('EXPIRE', KEYS[1], ARGV[2])
redis.call('ZADD', KEYS[7], now, ARGV[1])
redis.call('ZADD', KEYS[8], now, ARGV[1])
return now
"""

# ARGV: cid, idempotency key or '', embed '1'/'0', pending prefix, n, bodies...
_APPEND = """
redis.replicate_commands()
if redis.call('EXISTS', KEYS[1]) == 0 then return {-1} end
local idem = ARGV[2]
if idem ~= '' then
  local prev = redis.call('HGET', KEYS[3], idem)
  if prev then return {0, prev} end
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local n = tonumber(ARGV[5])
local last = redis.call('HINCRBY', KEYS[1], 'seq', n)
local first = last - n + 1
for i = 1, n do
  local seq = first + i - 1
  local body = ARGV[5 + i]
  redis.call('HSET', KEYS[2], seq,
      '{"seq":' .. seq .. ',"at":' .. now .. ',' .. string.sub(body, 2))
  if ARGV[3] == '1' then redis.call('ZADD', KEYS[9], now, ARGV[4] .. seq) end
end
local range = first .. ',' .. last
if idem ~= '' then redis.call('HSET', KEYS[3], idem, range) end
redis.call('HSET', KEYS[1], 'updated_at', now)
local ttl = redis.call('HGET', KEYS[1], 'ttl_s')
for i = 1, 6 do redis.call('EXPIRE', KEYS[i], ttl) end
redis.call('ZADD', KEYS[7], now, ARGV[1])
redis.call('ZADD', KEYS[8], now, ARGV[1])
return {1, range}
"""

# Renew the TTL of every key of a conversation (and optionally set a new TTL first).
_TOUCH = """
redis.replicate_commands()
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
if ARGV[2] ~= '' then redis.call('HSET', KEYS[1], 'ttl_s', ARGV[2]) end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('HSET', KEYS[1], 'updated_at', now)
local ttl = redis.call('HGET', KEYS[1], 'ttl_s')
for i = 1, 6 do redis.call('EXPIRE', KEYS[i], ttl) end
redis.call('ZADD', KEYS[7], now, ARGV[1])
redis.call('ZADD', KEYS[8], now, ARGV[1])
return 1
"""

# KEYS: the six conversation keys, tenant convs, user convs, user moments. ARGV: cid.
_DELETE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
for _, seq in ipairs(redis.call('HKEYS', KEYS[4])) do
  redis.call('ZREM', KEYS[9], ARGV[1] .. ':' .. seq)
end
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6])
redis.call('ZREM', KEYS[7], ARGV[1])
redis.call('ZREM', KEYS[8], ARGV[1])
return 1
"""

# ARGV: upto, summary, tokens, model. Only moves the summary forward.
_SET_SUMMARY = """
redis.replicate_commands()
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
local cur = tonumber(redis.call('HGET', KEYS[1], 'summary_upto') or '0')
if tonumber(ARGV[1]) <= cur then return 0 end
local t = redis.call('TIME')
redis.call('HSET', KEYS[1], 'summary_upto', ARGV[1], 'summary', ARGV[2],
    'summary_tokens', ARGV[3], 'summary_model', ARGV[4], 'summary_at', t[1])
return 1
"""

# KEYS: meta, moments, user moments. ARGV: cid, seq, '1' mark / '0' unmark, note.
# Returns {1, n} when done, {-1, 0} without the conversation, {-2, n} when it has no
# message ``seq`` (n: its messages so far, seqs 1 to n).
_MARK = """
redis.replicate_commands()
if redis.call('EXISTS', KEYS[1]) == 0 then return {-1, 0} end
local n = tonumber(redis.call('HGET', KEYS[1], 'seq'))
local seq = tonumber(ARGV[2])
if seq < 1 or seq > n then return {-2, n} end
if ARGV[3] == '1' then
  local t = redis.call('TIME')
  redis.call('HSET', KEYS[2], ARGV[2], ARGV[4])
  redis.call('ZADD', KEYS[3], tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000),
      ARGV[1] .. ':' .. ARGV[2])
  redis.call('EXPIRE', KEYS[2], redis.call('HGET', KEYS[1], 'ttl_s'))
else
  redis.call('HDEL', KEYS[2], ARGV[2])
  redis.call('ZREM', KEYS[3], ARGV[1] .. ':' .. ARGV[2])
end
return {1, n}
"""

_META_FIELDS = (
    "user_id",
    "title",
    "model",
    "system_prompt",
    "metadata",
    "ttl_s",
    "created_at",
    "updated_at",
    "seq",
    "embedded",
    "summary",
    "summary_upto",
    "summary_tokens",
    "summary_model",
    "consolidated_upto",
)


def _s(value: Any) -> str | None:
    return value.decode() if isinstance(value, bytes) else value


@dataclass(frozen=True)
class NewMessage:
    """A message to append (the store adds its seq and time)."""

    role: str
    content: str
    tokens: int | None = None
    tokens_model: str | None = None
    metadata: dict[str, Any] | None = None

    def body(self) -> str:
        return json.dumps(
            {
                "role": self.role,
                "content": self.content,
                "tokens": self.tokens,
                "tokens_model": self.tokens_model,
                "metadata": self.metadata or {},
            },
            separators=(",", ":"),
        )


class ConversationStore:
    """Conversations and messages of every tenant in one Redis database."""

    def __init__(self, client: redis.Redis) -> None:
        self.redis = client
        self._create = client.register_script(_CREATE)
        self._append = client.register_script(_APPEND)
        self._touch = client.register_script(_TOUCH)
        self._delete = client.register_script(_DELETE)
        self._set_summary = client.register_script(_SET_SUMMARY)
        self._mark = client.register_script(_MARK)

    # --- conversations ----------------------------------------------------------------

    def create(
        self,
        tenant: str,
        cid: str,
        user_id: str,
        *,
        ttl_s: int,
        title: str | None = None,
        model: str | None = None,
        system_prompt: str | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> Conversation:
        k = Keys(tenant)
        fields: list[str] = ["user_id", user_id, "ttl_s", str(ttl_s)]
        fields += ["metadata", json.dumps(metadata or {})]
        for name, value in (("title", title), ("model", model), ("system_prompt", system_prompt)):
            if value is not None:
                fields += [name, value]
        self._create(
            keys=[k.conv(cid), *k.conversation_keys(cid)[1:], k.convs, k.user_convs(user_id)],
            args=[cid, ttl_s, *fields],
        )
        return self.get(tenant, cid)

    def _keys_for(self, k: Keys, cid: str, user_id: str) -> list[str]:
        return [*k.conversation_keys(cid), k.convs, k.user_convs(user_id)]

    def find(self, tenant: str, cid: str) -> Conversation | None:
        """The conversation, or None when it does not exist (or expired) for this tenant."""
        if not is_conversation_id(cid):
            return None
        k = Keys(tenant)
        pipe = self.redis.pipeline(transaction=False)
        pipe.hmget(k.conv(cid), _META_FIELDS)
        pipe.pttl(k.conv(cid))
        values, pttl = pipe.execute()
        row = dict(zip(_META_FIELDS, (_s(v) for v in values), strict=True))
        if row["user_id"] is None:
            return None
        return Conversation(
            id=cid,
            user_id=row["user_id"],
            title=row["title"],
            model=row["model"],
            system_prompt=row["system_prompt"],
            metadata=json.loads(row["metadata"] or "{}"),
            ttl_s=int(row["ttl_s"] or 0),
            expires_in_s=pttl / 1000 if pttl and pttl > 0 else None,
            created_at=from_ms(float(row["created_at"] or 0)),
            updated_at=from_ms(float(row["updated_at"] or 0)),
            message_count=int(row["seq"] or 0),
            embedded_count=int(row["embedded"] or 0),
            summary=row["summary"],
            summary_upto=int(row["summary_upto"] or 0),
            summary_tokens=int(row["summary_tokens"]) if row["summary_tokens"] else None,
            summary_model=row["summary_model"],
            consolidated_upto=int(row["consolidated_upto"] or 0),
        )

    def get(self, tenant: str, cid: str) -> Conversation:
        """The conversation; NotFoundError when it does not exist for this tenant."""
        conv = self.find(tenant, cid)
        if conv is None:
            raise NotFoundError(f"no conversation {cid!r}")
        return conv

    def update(
        self,
        tenant: str,
        cid: str,
        *,
        title: str | None = None,
        system_prompt: str | None = None,
        metadata: dict[str, Any] | None = None,
        ttl_s: int | None = None,
    ) -> Conversation:
        conv = self.get(tenant, cid)
        k = Keys(tenant)
        fields: dict[str, str] = {}
        if title is not None:
            fields["title"] = title
        if system_prompt is not None:
            fields["system_prompt"] = system_prompt
        if metadata is not None:
            fields["metadata"] = json.dumps(metadata)
        if fields:
            self.redis.hset(k.conv(cid), mapping=fields)  # type: ignore[arg-type]
        self.touch(tenant, cid, conv.user_id, ttl_s=ttl_s)
        return self.get(tenant, cid)

    def touch(self, tenant: str, cid: str, user_id: str, *, ttl_s: int | None = None) -> bool:
        """Renew the conversation's TTL (activity); False when it no longer exists."""
        k = Keys(tenant)
        done = self._touch(
            keys=self._keys_for(k, cid, user_id), args=[cid, "" if ttl_s is None else ttl_s]
        )
        return bool(done)

    def delete(self, tenant: str, cid: str) -> Conversation:
        """Remove a conversation and everything it holds; returns what it was."""
        conv = self.get(tenant, cid)
        k = Keys(tenant)
        self._delete(
            keys=[*self._keys_for(k, cid, conv.user_id), k.user_moments(conv.user_id)],
            args=[cid],
        )
        return conv

    def list_page(
        self, tenant: str, *, user_id: str | None = None, limit: int = 50, cursor: str | None = None
    ) -> tuple[list[Conversation], str | None]:
        """Conversations, most recently active first; expired ones are dropped on the way."""
        k = Keys(tenant)
        index = k.user_convs(user_id) if user_id else k.convs
        top: str | float = "+inf"
        after_id: str | None = None
        if cursor:
            top, after_id = _decode_cursor(cursor)
        out: list[Conversation] = []
        last: tuple[float, str] | None = None
        while len(out) <= limit:
            rows = cast(
                list[tuple[bytes, float]],
                self.redis.zrevrangebyscore(
                    index, top, "-inf", start=0, num=limit * 2 + 10, withscores=True
                ),
            )
            progressed = False
            for raw, score in rows:
                cid = raw.decode()
                if after_id is not None and score == top and cid >= after_id:
                    continue
                progressed = True
                top, after_id = score, cid
                conv = self.find(tenant, cid)
                if conv is None:
                    self._forget(tenant, cid, user_id)
                    continue
                if len(out) == limit:
                    return out, _encode_cursor(*last) if last else None
                out.append(conv)
                last = (score, cid)
            if not progressed:
                break
        return out, None

    def _forget(self, tenant: str, cid: str, user_id: str | None) -> None:
        """Drop an expired conversation from the indexes that outlive it."""
        k = Keys(tenant)
        self.redis.zrem(k.convs, cid)
        if user_id:
            self.redis.zrem(k.user_convs(user_id), cid)

    def prune_expired(self, *, grace_ms: int = 1000, batch: int = 500) -> int:
        """Drop conversations that have expired from every index that outlives them.

        A conversation's own keys expire by TTL; the tenant's and the user's lists of
        conversations (and the user's key moments) are sorted sets without one. Beat runs
        this every ``CORRAL_MEMORY_PRUNE_S``: it walks the lists and removes the entries whose
        conversation is gone, in pipelined batches. Returns how many conversations it
        removed from their tenant's list.
        """
        secs, micros = self.redis.time()
        cutoff = secs * 1000 + micros // 1000 - grace_ms  # active since then: alive
        removed = 0
        for raw in self.redis.scan_iter(match=f"{ROOT}:*:convs", count=1000):
            index = raw.decode()
            tenant, _, rest = index[len(ROOT) + 1 :].partition(":")
            user_id = rest[len("user:") : -len(":convs")] if rest.startswith("user:") else None
            k = Keys(tenant)
            start = 0
            while True:
                cids = [
                    c.decode()
                    for c in cast(
                        list[bytes],
                        self.redis.zrangebyscore(index, "-inf", cutoff, start=start, num=batch),
                    )
                ]
                if not cids:
                    break
                pipe = self.redis.pipeline(transaction=False)
                for cid in cids:
                    pipe.exists(k.conv(cid))
                gone = [cid for cid, alive in zip(cids, pipe.execute(), strict=True) if not alive]
                if gone:
                    self.redis.zrem(index, *gone)
                    if user_id is None:
                        removed += len(gone)
                    else:
                        self._forget_moments(k.user_moments(user_id), gone)
                if len(cids) < batch:
                    break
                start += len(cids) - len(gone)
        return removed

    def _forget_moments(self, user_moments: str, cids: Sequence[str]) -> None:
        for cid in cids:
            members = [m for m, _ in self.redis.zscan_iter(user_moments, match=f"{cid}:*")]
            if members:
                self.redis.zrem(user_moments, *members)

    def user_conversations(self, tenant: str, user_id: str) -> list[str]:
        """Ids of the user's conversations (some may have just expired)."""
        raw = cast(list[bytes], self.redis.zrange(Keys(tenant).user_convs(user_id), 0, -1))
        return [r.decode() for r in raw]

    # --- messages ---------------------------------------------------------------------

    def append(
        self,
        tenant: str,
        conv: Conversation,
        messages: Sequence[NewMessage],
        *,
        idempotency_key: str | None = None,
        embed: bool = True,
        client: Any = None,
    ) -> list[int]:
        """Append messages in order; returns their seqs.

        ``client`` may be a pipeline (bulk loads); the seqs are then unknown (``[]``).
        With ``idempotency_key``, a repeat returns the first append's seqs and adds nothing.
        """
        if not messages:
            return []
        k = Keys(tenant)
        result = self._append(
            keys=[*self._keys_for(k, conv.id, conv.user_id), EMBED_PENDING],
            args=[
                conv.id,
                idempotency_key or "",
                "1" if embed else "0",
                pending_member(tenant, conv.id, 0)[:-1],
                len(messages),
                *(m.body() for m in messages),
            ],
            client=client,
        )
        if client is not None:
            return []
        status = int(result[0])
        if status < 0:
            raise NotFoundError(f"no conversation {conv.id!r}")
        first, last = (int(x) for x in _s(result[1]).split(","))  # type: ignore[union-attr]
        return list(range(first, last + 1))

    def messages(self, tenant: str, cid: str, seqs: Sequence[int]) -> list[Message]:
        """The messages with these seqs that exist, in the order asked."""
        if not seqs:
            return []
        k = Keys(tenant)
        pipe = self.redis.pipeline(transaction=False)
        pipe.hmget(k.msgs(cid), list(seqs))
        pipe.hmget(k.moments(cid), list(seqs))
        bodies, notes = pipe.execute()
        out = []
        for body, note in zip(bodies, notes, strict=True):
            if body is None:
                continue
            out.append(_message(cid, body, note))
        return out

    def page(self, tenant: str, cid: str, *, after: int = 0, limit: int = 50) -> list[Message]:
        """Messages with seq > ``after``, oldest first."""
        conv = self.get(tenant, cid)
        last = min(conv.message_count, after + limit)
        return self.messages(tenant, cid, range(after + 1, last + 1))

    def latest(self, tenant: str, conv: Conversation, n: int) -> list[Message]:
        """The last ``n`` messages, oldest first."""
        first = max(1, conv.message_count - n + 1)
        return self.messages(tenant, conv.id, range(first, conv.message_count + 1))

    def set_summary(
        self, tenant: str, cid: str, *, upto: int, summary: str, tokens: int, model: str
    ) -> bool:
        """Replace the rolling summary if it covers more than the stored one."""
        done = int(
            self._set_summary(keys=[Keys(tenant).conv(cid)], args=[upto, summary, tokens, model])
        )
        if done < 0:
            raise NotFoundError(f"no conversation {cid!r}")
        return done == 1

    # --- key moments ------------------------------------------------------------------

    def mark(self, tenant: str, cid: str, seq: int, *, on: bool, note: str | None = None) -> None:
        """Mark a message as a key moment (a breakthrough worth recalling), or unmark it."""
        conv = self.get(tenant, cid)
        k = Keys(tenant)
        done, count = (
            int(x)
            for x in self._mark(
                keys=[k.conv(cid), k.moments(cid), k.user_moments(conv.user_id)],
                args=[cid, seq, "1" if on else "0", note or ""],
            )
        )
        if done == -2:
            raise NotFoundError(
                f"conversation {cid!r} has no message {seq}: "
                + (f"its messages are seq 1 to {count}" if count else "it has no messages yet")
            )
        if done < 0:
            raise NotFoundError(f"no conversation {cid!r}")

    def key_moments(self, tenant: str, user_id: str, limit: int = 20) -> list[Message]:
        """The user's key moments across conversations, newest mark first."""
        k = Keys(tenant)
        raw = cast(list[bytes], self.redis.zrevrange(k.user_moments(user_id), 0, limit * 2 + 10))
        out: list[Message] = []
        for member in raw:
            cid, _, seq = member.decode().partition(":")
            found = self.messages(tenant, cid, [int(seq)])
            if not found or not found[0].key_moment:
                self.redis.zrem(k.user_moments(user_id), member)  # expired or unmarked
                continue
            out.append(found[0])
            if len(out) == limit:
                break
        return out


def _message(cid: str, body: bytes, note: bytes | None) -> Message:
    data = json.loads(body)
    return Message(
        conversation_id=cid,
        seq=data["seq"],
        role=data["role"],
        content=data["content"],
        tokens=data.get("tokens"),
        tokens_model=data.get("tokens_model"),
        metadata=data.get("metadata") or {},
        created_at=from_ms(data["at"]),
        key_moment=note is not None,
        note=note.decode() or None if note is not None else None,
    )


def _encode_cursor(score: float, cid: str) -> str:
    return base64.urlsafe_b64encode(f"{score!r}|{cid}".encode()).decode()


def _decode_cursor(cursor: str) -> tuple[float, str]:
    try:
        score, _, cid = base64.urlsafe_b64decode(cursor.encode()).decode().partition("|")
        top = float(score)
    except (ValueError, binascii.Error, UnicodeDecodeError) as exc:
        raise SpecError.single(
            ("query", "cursor"), "invalid cursor: pass a page's next_cursor as it is", "cursor"
        ) from exc
    if not math.isfinite(top):  # only a page's last activity time (ms) is ever handed out
        raise SpecError.single(
            ("query", "cursor"), "invalid cursor: pass a page's next_cursor as it is", "cursor"
        )
    return top, cid
