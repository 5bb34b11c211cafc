"""Training jobs as rows: created queued, listed, cancelled, and their event log.

Running them is `core.service.training_job.run_training_job`; handing them to a runner is the
caller's business (the API's dispatcher), after the row is committed.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from core.db import Job, JobEvent, PrefixVersion, User, utcnow
from core.db.models import JOB_FINISHED_STATUSES, JOB_STATUSES
from core.service.api_keys import Caller
from core.service.errors import Conflict, InvalidInput, NotFound, PermissionDenied
from core.service.hyperparameters import validate_hyperparameters
from core.service.model_ids import parse_model_id
from core.service.pagination import Page, paginate
from core.service.samples import count_samples
from core.service.users import get_user

USER_ALIAS = "user:"  # core.inference.catalog.USER_ALIAS (core/service does not import inference)


def create_job(session: Session, kind: str, users: list[User], hyperparameters: object) -> Job:
    """A queued job training `users` (validated: live users, each with samples)."""
    values = validate_hyperparameters(hyperparameters)
    if not users:
        raise InvalidInput("a job needs at least one user", param="user")
    for user in users:
        if count_samples(session, user.id) == 0:
            raise InvalidInput(f"user {user.id} has no writing samples to train on", param="user")
    job = Job(kind=kind, user_ids=list(dict.fromkeys(user.id for user in users)), hyperparameters=values)
    session.add(job)
    session.flush()
    add_event(session, job.id, f"Created {kind} job for {len(users)} user(s)")
    return job


def add_event(
    session: Session, job_id: str, message: str, data: dict[str, Any] | None = None, level: str = "info"
) -> None:
    session.add(JobEvent(job_id=job_id, message=message, data=data, level=level))


def _visible(job: Job, caller: Caller) -> bool:
    # A user sees every job that trains them, an admin batch too (shown narrowed to that user:
    # `api.schemas.job_object`, `list_events`, `list_checkpoints`).
    return caller.is_admin or caller.user_id in job.user_ids


def _shared(job: Job, caller: Caller) -> bool:
    """Whether `caller` sees only its own part of a job that also trains other users."""
    return not caller.is_admin and len(job.user_ids) > 1


def get_job(session: Session, caller: Caller, job_id: str) -> Job:
    job = session.get(Job, job_id)
    if job is None or not _visible(job, caller):
        raise NotFound(f"no fine-tuning job with id {job_id!r}")
    return job


def members_of_jobs_in_flight(session: Session, user_id: str) -> list[list[str]]:
    """The user lists of the queued or running jobs that train `user_id`."""
    jobs = session.scalars(select(Job).where(Job.status.in_(("queued", "running")), Job.trains(user_id)))
    return [list(job.user_ids) for job in jobs]


def has_job_in_flight(session: Session, user_id: str) -> bool:
    """Whether a queued or running job trains `user_id` (their instant version may be on its way)."""
    return bool(members_of_jobs_in_flight(session, user_id))


def list_jobs(
    session: Session, caller: Caller, *, after: str | None, limit: int, user_id: str | None, status: str | None = None
) -> Page[Job]:
    """Jobs newest first, optionally only those that train `user_id`, or in `status`."""
    if status is not None and status not in JOB_STATUSES:
        raise InvalidInput(f"status must be one of {', '.join(JOB_STATUSES)}", param="status")
    statement = select(Job)
    if status is not None:
        statement = statement.where(Job.status == status)
    if not caller.is_admin:
        if user_id is not None and user_id != caller.user_id:
            return Page(items=[], has_more=False)
        user_id = caller.user_id
    if user_id is not None:
        statement = statement.where(Job.trains(user_id))
    page = paginate(session, statement, Job, after=after, limit=limit, newest_first=True)
    page.items = [job for job in page.items if _visible(job, caller) and (user_id is None or user_id in job.user_ids)]
    return page


def list_events(
    session: Session, job: Job, *, after: int | None, limit: int, caller: Caller | None = None
) -> tuple[list[JobEvent], bool]:
    """Events newest first, as OpenAI's events endpoint returns them. A user key reading a batch
    job that trains others too gets the job's own events and its own user's, not theirs."""
    if not 1 <= limit <= 1000:
        raise InvalidInput("limit must be between 1 and 1000", param="limit")
    statement = select(JobEvent).where(JobEvent.job_id == job.id)
    if after is not None:
        statement = statement.where(JobEvent.id < after)
    statement = statement.order_by(JobEvent.id.desc())
    if caller is None or not _shared(job, caller):
        rows = list(session.execute(statement.limit(limit + 1)).scalars())
    else:
        others = [uid for uid in job.user_ids if uid != caller.user_id]
        rows = [event for event in session.execute(statement).scalars() if _about(event, caller.user_id, others)]
    return rows[:limit], len(rows) > limit


def _about(event: JobEvent, user_id: str | None, others: list[str]) -> bool:
    """Whether a batch job's event may be shown to `user_id`: it names no other user."""
    named = (event.data or {}).get("user_id")
    if named is not None:
        return named == user_id
    return not any(uid in event.message for uid in others)


def list_checkpoints(
    session: Session, caller: Caller, job: Job, *, after: str | None, limit: int
) -> Page[tuple[User, PrefixVersion]]:
    """The prefix versions `job` published (a user key: only its own user's), newest first."""
    statement = select(PrefixVersion).where(PrefixVersion.job_id == job.id)
    if not caller.is_admin:
        statement = statement.where(PrefixVersion.user_id == caller.user_id)
    page = paginate(session, statement, PrefixVersion, after=after, limit=limit, newest_first=True)
    users = {row.user_id: session.get(User, row.user_id) for row in page.items}
    items = [(users[row.user_id], row) for row in page.items if users[row.user_id] is not None]
    return Page(items=items, has_more=page.has_more)  # type: ignore[arg-type]


def cancel_job(session: Session, caller: Caller, job_id: str) -> Job:
    """Queued: cancelled at once. Running: asked to stop; the runner stops at its next step."""
    job = get_job(session, caller, job_id)
    if _shared(job, caller):
        raise PermissionDenied("this job trains other users too; only the admin key may cancel it")
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


def user_to_train(
    session: Session,
    caller: Caller,
    *,
    user_id: str | None,
    suffix: str | None,
    model: str | None,
    base_model_ids: tuple[str, ...],
) -> User:
    """The one user a job request names: by id (`user`), by external id (`suffix`), or by a model
    id of theirs (`user:<external_id>`, `ft:<base>:<external_id>[:v<N>]`; the base model names
    nobody). A user key trains itself: naming anyone else answers 404, as for a user that does
    not exist. The admin key must name someone; names that disagree are refused."""
    named: list[tuple[str, User]] = []
    if user_id is not None:
        named.append(("user", get_user(session, caller, user_id)))
    if suffix is not None:
        named.append(("suffix", _user_by_external_id(session, caller, suffix)))
    if model is not None and model not in base_model_ids:
        external_id = _external_id_of_model(model, base_model_ids[0])
        named.append(("model", _user_by_external_id(session, caller, external_id)))
    if not named:
        if caller.user_id is None:
            raise InvalidInput(
                "name the user to train with the admin key: `user` (id), `suffix` (external id) "
                "or `model` (`user:<external_id>`)",
                param="user",
            )
        return get_user(session, caller, caller.user_id)
    first = named[0][1]
    for param, user in named[1:]:
        if user.id != first.id:
            raise InvalidInput(f"{param} names another user than {named[0][0]}", param=param)
    return first


def _external_id_of_model(model: str, base_model_id: str) -> str:
    if model.startswith(USER_ALIAS) and len(model) > len(USER_ALIAS):
        return model[len(USER_ALIAS) :]
    ref = parse_model_id(model)
    if ref is None or ref.base_model_id != base_model_id:
        raise InvalidInput(
            f"model must be the served base model {base_model_id!r} or a model id of the user to train",
            param="model",
        )
    return ref.external_id


def _user_by_external_id(session: Session, caller: Caller, external_id: str) -> User:
    user = session.execute(
        select(User).where(User.external_id == external_id, User.kind == "user", User.deleted_at.is_(None))
    ).scalar_one_or_none()
    if user is None or not caller.may_access(user.id):
        raise NotFound(f"no user with external id {external_id!r}")
    return user
