"""API keys: ``crl_<prefix>_<secret>``; only the prefix and a SHA-256 of the key are stored."""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
from collections.abc import Callable

from cachetools import TTLCache
from sqlmodel import Session, select

from app.core.errors import AuthError
from app.store.tables import ApiKey, utcnow

KEY_PREFIX = "crl_"


def _hash(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def create_key(session: Session, name: str, *, admin: bool = False) -> tuple[ApiKey, str]:
    """Store a new key named ``name`` (``admin``: it may change governance rules); returns
    the row and the plaintext, shown once."""
    if not name or len(name) > 100:
        raise ValueError(f"a key name must be 1 to 100 characters, got {len(name)}")
    prefix = secrets.token_hex(6)
    key = f"{KEY_PREFIX}{prefix}_{secrets.token_urlsafe(32)}"
    row = ApiKey(name=name, prefix=prefix, key_hash=_hash(key), admin=admin)
    session.add(row)
    session.flush()
    return row, key


def verify_key(session: Session, key: str) -> ApiKey:
    """The live key matching ``key``; AuthError otherwise (same message whatever is wrong)."""
    parts = key.split("_")
    if len(parts) < 3 or not key.startswith(KEY_PREFIX):
        raise AuthError("invalid API key")
    row = session.exec(select(ApiKey).where(ApiKey.prefix == parts[1])).first()
    if (
        row is None
        or row.revoked_at is not None
        or not hmac.compare_digest(row.key_hash, _hash(key))
    ):
        raise AuthError("invalid API key")
    return row


def revoke_key(session: Session, prefix_or_id: str) -> ApiKey:
    """Revoke the key with this prefix (or numeric id); LookupError if there is none."""
    query = select(ApiKey).where(ApiKey.prefix == prefix_or_id)
    row = session.exec(query).first()
    if row is None and prefix_or_id.isdigit():
        row = session.get(ApiKey, int(prefix_or_id))
    if row is None:
        raise LookupError(f"no API key with prefix or id {prefix_or_id!r}")
    if row.revoked_at is None:
        row.revoked_at = utcnow()
        session.add(row)
    return row


class VerifiedKeys:
    """Keys this process verified recently, by the SHA-256 of the key, for ``ttl_s``.

    Every request authenticates; with this, a known key costs a hash and a cache lookup
    instead of a database read. A revoked key stops working within ``ttl_s`` on every API
    process (``CORRAL_API_KEY_CACHE_S``; 0 checks the database on every request). Unknown
    or revoked keys are never remembered. A :class:`cachetools.TTLCache` holds the entries
    (expired on read, the least recently used evicted when full) behind a lock, since the
    API's event loop and its thread pool share it; ``timer`` is its clock.
    """

    def __init__(
        self, ttl_s: float, max_entries: int = 10_000, timer: Callable[[], float] = time.monotonic
    ) -> None:
        self.ttl_s = ttl_s
        self._entries: TTLCache[str, ApiKey] | None = (
            TTLCache(maxsize=max_entries, ttl=ttl_s, timer=timer) if ttl_s > 0 else None
        )
        self._lock = threading.Lock()

    def get(self, key: str) -> ApiKey | None:
        """The row verified for ``key`` less than ``ttl_s`` ago, else None."""
        if self._entries is None:
            return None
        digest = _hash(key)
        with self._lock:
            return self._entries.get(digest)

    def put(self, key: str, row: ApiKey) -> None:
        """Remember that ``key`` verified as ``row``, for ``ttl_s``."""
        if self._entries is None:
            return
        digest = _hash(key)
        with self._lock:
            self._entries[digest] = row
