"""API keys: `sk-steer-...` for users, `sk-steer-admin-...` for a generated admin key.

Only the sha256 of a key is stored. `key_prefix` (8 characters of the random part) narrows the
lookup to a row or two; the final comparison is constant-time.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from core.db import ApiKey, User

KEY_PREFIX = "sk-steer-"
ADMIN_KEY_PREFIX = "sk-steer-admin-"
_LOOKUP_CHARS = 8


@dataclass(frozen=True)
class Caller:
    """Who is calling: the admin, or one user (by internal id)."""

    is_admin: bool
    user_id: str | None = None

    def may_access(self, user_id: str) -> bool:
        return self.is_admin or self.user_id == user_id


ADMIN = Caller(is_admin=True)


def generate_key(*, admin: bool = False) -> str:
    return (ADMIN_KEY_PREFIX if admin else KEY_PREFIX) + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def _lookup_prefix(key: str) -> str:
    return key[len(KEY_PREFIX) :][:_LOOKUP_CHARS]


def issue_user_key(session: Session, user: User) -> str:
    """Create a key for `user` and return it; only its hash is stored."""
    key = generate_key()
    session.add(ApiKey(user_id=user.id, key_prefix=_lookup_prefix(key), key_hash=hash_key(key)))
    session.flush()
    return key


def authenticate(session: Session, key: str, admin_hashes: frozenset[str]) -> Caller | None:
    """The caller a key belongs to, or None if it matches no admin or active user key."""
    if not key:
        return None
    digest = hash_key(key)
    if any(hmac.compare_digest(digest, admin) for admin in admin_hashes):
        return ADMIN
    if not key.startswith(KEY_PREFIX) or key.startswith(ADMIN_KEY_PREFIX):
        return None
    rows = session.execute(
        select(ApiKey.key_hash, ApiKey.user_id)
        .join(User, User.id == ApiKey.user_id)
        .where(
            ApiKey.key_prefix == _lookup_prefix(key),
            ApiKey.revoked_at.is_(None),
            User.deleted_at.is_(None),
        )
    ).all()
    for key_hash, user_id in rows:
        if hmac.compare_digest(digest, key_hash):
            return Caller(is_admin=False, user_id=user_id)
    return None
