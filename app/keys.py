"""API keys: ``crl_<prefix>_<secret>``; only the prefix and a SHA-256 of the key are stored."""

from __future__ import annotations

import hashlib
import hmac
import secrets

from sqlmodel import Session, select

from app.errors import AuthError
from app.tables import ApiKey, utcnow

KEY_PREFIX = "crl_"


def _hash(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def create_key(session: Session, name: str) -> tuple[ApiKey, str]:
    """Store a new key named ``name``; returns the row and the plaintext, shown once."""
    if not name or len(name) > 100:
        raise ValueError(f"a key name must be 1 to 100 characters, got {len(name)}")
    prefix = secrets.token_hex(6)
    key = f"{KEY_PREFIX}{prefix}_{secrets.token_urlsafe(32)}"
    row = ApiKey(name=name, prefix=prefix, key_hash=_hash(key))
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


def touch(session: Session, row: ApiKey) -> None:
    row.last_used_at = utcnow()
    session.add(row)
