"""Engines and sessions that behave the same on Postgres and SQLite."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, func, select
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import StaticPool

SQLITE_BUSY_TIMEOUT_MS = 30_000


def _is_sqlite_memory(database: str | None) -> bool:
    return not database or database == ":memory:" or "mode=memory" in database


def _enable_sqlite_pragmas(engine: Engine, *, wal: bool) -> None:
    """SQLite ignores foreign keys (and so ON DELETE CASCADE) unless asked, per connection."""

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute("PRAGMA foreign_keys=ON")
            # Embedded mode shares the file between the API thread and the training thread;
            # wait for a lock instead of failing with "database is locked".
            cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
            # Deleted rows are overwritten with zeros, in their page and in freed overflow pages,
            # so an erased user's text leaves the file (with `truncate_sqlite_wal` for the WAL).
            cursor.execute("PRAGMA secure_delete=ON")
            if wal:
                # Readers do not block the writer (and vice versa).
                cursor.execute("PRAGMA journal_mode=WAL")
        finally:
            cursor.close()


def truncate_sqlite_wal(engine: Engine, attempts: int = 5) -> bool:
    """Copy the WAL of a SQLite file into the database and truncate it to zero bytes; True when
    done (or there is nothing to do: not SQLite, in memory). The WAL holds whole pages as they were
    written, old ones included, so until this runs it can still hold text deleted since.

    A checkpoint cannot finish while another connection reads an older snapshot; each attempt
    waits for readers and writers (busy timeout), then it is retried a few times."""
    if engine.dialect.name != "sqlite" or _is_sqlite_memory(engine.url.database):
        return True
    for _ in range(attempts):
        with engine.connect() as connection:
            busy, _log_frames, _copied = connection.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)").one()
        if not busy:
            return True
    return False


def make_engine(url: str, **kwargs: Any) -> Engine:
    """Create an engine for `url` with the settings Steer relies on.

    SQLite: foreign keys enforced, usable from several threads, parent directory created,
    one shared connection for in-memory databases. Others: connections checked before use,
    so a restarted Postgres does not break the first request after it.
    """
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        connect_args = dict(kwargs.pop("connect_args", {}))
        connect_args.setdefault("check_same_thread", False)
        memory = _is_sqlite_memory(parsed.database)
        if memory:
            kwargs.setdefault("poolclass", StaticPool)
        elif parsed.database:
            Path(parsed.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args=connect_args, **kwargs)
        _enable_sqlite_pragmas(engine, wal=not memory)
        return engine
    kwargs.setdefault("pool_pre_ping", True)
    return create_engine(url, **kwargs)


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    """Sessions whose objects stay readable after commit (handy when returning them to the API)."""
    return sessionmaker(bind=engine, expire_on_commit=False)


@contextmanager
def session_scope(factory: sessionmaker[Session]) -> Iterator[Session]:
    """One unit of work: commit if the block succeeds, roll back if it raises, always close."""
    session = factory()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def database_now(session: Session) -> datetime:
    """The database server's clock, timezone-aware UTC. Times that different hosts write and
    compare (job leases) are taken from here, so a worker whose clock is off cannot make a live
    job look lost, nor a lost one look alive. SQLite has no server (one host): its clock is ours."""
    if session.get_bind().dialect.name == "postgresql":
        # clock_timestamp(), not now(): now() is the transaction's start, and a lease renewal may
        # run in a transaction that waited on a row lock.
        return session.execute(select(func.clock_timestamp())).scalar_one().astimezone(UTC)
    return datetime.now(UTC)
