"""SQLAlchemy models. The schema itself is created by the Alembic migrations in `migrations/`;
a test checks that they agree with these classes.

Erasing a user is one `DELETE FROM users`: keys, samples, prefix versions and their places in jobs
(`job_users`) go with it by ON DELETE CASCADE. A job is not tied to one user (an admin batch covers
many), so the erase code, not the database, deletes a job left with no user.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    CheckConstraint,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    event,
    false,
    text,
)
from sqlalchemy.ext.associationproxy import AssociationProxy, association_proxy
from sqlalchemy.ext.orderinglist import ordering_list
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.sql.elements import ColumnElement

from core.db.types import UTCDateTime

# Deterministic constraint names: Alembic needs names to alter constraints (and SQLite batch
# mode needs them to rebuild tables), and they must be the same on every database.
NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

JOB_KINDS = ("onboarding", "retrain", "admin-batch", "control")
SUBJECT_KINDS = ("user", "control")
JOB_STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")
JOB_FINISHED_STATUSES = ("succeeded", "failed", "cancelled")
# corrupt: failed its checksum, never served. candidate: trained but not activated (it scored worse
# than the active version on the user's validation rows); an admin may still activate it.
PREFIX_STATUSES = ("active", "retired", "corrupt", "candidate")

ID_LENGTH = 32  # uuid4().hex
JOB_ID_PREFIX = "ftjob-"
FILE_ID_PREFIX = "file-"


def utcnow() -> datetime:
    """Current time, timezone-aware UTC (what every timestamp column stores)."""
    return datetime.now(UTC)


def new_id() -> str:
    """A fresh random primary key (32 hex chars)."""
    return uuid.uuid4().hex


def new_job_id() -> str:
    """A fresh job id in the OpenAI fine-tuning style, `ftjob-<hex>`."""
    return f"{JOB_ID_PREFIX}{uuid.uuid4().hex}"


def new_file_id() -> str:
    """A fresh file id in the OpenAI Files API style, `file-<hex>`."""
    return f"{FILE_ID_PREFIX}{uuid.uuid4().hex}"


def _in_list(column: str, values: tuple[str, ...]) -> str:
    quoted = ", ".join(f"'{value}'" for value in values)
    return f"{column} IN ({quoted})"


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


@event.listens_for(Base, "init", propagate=True)
def _apply_defaults_at_construction(target: Base, _args: Any, kwargs: dict[str, Any]) -> None:
    """Fill Python-side column defaults when an object is built, not only at INSERT.

    So `Job(kind="retrain").id` is usable at once (to enqueue the task, to return it in the
    response) and `.status` reads "queued" before the first flush.
    """
    for column in target.__table__.columns:
        default = column.default
        if column.key in kwargs or default is None:
            continue
        if default.is_scalar:
            kwargs[column.key] = default.arg
        elif default.is_callable:
            kwargs[column.key] = default.arg(None)  # SQLAlchemy wraps it to take a context


class User(Base):
    """A person whose writing style the service learns. `external_id` is the caller's own id.

    A row of kind "control" is a control prefix (a shared attribute such as "brief", composed with
    users' prefixes per request; core/service/controls.py): it has samples, jobs and prefix versions
    exactly like a user, no API keys, and the external id `control:<name>`, which no user can have.
    """

    __tablename__ = "users"
    __table_args__ = (CheckConstraint(_in_list("kind", SUBJECT_KINDS), name="kind"),)

    id: Mapped[str] = mapped_column(String(ID_LENGTH), primary_key=True, default=new_id)
    external_id: Mapped[str] = mapped_column(String(255), unique=True)
    kind: Mapped[str] = mapped_column(String(16), default="user", server_default="user")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    # Set when erasure starts; rows are removed once blobs are gone.
    deleted_at: Mapped[datetime | None] = mapped_column(UTCDateTime())

    api_keys: Mapped[list[ApiKey]] = relationship(
        back_populates="user", cascade="all, delete-orphan", passive_deletes=True
    )
    samples: Mapped[list[Sample]] = relationship(
        back_populates="user", cascade="all, delete-orphan", passive_deletes=True
    )
    prefix_versions: Mapped[list[PrefixVersion]] = relationship(
        back_populates="user", cascade="all, delete-orphan", passive_deletes=True
    )


class ApiKey(Base):
    """A user's API key. Only a hash is stored; `key_prefix` narrows the lookup to one row."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(ID_LENGTH), primary_key=True, default=new_id)
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    key_prefix: Mapped[str] = mapped_column(String(8), index=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)  # sha256 hex of the full key
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    last_used_at: Mapped[datetime | None] = mapped_column(UTCDateTime())

    user: Mapped[User] = relationship(back_populates="api_keys")


class Sample(Base):
    """One writing sample. The sha256 of the text makes uploads idempotent per user."""

    __tablename__ = "samples"
    __table_args__ = (UniqueConstraint("user_id", "sha256"),)

    id: Mapped[str] = mapped_column(String(ID_LENGTH), primary_key=True, default=new_id)
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    text: Mapped[str] = mapped_column(Text)
    sha256: Mapped[str] = mapped_column(String(64))
    token_count: Mapped[int | None] = mapped_column(Integer)
    source: Mapped[str] = mapped_column(String(64), default="api")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)

    user: Mapped[User] = relationship(back_populates="samples")


class PrefixVersion(Base):
    """A trained prefix of one user. The tensors live in the blob store under `blob_key`.

    `base_fingerprint` identifies the exact base model weights, so a prefix is never loaded
    against a different model. At most one version per user is `active` by convention
    (enforced by the code that promotes versions).
    """

    __tablename__ = "prefix_versions"
    __table_args__ = (
        UniqueConstraint("user_id", "version"),
        CheckConstraint(_in_list("status", PREFIX_STATUSES), name="status"),
        CheckConstraint("version >= 1", name="version_positive"),
    )

    id: Mapped[str] = mapped_column(String(ID_LENGTH), primary_key=True, default=new_id)
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    version: Mapped[int] = mapped_column(Integer)
    base_model_id: Mapped[str] = mapped_column(String(255))
    base_fingerprint: Mapped[str] = mapped_column(String(64))
    blob_key: Mapped[str] = mapped_column(String(512))
    sha256: Mapped[str] = mapped_column(String(64))
    bytes: Mapped[int] = mapped_column(Integer)
    # Optional second artifact: reparameterization / optimizer state for warm-start retraining.
    state_blob_key: Mapped[str | None] = mapped_column(String(512))
    state_sha256: Mapped[str | None] = mapped_column(String(64))
    prefix_len: Mapped[int] = mapped_column(Integer)
    # The population prefix version this one trained on top of, and is served composed with
    # (core/service/population.py); no foreign key: a deleted population leaves the user's prefix
    # servable alone.
    population_version_id: Mapped[str | None] = mapped_column(String(ID_LENGTH))
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    status: Mapped[str] = mapped_column(String(16), default="active")
    job_id: Mapped[str | None] = mapped_column(ForeignKey("jobs.id", ondelete="SET NULL"), index=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)

    user: Mapped[User] = relationship(back_populates="prefix_versions")


class Job(Base):
    """A training job for one user (onboarding, retrain) or many (admin-batch)."""

    __tablename__ = "jobs"
    __table_args__ = (
        CheckConstraint(_in_list("kind", JOB_KINDS), name="kind"),
        CheckConstraint(_in_list("status", JOB_STATUSES), name="status"),
        Index(None, "status", "created_at"),
    )

    id: Mapped[str] = mapped_column(String(64), primary_key=True, default=new_job_id)
    kind: Mapped[str] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(16), default="queued")
    hyperparameters: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    progress: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    error: Mapped[str | None] = mapped_column(Text)
    fine_tuned_model: Mapped[str | None] = mapped_column(String(255))
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, onupdate=utcnow)
    # The lease of the attempt that runs the job: only the holder of `lease_token` may publish or
    # finish it, and it renews `heartbeat_at` while it lives (core/service/job_lease.py).
    lease_token: Mapped[str | None] = mapped_column(String(32))
    heartbeat_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    lease_holder: Mapped[str | None] = mapped_column(String(255))
    """The process holding the lease, "<host>:<pid>:<process namespace>": a redelivery on the same
    namespace takes over at once when that process is gone (core/service/job_lease.py)."""
    dispatched_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    """When the job was last handed to the broker (a queued job silent for long is dispatched again)."""

    events: Mapped[list[JobEvent]] = relationship(
        back_populates="job",
        cascade="all, delete-orphan",
        passive_deletes=True,
        order_by="JobEvent.id",
    )
    members: Mapped[list[JobUser]] = relationship(
        order_by="JobUser.position",
        collection_class=ordering_list("position"),
        cascade="all, delete-orphan",
        passive_deletes=True,
        lazy="selectin",  # every reader of a job reads its users: one query for a whole page of jobs
    )
    user_ids: AssociationProxy[list[str]] = association_proxy(
        "members", "user_id", creator=lambda user_id: JobUser(user_id=user_id)
    )
    """The users the job trains, in order (a list-like view of `members`; assigning replaces them)."""

    @staticmethod
    def trains(user_id: str) -> ColumnElement[bool]:
        """SQL condition: the job trains `user_id` (an indexed lookup in `job_users`)."""
        return Job.members.any(JobUser.user_id == user_id)


class JobUser(Base):
    """One user a job trains, at `position` in the job's order."""

    __tablename__ = "job_users"

    # A surrogate key and no unique (job, user): replacing a job's users deletes and inserts rows in
    # one flush, where either would collide (a job never holds a user twice: core/service/jobs.py).
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    position: Mapped[int] = mapped_column(Integer)


class JobEvent(Base):
    """A line of a job's log, as shown by the fine-tuning events endpoint."""

    __tablename__ = "job_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    level: Mapped[str] = mapped_column(String(16), default="info")
    message: Mapped[str] = mapped_column(Text)
    data: Mapped[dict[str, Any] | None] = mapped_column(JSON)

    job: Mapped[Job] = relationship(back_populates="events")


class File(Base):
    """An uploaded training file (OpenAI's Files API, `purpose="fine-tune"`), kept as uploaded.

    `user_id` is the owner (a user key's upload); null for an admin upload. Erasing the owner
    erases the file (ON DELETE CASCADE)."""

    __tablename__ = "files"

    id: Mapped[str] = mapped_column(String(64), primary_key=True, default=new_file_id)
    user_id: Mapped[str | None] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    filename: Mapped[str] = mapped_column(String(255))
    purpose: Mapped[str] = mapped_column(String(32))
    bytes: Mapped[int] = mapped_column(Integer)
    # Deferred: listings and metadata read the row without its bytes; `data` loads when read.
    data: Mapped[bytes] = mapped_column(LargeBinary, deferred=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


FEEDBACK_KINDS = ("accepted", "edited", "rejected")
PAIR_SOURCES = ("file", "feedback")


class StoredCompletion(Base):
    """A user's chat completion, kept so that what the user did with it (feedback) can become
    training data: the request's messages and each choice's answer. Only where the deployment opted
    in (`STEER_FEEDBACK_ENABLED`), and only until `expires_at` (`STEER_FEEDBACK_RETENTION_DAYS`);
    erased with the user."""

    __tablename__ = "completions"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)  # the answer's own `chatcmpl-...` id
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    model: Mapped[str] = mapped_column(String(255))
    messages: Mapped[list[dict[str, str]]] = mapped_column(JSON)
    answers: Mapped[list[str]] = mapped_column(JSON)  # by choice index
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime(), index=True)


class Feedback(Base):
    """What a user did with one choice of a stored completion: sent it as it was (accepted), sent
    their edit of it (edited, `final_text`), or threw it away (rejected, optionally with what they
    wrote instead). One per choice."""

    __tablename__ = "feedback"
    __table_args__ = (
        UniqueConstraint("completion_id", "choice_index"),
        CheckConstraint(_in_list("kind", FEEDBACK_KINDS), name="kind"),
    )

    id: Mapped[str] = mapped_column(String(ID_LENGTH), primary_key=True, default=new_id)
    completion_id: Mapped[str] = mapped_column(ForeignKey("completions.id", ondelete="CASCADE"))
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    choice_index: Mapped[int] = mapped_column(Integer)
    kind: Mapped[str] = mapped_column(String(16))
    final_text: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class PreferencePairRecord(Base):
    """One preference pair of a user (a request, the answer they preferred, one they did not), from
    a DPO training file or from their feedback; what a DPO job trains on. Erased with the user."""

    __tablename__ = "preference_pairs"
    __table_args__ = (CheckConstraint(_in_list("source", PAIR_SOURCES), name="source"),)

    id: Mapped[str] = mapped_column(String(ID_LENGTH), primary_key=True, default=new_id)
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    messages: Mapped[list[dict[str, str]]] = mapped_column(JSON)
    preferred: Mapped[str] = mapped_column(Text)
    rejected: Mapped[str] = mapped_column(Text)
    source: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
