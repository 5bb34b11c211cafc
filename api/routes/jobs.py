"""`/v1/fine_tuning/jobs`, shaped like OpenAI's fine-tuning API."""

from __future__ import annotations

import re
from typing import Annotated, Literal

from fastapi import APIRouter, Query

from api.deps import BaseModelIdDep, CallerDep, DispatcherDep, SessionDep, SettingsDep
from api.jobs_dispatch import commit_and_dispatch
from api.openapi import BODY_ERRORS, errors
from api.responses import FineTuningJob, FineTuningJobCheckpointList, FineTuningJobEventList, FineTuningJobList
from api.schemas import CreateJobRequest, checkpoint_object, event_object, job_object
from core.service.errors import InvalidInput
from core.service.files import file_pairs, file_texts
from core.service.hyperparameters import OBJECTIVE, openai_method
from core.service.jobs import (
    add_event,
    cancel_job,
    create_job,
    get_job,
    list_checkpoints,
    list_events,
    list_jobs,
    user_to_train,
)
from core.service.preferences import count_pairs, store_pairs
from core.service.quotas import check_job_quota
from core.service.samples import add_samples
from core.tuners.preference import OBJECTIVE_DPO

_EVENT_ID = re.compile(r"[0-9]{1,18}")
JobStatusFilter = Literal["queued", "running", "succeeded", "failed", "cancelled"]

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
    """Retrain a user on their samples, as OpenAI's `fine_tuning.jobs.create`. A user key trains
    only itself, within its quotas (`STEER_USER_MAX_ACTIVE_JOBS`, `STEER_USER_MAX_STEPS_PER_JOB`:
    429 / 400 beyond them); the admin key names the user by `user` (id), `suffix` (external id) or
    `model` (`user:<external_id>`). A `training_file`'s texts join the user's samples first.

    `method={"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.1}}}` is preference tuning: the
    `training_file` holds preference lines, which join the user's pairs (those of their feedback
    too), and the job trains on them all against the user's active version."""
    user = user_to_train(
        session,
        caller,
        user_id=body.user,
        suffix=body.suffix,
        model=body.model,
        base_model_ids=(base_model_id, settings.base_model),
    )
    hyperparameters = _with_seed(openai_method(body.method, body.hyperparameters), body.seed)
    prefers = isinstance(hyperparameters, dict) and hyperparameters.get(OBJECTIVE) == OBJECTIVE_DPO
    read = file_pairs if prefers else file_texts
    from_file: list = []
    if body.training_file is not None:
        from_file = read(session, settings, caller, body.training_file, "training_file")
    if body.validation_file is not None:
        read(session, settings, caller, body.validation_file, "validation_file")
    if prefers and not from_file and count_pairs(session, user.id) == 0:
        message = "a DPO job needs preference pairs: a training_file of preference lines"
        raise InvalidInput(message, param="training_file")
    if not caller.is_admin:
        check_job_quota(session, settings, user.id, hyperparameters)
    if prefers:
        store_pairs(session, user.id, from_file, source="file")
    elif from_file:
        add_samples(session, settings, user, from_file, source="upload")
    job = create_job(session, "retrain", [user], hyperparameters)
    if body.training_file is not None:
        what = "preference pair(s) added" if prefers else "sample(s) added or kept"
        add_event(session, job.id, f"Training file {body.training_file}: {len(from_file)} {what}")
    commit_and_dispatch(session, dispatcher, [job])
    return job_object(job, base_model_id, caller.user_id)


def _with_seed(hyperparameters: object, seed: int | None) -> object:
    if seed is None:
        return hyperparameters
    if hyperparameters is None:
        return {"seed": seed}
    if isinstance(hyperparameters, dict) and hyperparameters.get("seed", seed) == seed:
        return {**hyperparameters, "seed": seed}
    raise InvalidInput("seed and hyperparameters.seed disagree", param="seed")


@router.get("")
def list_all(
    session: SessionDep,
    caller: CallerDep,
    base_model_id: BaseModelIdDep,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    user: str | None = None,
    status: JobStatusFilter | None = None,
) -> FineTuningJobList:
    """Jobs newest first; `after` is the last id of the previous page; filter by `user` (id) and
    `status`. A user key sees every job that trains it, an admin batch too (only its own part)."""
    page = list_jobs(session, caller, after=after, limit=limit, user_id=user, status=status)
    data = [job_object(job, base_model_id, caller.user_id) for job in page.items]
    return FineTuningJobList(data=data, has_more=page.has_more)


@router.get("/{job_id}")
def get_one(job_id: str, session: SessionDep, caller: CallerDep, base_model_id: BaseModelIdDep) -> FineTuningJob:
    return job_object(get_job(session, caller, job_id), base_model_id, caller.user_id)


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
        # ASCII digits that fit the id column: `isdigit()` also takes "²" and any length (a 500).
        digits = after.removeprefix("ftevent-")
        if not _EVENT_ID.fullmatch(digits):
            raise InvalidInput(f"unknown cursor 'after={after[:100]}'", param="after")
        cursor = int(digits)
    rows, has_more = list_events(session, job, after=cursor, limit=limit, caller=caller)
    return FineTuningJobEventList(data=[event_object(e) for e in rows], has_more=has_more)


@router.get("/{job_id}/checkpoints")
def checkpoints(
    job_id: str,
    session: SessionDep,
    caller: CallerDep,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 10,
) -> FineTuningJobCheckpointList:
    """The prefix versions the job published, newest first (a user key: its own only); `after` is
    the last checkpoint id of the previous page."""
    page = list_checkpoints(session, caller, get_job(session, caller, job_id), after=after, limit=limit)
    return FineTuningJobCheckpointList(data=[checkpoint_object(u, v) for u, v in page.items], has_more=page.has_more)


@router.post("/{job_id}/cancel", responses=errors(409))
def cancel(job_id: str, session: SessionDep, caller: CallerDep, base_model_id: BaseModelIdDep) -> FineTuningJob:
    """Cancel a queued job now, or ask a running one to stop at its next training step. A batch
    job that trains other users too: the admin key only (403)."""
    return job_object(cancel_job(session, caller, job_id), base_model_id, caller.user_id)
