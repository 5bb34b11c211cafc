"""Training jobs as rows: created queued, listed, cancelled, and their event log.

Running them is `core.service.training_job.run_training_job`; handing them to a runner is the
caller's business (the API's dispatcher), after the row is committed.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import String, cast, select
from sqlalchemy.orm import Session

from core.db import Job, JobEvent, User, utcnow
from core.db.models import JOB_FINISHED_STATUSES
from core.service.api_keys import Caller
from core.service.errors import Conflict, InvalidInput, NotFound
from core.service.hyperparameters import validate_hyperparameters
from core.service.pagination import Page, paginate
from core.service.samples import count_samples


def create_job(session: Session, kind: str, users: list[User], hyperparameters: object) -> Job:
    """A queued job training `users` (validated: live users, each with samples)."""
    values = validate_hyperparameters(hyperparameters)
    if not users:
        raise InvalidInput("a job needs at least one user", param="user")
    for user in users:
        if count_samples(session, user.id) == 0:
            raise InvalidInput(f"user {user.id} has no writing samples to train on", param="user")
    job = Job(kind=kind, user_ids=[user.id for user in users], hyperparameters=values)
    session.add(job)
    session.flush()
    add_event(session, job.id, f"Created {kind} job for {len(users)} user(s)")
    return job


def add_event(
    session: Session, job_id: str, message: str, data: dict[str, Any] | None = None, level: str = "info"
) -> None:
    session.add(JobEvent(job_id=job_id, message=message, data=data, level=level))


def _visible(job: Job, caller: Caller) -> bool:
    # A user sees the jobs that train only them; batch jobs name other users.
    return caller.is_admin or job.user_ids == [caller.user_id]


def get_job(session: Session, caller: Caller, job_id: str) -> Job:
    job = session.get(Job, job_id)
    if job is None or not _visible(job, caller):
        raise NotFound(f"no fine-tuning job with id {job_id!r}")
    return job


def list_jobs(session: Session, caller: Caller, *, after: str | None, limit: int, user_id: str | None) -> Page[Job]:
    """Jobs newest first, optionally only those that train `user_id`."""
    statement = select(Job)
    if not caller.is_admin:
        if user_id is not None and user_id != caller.user_id:
            return Page(items=[], has_more=False)
        user_id = caller.user_id
    if user_id is not None:
        statement = statement.where(cast(Job.user_ids, String).like(f'%"{user_id}"%'))
    page = paginate(session, statement, Job, after=after, limit=limit, newest_first=True)
    page.items = [job for job in page.items if _visible(job, caller) and (user_id is None or user_id in job.user_ids)]
    return page


def list_events(session: Session, job: Job, *, after: int | None, limit: int) -> tuple[list[JobEvent], bool]:
    """Events newest first, as OpenAI's events endpoint returns them."""
    if not 1 <= limit <= 1000:
        raise InvalidInput("limit must be between 1 and 1000", param="limit")
    statement = select(JobEvent).where(JobEvent.job_id == job.id)
    if after is not None:
        statement = statement.where(JobEvent.id < after)
    rows = list(session.execute(statement.order_by(JobEvent.id.desc()).limit(limit + 1)).scalars())
    return rows[:limit], len(rows) > limit


def cancel_job(session: Session, caller: Caller, job_id: str) -> Job:
    """Queued: cancelled at once. Running: asked to stop; the runner stops at its next step."""
    job = get_job(session, caller, job_id)
    if job.status in JOB_FINISHED_STATUSES:
        raise Conflict(f"job {job_id} is already {job.status}")
    job.cancel_requested = True
    if job.status == "queued":
        job.status = "cancelled"
        job.finished_at = utcnow()
        add_event(session, job.id, "Job cancelled before it started")
    else:
        add_event(session, job.id, "Cancellation requested")
    session.flush()
    return job
