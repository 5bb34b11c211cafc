"""API keys: `sk-steer-...` for users, `sk-steer-admin-...` for a generated admin key.

Only the sha256 of a key is stored. `key_prefix` (8 characters of the random part) narrows the
lookup to a row or two; the final comparison is constant-time. Every request is authenticated
against the database (no cache in any process), so a revoked key answers 401 on its next request,
on every API process. A key's `last_used_at` is written at most once a `LAST_USED_RESOLUTION`.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session

from core.db import ApiKey, User, utcnow
from core.service.errors import Conflict, NotFound

KEY_PREFIX = "sk-steer-"
ADMIN_KEY_PREFIX = "sk-steer-admin-"
_LOOKUP_CHARS = 8
LAST_USED_RESOLUTION = timedelta(minutes=1)


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
    return _issue(session, user)[0]


def _issue(session: Session, user: User) -> tuple[str, ApiKey]:
    key = generate_key()
    row = ApiKey(user_id=user.id, key_prefix=_lookup_prefix(key), key_hash=hash_key(key))
    session.add(row)
    session.flush()
    return key, row


def shown_prefix(row: ApiKey) -> str:
    """The start of a key as listings show it (`sk-steer-` and 8 characters), to tell keys apart."""
    return KEY_PREFIX + row.key_prefix


def list_keys(session: Session, user: User) -> list[ApiKey]:
    """Every key of `user`, revoked ones included (with `revoked_at`), oldest first."""
    statement = select(ApiKey).where(ApiKey.user_id == user.id).order_by(ApiKey.created_at, ApiKey.id)
    return list(session.execute(statement).scalars())


def _key_of(session: Session, user: User, key_id: str) -> ApiKey:
    row = session.get(ApiKey, key_id)
    if row is None or row.user_id != user.id:
        raise NotFound(f"no API key with id {key_id!r}")
    return row


def revoke_key(session: Session, user: User, key_id: str) -> ApiKey:
    """Revoke one of `user`'s keys: it answers 401 from the next request on. Revoking a revoked
    key changes nothing (the first revocation time stays)."""
    row = _key_of(session, user, key_id)
    if row.revoked_at is None:
        row.revoked_at = utcnow()
        session.flush()
    return row


def rotate_key(session: Session, user: User, key_id: str) -> tuple[str, ApiKey, ApiKey]:
    """Issue a new key for `user` and revoke `key_id` in one transaction: (new key, its row, the
    revoked row). Only a live key can be rotated, once: the revocation is conditional, so two
    concurrent rotations of the same key issue one new key, and the other gets `Conflict`."""
    old = _key_of(session, user, key_id)
    revoked = session.execute(
        update(ApiKey)
        .where(ApiKey.id == old.id, ApiKey.revoked_at.is_(None))
        .values(revoked_at=utcnow())
        .execution_options(synchronize_session="fetch")
    )
    if revoked.rowcount != 1:
        raise Conflict(f"API key {key_id!r} is revoked; it cannot be rotated (issue a new key instead)")
    session.refresh(old)
    key, row = _issue(session, user)
    return key, row, old


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
        select(ApiKey.key_hash, ApiKey.user_id, ApiKey.id, ApiKey.last_used_at)
        .join(User, User.id == ApiKey.user_id)
        .where(
            ApiKey.key_prefix == _lookup_prefix(key),
            ApiKey.revoked_at.is_(None),
            User.deleted_at.is_(None),
        )
    ).all()
    for key_hash, user_id, key_id, last_used_at in rows:
        if hmac.compare_digest(digest, key_hash):
            _record_use(session, key_id, last_used_at)
            return Caller(is_admin=False, user_id=user_id)
    return None


def _record_use(session: Session, key_id: str, last_used_at) -> None:
    """Set the key's `last_used_at`, at most once a `LAST_USED_RESOLUTION`: the read above already
    says whether it is due, and the write is conditional, so concurrent requests (or API
    processes) with the same key write it once. The caller commits."""
    now = utcnow()
    cutoff = now - LAST_USED_RESOLUTION
    if last_used_at is not None and last_used_at > cutoff:
        return
    session.execute(
        update(ApiKey)
        .where(ApiKey.id == key_id, or_(ApiKey.last_used_at.is_(None), ApiKey.last_used_at <= cutoff))
        .values(last_used_at=now)
        .execution_options(synchronize_session=False)
    )
