"""Dashboard sign-in: a session per browser, kept in Redis, named by an HTTP-only cookie.

Signing in with an API key creates ``corral:ui:session:<token>`` = {key id, CSRF token}
for ``CORRAL_UI_SESSION_TTL_S`` (renewed on use); the browser holds only the random
token, in a ``Secure``, ``HttpOnly``, ``SameSite=Strict`` cookie. Every page re-reads the
key, so a revoked key ends its sessions. Every form that changes something carries the
session's CSRF token, compared in constant time.
"""

from __future__ import annotations

import hmac
import json
import secrets
from dataclasses import dataclass

from app.core.config import get_settings
from app.core.redis import get_redis

COOKIE = "corral_session"
_KEY = "corral:ui:session:{token}"


@dataclass(frozen=True)
class UiSession:
    """A signed-in browser: its cookie token, the API key it acts as, its CSRF token."""

    token: str
    key_id: int
    csrf: str

    def csrf_ok(self, sent: str | None) -> bool:
        return sent is not None and hmac.compare_digest(self.csrf, sent)


def create(key_id: int) -> UiSession:
    """A new session acting as API key ``key_id``."""
    session = UiSession(secrets.token_urlsafe(32), key_id, secrets.token_urlsafe(32))
    body = json.dumps({"key_id": key_id, "csrf": session.csrf})
    get_redis().set(_KEY.format(token=session.token), body, ex=get_settings().ui_session_ttl_s)
    return session


def load(token: str | None) -> UiSession | None:
    """The live session behind a cookie (its lifetime renewed), else None."""
    if not token or len(token) > 100:
        return None
    key = _KEY.format(token=token)
    pipe = get_redis().pipeline(transaction=False)
    pipe.get(key)
    pipe.expire(key, get_settings().ui_session_ttl_s)
    raw, _ = pipe.execute()
    if raw is None:
        return None
    data = json.loads(raw)
    return UiSession(token, int(data["key_id"]), str(data["csrf"]))


def drop(token: str) -> None:
    get_redis().delete(_KEY.format(token=token))
