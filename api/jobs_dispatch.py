"""Commit, then dispatch: a worker must never receive the id of a job it cannot read yet."""

from __future__ import annotations

from sqlalchemy.orm import Session

from api.dispatch import JobDispatcher
from core.db import Job, database_now, utcnow
from core.service.errors import DispatchError
from core.service.jobs import add_event


def commit_and_dispatch(session: Session, dispatcher: JobDispatcher, jobs: list[Job]) -> None:
    """Commit the session, then hand each job over. A job the broker refused is marked failed
    (so it does not sit queued forever) and the caller gets 503."""
    dispatched_at = database_now(session)  # compared with the database's clock by the lost-job sweep
    for job in jobs:
        job.dispatched_at = dispatched_at
    session.commit()
    for job in jobs:
        try:
            dispatcher.submit(job.id)
        except DispatchError as exc:
            job.status, job.finished_at, job.error = "failed", utcnow(), str(exc)
            add_event(session, job.id, str(exc), level="error")
            session.commit()
            raise
