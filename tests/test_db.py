"""Database: migrations build the schema the models describe, on SQLite and on Postgres."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Engine, delete, func, inspect, select, text
from sqlalchemy.exc import IntegrityError, StatementError
from sqlalchemy.orm import Session, sessionmaker

from core.db import (
    ApiKey,
    Base,
    Job,
    JobEvent,
    PrefixVersion,
    Sample,
    User,
    make_engine,
    make_session_factory,
    new_job_id,
    session_scope,
    utcnow,
)
from core.db.migrate import (
    current_revision,
    head_revision,
    make_alembic_config,
    schema_is_current,
    upgrade_to_head,
)
from core.db.models import JobUser

EXPECTED_TABLES = {"users", "api_keys", "samples", "prefix_versions", "jobs", "job_events"}


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.integration)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """URL of an empty database of each kind (not migrated yet)."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'nested' / 'steer.db'}"
    return request.getfixturevalue("fresh_postgres_database")


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    """An engine on a freshly migrated database."""
    upgrade_to_head(database_url)
    engine = make_engine(database_url)
    try:
        yield engine
    finally:
        engine.dispose()


@pytest.fixture
def sessions(engine: Engine) -> sessionmaker[Session]:
    return make_session_factory(engine)


def _schema_diff(engine: Engine) -> list[object]:
    with engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        return compare_metadata(context, Base.metadata)


def test_migration_builds_the_schema_of_the_models(database_url: str) -> None:
    upgrade_to_head(database_url)
    engine = make_engine(database_url)
    try:
        assert EXPECTED_TABLES <= set(inspect(engine).get_table_names())
        assert current_revision(engine) == head_revision()
        assert schema_is_current(engine)
        assert _schema_diff(engine) == []
    finally:
        engine.dispose()


def test_migration_is_idempotent_and_reversible(database_url: str) -> None:
    upgrade_to_head(database_url)
    upgrade_to_head(database_url)  # already at head: nothing to do, no error
    command.downgrade(make_alembic_config(database_url), "base")
    engine = make_engine(database_url)
    try:
        assert not EXPECTED_TABLES & set(inspect(engine).get_table_names())
        assert current_revision(engine) is None
        upgrade_to_head(database_url)
        assert _schema_diff(engine) == []
    finally:
        engine.dispose()


def _user_with_everything(session: Session, external_id: str) -> tuple[User, Job]:
    user = User(external_id=external_id)
    job = Job(kind="onboarding", user_ids=[], hyperparameters={"n_steps": 5})
    session.add_all([user, job])
    session.flush()
    job.user_ids = [user.id]
    session.add_all(
        [
            ApiKey(user_id=user.id, key_prefix="sk-abcde", key_hash=uuid.uuid4().hex * 2),
            Sample(user_id=user.id, text="hello", sha256="a" * 64, source="api"),
            Sample(user_id=user.id, text="world", sha256="b" * 64, source="upload"),
            PrefixVersion(
                user_id=user.id,
                version=1,
                base_model_id="smollm2",
                base_fingerprint="f" * 64,
                blob_key=f"users/{user.id}/prefixes/1.safetensors",
                sha256="c" * 64,
                bytes=1234,
                prefix_len=16,
                metrics={"loss": 1.5},
                job_id=job.id,
            ),
            JobEvent(job_id=job.id, message="started", data={"step": 0}),
        ]
    )
    return user, job


def _count(session: Session, model: type[Base], user_id: str) -> int:
    return session.scalar(select(func.count()).select_from(model).where(model.user_id == user_id))


def test_the_job_users_migration_keeps_every_jobs_users_in_order(database_url: str) -> None:
    """0010 moves `jobs.user_ids` (JSON) into `job_users` rows, in order, and back on downgrade; an
    id whose user is gone (erased) has no row to point at and is dropped."""
    config = make_alembic_config(database_url)
    upgrade_to_head(database_url)  # makes the database's directory where it is a file
    command.downgrade(config, "base")
    command.upgrade(config, "0009")
    engine = make_engine(database_url)
    try:
        with engine.begin() as connection:
            for uid in ("u1", "u2"):
                connection.execute(
                    text("INSERT INTO users (id, external_id, kind, created_at) VALUES (:id, :id, 'user', :now)"),
                    {"id": uid, "now": utcnow()},
                )
            insert = text(
                "INSERT INTO jobs (id, kind, status, user_ids, hyperparameters, progress, attempts, "
                "cancel_requested, created_at, updated_at) "
                "VALUES (:id, 'admin-batch', 'queued', :users, '{}', '{}', 0, false, :now, :now)"
            )
            connection.execute(insert, {"id": "ftjob-1", "users": '["u2", "gone", "u1"]', "now": utcnow()})
        command.upgrade(config, "head")
        with make_session_factory(engine)() as session:
            assert list(session.get(Job, "ftjob-1").user_ids) == ["u2", "u1"]
        command.downgrade(config, "0009")
        with engine.connect() as connection:
            stored = connection.execute(text("SELECT user_ids FROM jobs WHERE id = 'ftjob-1'")).scalar()
        assert (json.loads(stored) if isinstance(stored, str) else stored) == ["u2", "u1"]
    finally:
        engine.dispose()
        command.downgrade(config, "base")
        upgrade_to_head(database_url)


def test_deleting_a_user_cascades_in_the_database(sessions: sessionmaker[Session]) -> None:
    with session_scope(sessions) as session:
        user, job = _user_with_everything(session, "alice")
        other, _ = _user_with_everything(session, "bob")
        user_id, other_id, job_id = user.id, other.id, job.id

    # A plain DELETE, as erasure issues it: the database itself must remove the children.
    with session_scope(sessions) as session:
        session.execute(delete(User).where(User.id == user_id))

    with session_scope(sessions) as session:
        for model in (ApiKey, Sample, PrefixVersion):
            assert _count(session, model, user_id) == 0
            assert _count(session, model, other_id) > 0
        # Jobs are not owned by one user; they stay until erasure code removes them, without the user.
        assert session.get(Job, job_id) is not None
        assert list(session.get(Job, job_id).user_ids) == []
        assert _count(session, JobUser, other_id) == 1


def test_deleting_a_job_removes_events_and_detaches_prefix_versions(
    sessions: sessionmaker[Session],
) -> None:
    with session_scope(sessions) as session:
        user, job = _user_with_everything(session, "carol")
        user_id, job_id = user.id, job.id
    with session_scope(sessions) as session:
        session.execute(delete(Job).where(Job.id == job_id))
    with session_scope(sessions) as session:
        assert session.scalar(select(func.count()).select_from(JobEvent)) == 0
        version = session.scalars(select(PrefixVersion).where(PrefixVersion.user_id == user_id)).one()
        assert version.job_id is None


def test_sample_sha_is_unique_per_user(sessions: sessionmaker[Session]) -> None:
    with session_scope(sessions) as session:
        first, second = User(external_id="u-1"), User(external_id="u-2")
        session.add_all([first, second])
        session.flush()
        first_id, second_id = first.id, second.id
        session.add(Sample(user_id=first_id, text="same", sha256="d" * 64))
        session.add(Sample(user_id=second_id, text="same", sha256="d" * 64))  # other user: fine

    with pytest.raises(IntegrityError), session_scope(sessions) as session:
        session.add(Sample(user_id=first_id, text="same", sha256="d" * 64))
        session.flush()


def test_prefix_version_number_is_unique_per_user(sessions: sessionmaker[Session]) -> None:
    def version(user_id: str, number: int) -> PrefixVersion:
        return PrefixVersion(
            user_id=user_id,
            version=number,
            base_model_id="tiny",
            base_fingerprint="0" * 64,
            blob_key=f"users/{user_id}/prefixes/{number}.safetensors",
            sha256="1" * 64,
            bytes=1,
            prefix_len=4,
        )

    with session_scope(sessions) as session:
        first, second = User(external_id="v-1"), User(external_id="v-2")
        session.add_all([first, second])
        session.flush()
        first_id, second_id = first.id, second.id
        session.add_all([version(first_id, 1), version(first_id, 2), version(second_id, 1)])

    with pytest.raises(IntegrityError), session_scope(sessions) as session:
        session.add(version(first_id, 2))
        session.flush()


def test_external_id_is_unique(sessions: sessionmaker[Session]) -> None:
    with session_scope(sessions) as session:
        session.add(User(external_id="dup"))
    with pytest.raises(IntegrityError), session_scope(sessions) as session:
        session.add(User(external_id="dup"))


def test_job_status_and_kind_are_checked(sessions: sessionmaker[Session]) -> None:
    with pytest.raises(IntegrityError), session_scope(sessions) as session:
        session.add(Job(kind="onboarding", status="exploded"))
    with pytest.raises(IntegrityError), session_scope(sessions) as session:
        session.add(Job(kind="mystery"))


def test_job_defaults_and_json_round_trip(sessions: sessionmaker[Session]) -> None:
    with session_scope(sessions) as session:
        users = [User(external_id="a"), User(external_id="b")]
        session.add_all(users)
        session.flush()
        ids = [user.id for user in reversed(users)]  # the job's order, not the users' insertion order
        job = Job(kind="admin-batch", user_ids=ids, progress={"step": 3, "loss": [1.0, 0.5]})
        session.add(job)
        job_id = job.id
    assert job_id.startswith("ftjob-") and job_id != new_job_id()
    with session_scope(sessions) as session:
        loaded = session.get(Job, job_id)
        assert loaded is not None
        assert loaded.status == "queued"
        assert loaded.attempts == 0 and loaded.cancel_requested is False
        assert list(loaded.user_ids) == ids
        assert session.execute(select(Job.id).where(Job.trains(ids[1]))).scalars().all() == [job_id]
        loaded.user_ids = ids[1:]  # replaced in one flush (a key of job and position would collide)
    with session_scope(sessions) as session:
        assert list(session.get(Job, job_id).user_ids) == ids[1:]
        assert session.execute(select(Job.id).where(Job.trains(ids[0]))).scalars().all() == []
        assert loaded.progress == {"step": 3, "loss": [1.0, 0.5]}
        assert loaded.hyperparameters == {} and loaded.result is None


def test_timestamps_are_timezone_aware_utc(sessions: sessionmaker[Session]) -> None:
    moment = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC) + timedelta(microseconds=7)
    with session_scope(sessions) as session:
        user = User(external_id="tz", created_at=moment)
        session.add(user)
        user_id = user.id
    with session_scope(sessions) as session:
        loaded = session.get(User, user_id)
        assert loaded is not None
        assert loaded.created_at == moment
        assert loaded.created_at.utcoffset() == timedelta(0)
    assert utcnow().tzinfo is not None

    with pytest.raises(StatementError, match="naive datetime"), session_scope(sessions) as session:
        session.add(User(external_id="naive", created_at=datetime(2030, 1, 1)))
        session.flush()


def test_session_scope_rolls_back_on_error(sessions: sessionmaker[Session]) -> None:
    with pytest.raises(RuntimeError), session_scope(sessions) as session:
        session.add(User(external_id="ghost"))
        session.flush()
        raise RuntimeError("boom")
    with session_scope(sessions) as session:
        assert session.scalar(select(User).where(User.external_id == "ghost")) is None


def test_in_memory_sqlite_is_shared_and_enforces_foreign_keys() -> None:
    engine = make_engine("sqlite://")
    Base.metadata.create_all(engine)  # tests only: the service always migrates
    sessions = make_session_factory(engine)
    with pytest.raises(IntegrityError), session_scope(sessions) as session:
        session.add(Sample(user_id="no-such-user", text="x", sha256="e" * 64))
    with session_scope(sessions) as session:
        session.add(User(external_id="mem"))
    with session_scope(sessions) as session:
        assert session.scalar(select(func.count()).select_from(User)) == 1
    engine.dispose()
