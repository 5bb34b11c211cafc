"""Users: created from the caller's external id, and erased completely on request."""

from __future__ import annotations

import logging
import re

from sqlalchemy import delete, select
from sqlalchemy.orm import Session, sessionmaker

from core.db import Job, Sample, User, utcnow
from core.db.models import JOB_FINISHED_STATUSES
from core.db.session import truncate_sqlite_wal
from core.service.api_keys import Caller
from core.service.errors import InvalidInput, NotFound
from core.service.model_ids import CONTROL_PREFIX, EXTERNAL_ID_PATTERN, POPULATION_CONTROL, POPULATION_COPY_SOURCE
from core.service.pagination import Page, paginate
from core.storage import BlobStore, user_blob_prefix

log = logging.getLogger(__name__)
_ID_PATTERN = re.compile(r"[0-9a-f]{32}")  # core.db.models.new_id


def could_be_user_id(value: object) -> bool:
    """Whether `value` has the shape of a user id (anything else is simply unknown, never queried)."""
    return isinstance(value, str) and _ID_PATTERN.fullmatch(value) is not None


def validate_external_id(external_id: object) -> str:
    if not isinstance(external_id, str) or not EXTERNAL_ID_PATTERN.fullmatch(external_id):
        raise InvalidInput(
            "external_id must be 1-128 characters of letters, digits and . _ @ + -, starting with a letter or digit",
            param="external_id",
        )
    return external_id


def get_or_create_user(session: Session, external_id: str) -> tuple[User, bool]:
    """The live user with `external_id`, creating it if needed; (user, created)."""
    validate_external_id(external_id)
    user = session.execute(select(User).where(User.external_id == external_id)).scalar_one_or_none()
    if user is not None:
        if user.deleted_at is not None:
            raise InvalidInput(f"user {external_id!r} is being deleted; retry in a moment", param="external_id")
        return user, False
    user = User(external_id=external_id)
    session.add(user)
    session.flush()
    return user, True


def get_user(session: Session, caller: Caller, user_id: str) -> User:
    """A live user the caller may see; `NotFound` otherwise (also for other users' ids, and for
    strings that cannot be an id at all, e.g. a lone surrogate from JSON, which the database
    could not even encode)."""
    user = session.get(User, user_id) if could_be_user_id(user_id) else None
    if user is None or user.kind != "user" or user.deleted_at is not None or not caller.may_access(user.id):
        raise NotFound(f"no user with id {user_id!r}")
    return user


def list_users(
    session: Session, caller: Caller, *, after: str | None, limit: int, external_id: str | None
) -> Page[User]:
    statement = select(User).where(User.deleted_at.is_(None), User.kind == "user")
    if not caller.is_admin:
        statement = statement.where(User.id == caller.user_id)
    if external_id is not None:
        statement = statement.where(User.external_id == external_id)
    return paginate(session, statement, User, after=after, limit=limit, newest_first=False)


def delete_user(
    factory: sessionmaker[Session], store: BlobStore, caller: Caller, user_id: str, *, kind: str = "user"
) -> None:
    """Erase a user: keys, samples, every prefix blob and index row, and their jobs.

    Order matters for crash safety: the user is first marked deleted (keys stop working, no new
    prefix can be published), then blobs go, then rows. A crash midway leaves a marked user
    that a retried DELETE finishes; never a row pointing at a deleted blob that is served.
    """
    with factory.begin() as session:
        user = session.get(User, user_id)
        if user is None or user.kind != kind or not caller.may_access(user.id):
            raise NotFound(f"no {kind} with id {user_id!r}")
        user.deleted_at = user.deleted_at or utcnow()
        # Running jobs stop at their next step; queued ones never start.
        for job in _jobs_of(session, user_id):
            if job.status not in JOB_FINISHED_STATUSES:
                job.cancel_requested = True
        if kind == "user":
            _erase_population_copies(session, user_id)
    store.delete_prefix(user_blob_prefix(user_id))
    with factory.begin() as session:
        for job in _jobs_of(session, user_id):
            remaining = [member for member in job.members if member.user_id != user_id]
            if not remaining:
                session.delete(job)  # its events go with it (ON DELETE CASCADE)
            else:
                # A batch job of several users: drop this user from it and from its result.
                job.members = remaining  # the others keep their rows
                if job.result:
                    users = {k: v for k, v in job.result.get("users", {}).items() if k != user_id}
                    job.result = {**job.result, "users": users}
        session.execute(delete(User).where(User.id == user_id))
    # A training job that published between the two steps above left a blob whose row the
    # cascade removed; sweep once more so nothing of the user remains.
    store.delete_prefix(user_blob_prefix(user_id))
    _scrub_database_files(factory)
    log.info("erased user %s", user_id)


def _erase_population_copies(session: Session, user_id: str) -> None:
    """The population prefix's samples are copies of users' (core/service/population.py): an
    erased user's text must not stay there. (What the trained population learnt from it stays until
    the population is retrained.)"""
    session.execute(delete(Sample).where(Sample.source == POPULATION_COPY_SOURCE + user_id))
    # The same text copied under another user's name (both wrote it) goes too.
    population = select(User.id).where(User.external_id == CONTROL_PREFIX + POPULATION_CONTROL)
    own = select(Sample.sha256).where(Sample.user_id == user_id)
    session.execute(delete(Sample).where(Sample.user_id.in_(population), Sample.sha256.in_(own)))


def _scrub_database_files(factory: sessionmaker[Session]) -> None:
    """SQLite: the deleted rows are already zeroed in the file (`secure_delete`), but the WAL still
    holds the pages as they were before; fold it in and truncate it. Postgres keeps dead tuples
    until VACUUM (docs/RELIABILITY.md says what an operator does about that)."""
    with factory() as session:
        engine = session.get_bind()
    if not truncate_sqlite_wal(engine):
        log.warning("erasure: the SQLite WAL could not be truncated (busy readers); the next erasure truncates it")


def _jobs_of(session: Session, user_id: str) -> list[Job]:
    """The jobs that train `user_id`."""
    return list(session.execute(select(Job).where(Job.trains(user_id))).scalars())
