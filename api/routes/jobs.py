"""`/v1/fine_tuning/jobs`, shaped like OpenAI's fine-tuning API."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from api.deps import BaseModelIdDep, CallerDep, DispatcherDep, SessionDep, SettingsDep
from api.jobs_dispatch import commit_and_dispatch
from api.openapi import BODY_ERRORS, errors
from api.responses import FineTuningJob, FineTuningJobEventList, FineTuningJobList
from api.schemas import CreateJobRequest, event_object, job_object
from core.service.errors import InvalidInput
from core.service.jobs import cancel_job, create_job, get_job, list_events, list_jobs
from core.service.quotas import check_job_quota
from core.service.users import get_user

router = APIRouter(prefix="/fine_tuning/jobs", tags=["fine-tuning"])


@router.post("", status_code=201, responses={**BODY_ERRORS, **errors(429)})
def create(
    body: CreateJobRequest,
    session: SessionDep,
    caller: CallerDep,
    settings: SettingsDep,
    base_model_id: BaseModelIdDep,
    dispatcher: DispatcherDep,
) -> FineTuningJob:
    """Retrain a user on their current samples. A user key trains only itself, within its quotas
    (`STEER_USER_MAX_ACTIVE_JOBS`, `STEER_USER_MAX_STEPS_PER_JOB`: 429 / 400 beyond them)."""
    user_id = body.user or caller.user_id
    if user_id is None:
        raise InvalidInput("user is required with the admin key", param="user")
    if body.model is not None and body.model not in (base_model_id, settings.base_model):
        raise InvalidInput(f"model must be the served base model {base_model_id!r}", param="model")
    user = get_user(session, caller, user_id)
    if not caller.is_admin:
        check_job_quota(session, settings, user.id, body.hyperparameters)
    job = create_job(session, "retrain", [user], body.hyperparameters)
    commit_and_dispatch(session, dispatcher, [job])
    return job_object(job, base_model_id)


@router.get("")
def list_all(
    session: SessionDep,
    caller: CallerDep,
    base_model_id: BaseModelIdDep,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    user: str | None = None,
) -> FineTuningJobList:
    """Jobs newest first; `after` is the last id of the previous page; filter by `user`."""
    page = list_jobs(session, caller, after=after, limit=limit, user_id=user)
    return FineTuningJobList(data=[job_object(job, base_model_id) for job in page.items], has_more=page.has_more)


@router.get("/{job_id}")
def get_one(job_id: str, session: SessionDep, caller: CallerDep, base_model_id: BaseModelIdDep) -> FineTuningJob:
    return job_object(get_job(session, caller, job_id), base_model_id)


@router.get("/{job_id}/events")
def events(
    job_id: str,
    session: SessionDep,
    caller: CallerDep,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 20,
) -> FineTuningJobEventList:
    """The job's log, newest first: status changes and training metrics (step, losses, speed)."""
    job = get_job(session, caller, job_id)
    cursor = None
    if after is not None:
        digits = after.removeprefix("ftevent-")
        if not digits.isdigit():
            raise InvalidInput(f"unknown cursor 'after={after}'", param="after")
        cursor = int(digits)
    rows, has_more = list_events(session, job, after=cursor, limit=limit)
    return FineTuningJobEventList(data=[event_object(e) for e in rows], has_more=has_more)


@router.post("/{job_id}/cancel", responses=errors(409))
def cancel(job_id: str, session: SessionDep, caller: CallerDep, base_model_id: BaseModelIdDep) -> FineTuningJob:
    """Cancel a queued job now, or ask a running one to stop at its next training step."""
    return job_object(cancel_job(session, caller, job_id), base_model_id)
