"""The prefix registry: which trained prefix versions exist, where their bytes are, which is active.

Invariant: an index row never points at a missing or partial blob. Publishing writes the blob,
reads it back and checks its sha256, and only then commits the row (retiring the previous
active version in the same transaction). If the commit fails, the just-written blob is deleted.
Old versions stay (status "retired") so a user can roll back. A training job publishes a version
that scored worse than the active one on the user's validation rows as a "candidate": stored,
not activated; an admin may still activate it (`activate_version`).

A worker killed between writing the blob and committing the row leaves an unindexed blob; the
next publish for that user (a redelivered attempt, or any later job) and the end of a failed job
remove such blobs under the user's row lock, so they never pile up (`remove_unindexed_blobs`).

A version whose blob fails its checksum when served is marked "corrupt" and never served again;
if it was the active one, the newest good older version becomes active (`quarantine_version`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from core.db import PrefixVersion, User
from core.engine.model import BaseModel
from core.service.crash_points import crash_point
from core.service.errors import Conflict, NotFound
from core.service.job_lease import LeaseLost, holds_lease
from core.service.model_ids import subject_model_id
from core.storage import BlobStore, prefix_blob_key, prefix_state_key, sha256_hex, user_blob_prefix
from core.tuners.artifacts import Prefix, load_prefix

PREFIX_DTYPE = "float16"
"""How versions are stored: half the bytes of float32, and every device serves it (rows are cast as
they join a batch)."""

log = logging.getLogger(__name__)


@dataclass
class PrefixArtifacts:
    """What a training run produced for one user, ready to store."""

    prefix: bytes
    state: bytes | None
    base_model_id: str
    base_fingerprint: str
    prefix_len: int
    metrics: dict[str, Any]
    population_version_id: str | None = None
    """The population version it trained on top of and is served with (core/service/population.py)."""


def publish_prefix(
    factory: sessionmaker[Session],
    store: BlobStore,
    user_id: str,
    artifacts: PrefixArtifacts,
    *,
    job_id: str | None,
    lease_token: str | None = None,
    activate: bool = True,
    expected_active: int | None | Literal["any"] = "any",
    only_if_none_active: bool = False,
) -> PrefixVersion | None:
    """Store a new prefix version of `user_id`, active (the previous one retired) or, with
    `activate=False`, a "candidate" beside the active one; None if the user is gone or going.

    With `expected_active` (the version active when the caller compared against it; None: none
    was), the new version is activated only if that is still the active version: one that became
    active meanwhile was never compared with it, so it stays a candidate.

    With `only_if_none_active`, nothing is stored (None) if the user has an active version by the
    time the user's row is locked: an instant version is a first version only, whichever process
    publishes it (core/service/instant_version.py).

    Idempotent per (user, job): a retried job finds the version its earlier attempt published
    and returns it instead of adding a duplicate. With `lease_token`, raises `LeaseLost` unless
    that attempt still holds the job (the job row stays locked until the commit).
    """
    with factory() as session:
        # The row lock serializes publishers of one user (Postgres; SQLite serializes writers
        # anyway), so two jobs can never pick the same version number and overwrite a blob.
        user = session.execute(select(User).where(User.id == user_id).with_for_update()).scalar_one_or_none()
        if user is None or user.deleted_at is not None:
            return None
        if only_if_none_active and active_prefix(session, user_id) is not None:
            return None
        if lease_token is not None and job_id is not None and not holds_lease(session, job_id, lease_token):
            raise LeaseLost(f"job {job_id} was taken over by another attempt")
        if job_id is not None:
            earlier = session.execute(
                select(PrefixVersion).where(PrefixVersion.user_id == user_id, PrefixVersion.job_id == job_id)
            ).scalar_one_or_none()
            if earlier is not None:
                return earlier
        _sweep_unindexed(session, store, user_id)
        latest = session.execute(
            select(func.max(PrefixVersion.version)).where(PrefixVersion.user_id == user_id)
        ).scalar_one()
        version = (latest or 0) + 1
        key = prefix_blob_key(user_id, version)
        state_key = prefix_state_key(user_id, version) if artifacts.state is not None else None
        written: list[str] = []
        try:
            digest = _put_verified(store, key, artifacts.prefix, written)
            state_digest = (
                _put_verified(store, state_key, artifacts.state, written)
                if state_key is not None and artifacts.state is not None
                else None
            )
            crash_point("after_upload", job_id)
            if activate and expected_active != "any":
                current = active_prefix(session, user_id)
                activate = (None if current is None else current.version) == expected_active
            if activate:
                session.execute(
                    update(PrefixVersion)
                    .where(PrefixVersion.user_id == user_id, PrefixVersion.status == "active")
                    .values(status="retired")
                )
            row = PrefixVersion(
                user_id=user_id,
                version=version,
                base_model_id=artifacts.base_model_id,
                base_fingerprint=artifacts.base_fingerprint,
                blob_key=key,
                sha256=digest,
                bytes=len(artifacts.prefix),
                state_blob_key=state_key,
                state_sha256=state_digest,
                prefix_len=artifacts.prefix_len,
                metrics=artifacts.metrics,
                population_version_id=artifacts.population_version_id,
                status="active" if activate else "candidate",
                job_id=job_id,
            )
            session.add(row)
            session.commit()
        except BaseException:
            session.rollback()
            for orphan in written:
                try:
                    store.delete(orphan)
                except Exception:  # noqa: BLE001 - the original error matters more
                    log.exception("could not remove orphan blob %s", orphan)
            raise
        return row


def remove_unindexed_blobs(factory: sessionmaker[Session], store: BlobStore, user_id: str) -> list[str]:
    """Delete the user's prefix blobs that no index row references (left by a crash between
    upload and commit); returns their keys. Holds the user's row lock, so a publish in flight
    (blob written, row not yet committed) is never mistaken for an orphan."""
    with factory() as session:
        if session.execute(select(User).where(User.id == user_id).with_for_update()).scalar_one_or_none() is None:
            return []
        removed = _sweep_unindexed(session, store, user_id)
        session.commit()
        return removed


def _sweep_unindexed(session: Session, store: BlobStore, user_id: str) -> list[str]:
    """(The caller holds the user's row lock.)"""
    indexed: set[str] = set()
    for blob_key, state_key in session.execute(
        select(PrefixVersion.blob_key, PrefixVersion.state_blob_key).where(PrefixVersion.user_id == user_id)
    ):
        indexed.update(k for k in (blob_key, state_key) if k)
    orphans = [k for k in store.list(user_blob_prefix(user_id) + "prefixes/") if k not in indexed]
    for key in orphans:
        log.warning("removing unindexed blob %s (left by an interrupted publish)", key)
        store.delete(key)
    return orphans


def quarantine_version(factory: sessionmaker[Session], user_id: str, version: int, reason: str) -> PrefixVersion | None:
    """Mark a version whose stored bytes failed verification "corrupt" (it is never served
    again) and, if it was active, activate the newest non-corrupt older version. Returns the
    version now active (None: the user has no usable version left)."""
    with factory.begin() as session:
        session.execute(select(User).where(User.id == user_id).with_for_update()).scalar_one_or_none()
        row = session.execute(
            select(PrefixVersion).where(PrefixVersion.user_id == user_id, PrefixVersion.version == version)
        ).scalar_one_or_none()
        if row is None:
            return None
        was_active = row.status == "active"
        if row.status != "corrupt":
            row.status = "corrupt"
            row.metrics = {**(row.metrics or {}), "corrupt_reason": reason}
            log.error("prefix v%d of user %s is corrupt and was quarantined: %s", version, user_id, reason)
        if was_active:
            fallback = session.execute(
                select(PrefixVersion)
                .where(
                    PrefixVersion.user_id == user_id, PrefixVersion.status == "retired", PrefixVersion.version < version
                )
                .order_by(PrefixVersion.version.desc())
                .limit(1)
            ).scalar_one_or_none()
            if fallback is not None:
                fallback.status = "active"
                log.warning("user %s falls back to prefix v%d", user_id, fallback.version)
        session.flush()
        return active_prefix(session, user_id)


def _put_verified(store: BlobStore, key: str, data: bytes, written: list[str]) -> str:
    written.append(key)
    digest = store.put(key, data)
    # Read back: the row is committed only for bytes we have seen stored intact.
    store.get(key, expected_sha256=sha256_hex(data))
    return digest


def active_prefix(session: Session, user_id: str) -> PrefixVersion | None:
    return session.execute(
        select(PrefixVersion)
        .where(PrefixVersion.user_id == user_id, PrefixVersion.status == "active")
        .order_by(PrefixVersion.version.desc())
        .limit(1)
    ).scalar_one_or_none()


def served_population(session: Session, row: PrefixVersion) -> PrefixVersion | None:
    """The population version `row` is served composed with: the one it trained on, while that
    version still exists and is not corrupt (else `row` is served alone; a warning says so)."""
    if row.population_version_id is None:
        return None
    population = session.get(PrefixVersion, row.population_version_id)
    if population is None or population.status == "corrupt":
        if row.id not in _warned_served_alone:  # once per process, not on every request it serves
            _warned_served_alone.add(row.id)
            why = "deleted" if population is None else "corrupt"
            log.warning("prefix %s v%s: its population version is %s; served alone", row.user_id, row.version, why)
        return None
    return population


_warned_served_alone: set[str] = set()
"""Ids of versions whose lost population `served_population` has logged."""


def served_composition(session: Session, row: PrefixVersion) -> list[PrefixVersion]:
    """The versions a request for `row` is served with, in composition order: the population
    version it trained on (if any, see `served_population`), then `row`. Controls a request names
    come after (core/inference/catalog.py); training scores the active version through this too."""
    population = served_population(session, row)
    return ([] if population is None else [population]) + [row]


class StoredVersion(Protocol):
    blob_key: str
    sha256: str


def read_version(store: BlobStore, version: StoredVersion, base: BaseModel, *, as_stored: bool = False) -> Prefix:
    """A stored version, verified: the blob checked against the sha256 it was indexed with, then the
    artifact's own checks against `base` (core/tuners/artifacts.py). The one reader every training
    job and every serving cache uses: CorruptArtifact / BlobNotFound when it is not sound, the
    store's BlobStoreUnavailable when it cannot be reached (what each caller does about it differs)."""
    return load_prefix(store.get(version.blob_key, expected_sha256=version.sha256), base, as_stored=as_stored)


def list_versions(session: Session, user_id: str) -> list[PrefixVersion]:
    return list(
        session.execute(
            select(PrefixVersion).where(PrefixVersion.user_id == user_id).order_by(PrefixVersion.version)
        ).scalars()
    )


def activate_version(session: Session, user_id: str, version: int) -> PrefixVersion:
    """Make an existing version the active one: rollback, roll forward, or a candidate an admin
    chooses despite its validation loss. A corrupt version never."""
    row = session.execute(
        select(PrefixVersion).where(PrefixVersion.user_id == user_id, PrefixVersion.version == version)
    ).scalar_one_or_none()
    if row is None:
        raise NotFound(f"no prefix version {version}")
    if row.status == "corrupt":
        raise Conflict(f"prefix version {version} is corrupt in the store and cannot be activated")
    session.execute(
        update(PrefixVersion)
        .where(PrefixVersion.user_id == user_id, PrefixVersion.status == "active")
        .values(status="retired")
    )
    row.status = "active"
    session.flush()
    return row


def load_state_bytes(store: BlobStore, version: PrefixVersion) -> bytes | None:
    if not version.state_blob_key:
        return None
    return store.get(version.state_blob_key, expected_sha256=version.state_sha256)


def model_id_of(user: User, version: PrefixVersion) -> str:
    return subject_model_id(version.base_model_id, user.external_id, version.version)
