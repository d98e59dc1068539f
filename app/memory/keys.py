"""Redis key layout of conversation memory, and the checks on the ids that go into keys.

Everything a tenant (an API key) owns lives under ``corral:mem:{tenant}:``::

    corral:mem:{t}:convs                       ZSET  conversation id → last activity (ms)
    corral:mem:{t}:conv:{cid}                  HASH  conversation metadata, seq counter, summary
    corral:mem:{t}:conv:{cid}:msgs             HASH  seq → message JSON (seq 1, 2, … in order)
    corral:mem:{t}:conv:{cid}:idem             HASH  idempotency key → appended seqs (JSON)
    corral:mem:{t}:conv:{cid}:moments          SET   seqs marked as key moments
    corral:mem:{t}:conv:{cid}:vec              STRING  scan index: records (int64 seq, f32[dim])
    corral:mem:{t}:conv:{cid}:vecbits          STRING  bitmap: seq has a vector
    corral:mem:{t}:conv:{cid}:summarising      STRING  lock: a summary workflow is queued
    corral:mem:{t}:conv:{cid}:consolidating    STRING  claim: a consolidation run has it
    corral:mem:{t}:vec:{dim}:{cid}:{seq}       HASH  RediSearch index documents (when available)
    corral:mem:{t}:user:{uid}:convs            ZSET  the user's conversations → last activity
    corral:mem:{t}:user:{uid}:moments          ZSET  "cid:seq" → time, the user's key moments
    corral:mem:{t}:user:{uid}:blocks           HASH  block name → block JSON
    corral:mem:{t}:user:{uid}:block:{name}:log LIST  the block's edit history, newest first
    corral:mem:{t}:user:{uid}:archive          HASH  archival entry id → entry JSON
    corral:mem:{t}:user:{uid}:archive:time     ZSET  archival entry id → creation order
    corral:mem:{t}:user:{uid}:archive:vec      HASH  archival entry id → f32[dim], normalised
    corral:mem:{t}:toolruns:{scope}            HASH  tool calls already executed by a step

Every key of a conversation carries the conversation's TTL, renewed together on activity.
Shared keys: ``corral:mem:_embed:pending`` (ZSET of "tenant|cid|seq" waiting for a vector)
and ``corral:mem:_rpc:{id}`` (short-lived replies of query embeddings).
"""

from __future__ import annotations

import re

from app.core.errors import SpecError

ROOT = "corral:mem"
EMBED_PENDING = f"{ROOT}:_embed:pending"
EMBED_KICK = f"{ROOT}:_embed:kick"

USER_ID_PATTERN = r"^[A-Za-z0-9_.@-]{1,128}$"
CONVERSATION_ID_PATTERN = r"^[0-9a-f]{32}$"
BLOCK_NAME_PATTERN = r"^[a-z][a-z0-9_]{0,63}$"
_USER_ID = re.compile(USER_ID_PATTERN)
_CONVERSATION_ID = re.compile(CONVERSATION_ID_PATTERN)
_BLOCK_NAME = re.compile(BLOCK_NAME_PATTERN)


def tenant_of(api_key_id: int | None) -> str:
    """The tenant a key's data lives under (``_`` for work submitted without a key)."""
    return str(api_key_id) if api_key_id is not None else "_"


def key_id_of(tenant: str) -> int | None:
    """The API key id of a tenant (None for ``_``)."""
    return None if tenant == "_" else int(tenant)


def check_user_id(user_id: str, loc: tuple[str | int, ...] = ("user_id",)) -> str:
    if not _USER_ID.match(user_id):
        raise SpecError.single(
            loc,
            f"user_id must be 1 to 128 letters, digits, '_', '.', '@' or '-', got {user_id!r}",
            "user_id",
        )
    return user_id


def check_block_name(name: str, loc: tuple[str | int, ...] = ("name",)) -> str:
    if not _BLOCK_NAME.match(name):
        raise SpecError.single(
            loc,
            "a block name is a lowercase letter then up to 63 lowercase letters, digits or "
            f"'_', got {name!r}",
            "block_name",
        )
    return name


def is_conversation_id(value: str) -> bool:
    return bool(_CONVERSATION_ID.match(value))


class Keys:
    """Key names for one tenant."""

    def __init__(self, tenant: str) -> None:
        self.tenant = tenant
        self.base = f"{ROOT}:{tenant}"

    @property
    def convs(self) -> str:
        return f"{self.base}:convs"

    def conv(self, cid: str) -> str:
        return f"{self.base}:conv:{cid}"

    def msgs(self, cid: str) -> str:
        return f"{self.base}:conv:{cid}:msgs"

    def idem(self, cid: str) -> str:
        return f"{self.base}:conv:{cid}:idem"

    def moments(self, cid: str) -> str:
        return f"{self.base}:conv:{cid}:moments"

    def vec(self, cid: str) -> str:
        return f"{self.base}:conv:{cid}:vec"

    def vecbits(self, cid: str) -> str:
        return f"{self.base}:conv:{cid}:vecbits"

    def summarising(self, cid: str) -> str:
        return f"{self.base}:conv:{cid}:summarising"

    def consolidating(self, cid: str) -> str:
        return f"{self.base}:conv:{cid}:consolidating"

    def conversation_keys(self, cid: str) -> list[str]:
        """Every key that lives and expires with a conversation (metadata first)."""
        return [
            self.conv(cid),
            self.msgs(cid),
            self.idem(cid),
            self.moments(cid),
            self.vec(cid),
            self.vecbits(cid),
        ]

    def vec_doc_prefix(self, dim: int) -> str:
        return f"{self.base}:vec:{dim}:"

    def vec_doc(self, dim: int, cid: str, seq: int) -> str:
        return f"{self.base}:vec:{dim}:{cid}:{seq}"

    def user_convs(self, uid: str) -> str:
        return f"{self.base}:user:{uid}:convs"

    def user_moments(self, uid: str) -> str:
        return f"{self.base}:user:{uid}:moments"

    def blocks(self, uid: str) -> str:
        return f"{self.base}:user:{uid}:blocks"

    def block_log(self, uid: str, name: str) -> str:
        return f"{self.base}:user:{uid}:block:{name}:log"

    def archive(self, uid: str) -> str:
        return f"{self.base}:user:{uid}:archive"

    def archive_time(self, uid: str) -> str:
        return f"{self.base}:user:{uid}:archive:time"

    def archive_vec(self, uid: str) -> str:
        return f"{self.base}:user:{uid}:archive:vec"

    def toolruns(self, scope: str) -> str:
        return f"{self.base}:toolruns:{scope}"

    def index_name(self, dim: int) -> str:
        return f"{self.base}:idx:{dim}"


def pending_member(tenant: str, cid: str, seq: int) -> str:
    return f"{tenant}|{cid}|{seq}"


def parse_pending(member: str) -> tuple[str, str, int]:
    tenant, cid, seq = member.split("|")
    return tenant, cid, int(seq)
