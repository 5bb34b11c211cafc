"""Admin operations: batched retraining of many users; the population prefix; the workers that are alive."""

from __future__ import annotations

from dataclasses import asdict

import redis
from fastapi import APIRouter, HTTPException, Request

from api import workers as worker_registry
from api.deps import AdminDep, ContextDep, DispatcherDep, SessionDep
from api.jobs_dispatch import commit_and_dispatch
from api.openapi import ADMIN_ERRORS, BODY_ERRORS, errors
from api.responses import FineTuningJobList, PopulationTraining, Worker, WorkerList
from api.schemas import PopulationRequest, RetrainRequest, control_object, job_object
from core.service.population import train_population
from core.service.registry import active_prefix
from core.service.retrain import RetrainSelection, create_retrain_jobs
from core.service.samples import count_samples

router = APIRouter(prefix="/admin", tags=["admin"], responses={**ADMIN_ERRORS, **BODY_ERRORS})


@router.post("/retrain", status_code=201)
def retrain(
    body: RetrainRequest, _admin: AdminDep, session: SessionDep, ctx: ContextDep, dispatcher: DispatcherDep
) -> FineTuningJobList:
    """Retrain a list of users, all users, or users whose prefix is older than `trained_before`
    or was trained on another base model, as batched jobs of `users_per_job` users each."""
    other_fingerprint = ctx.model_card().fingerprint if body.other_base_model else None
    selection = RetrainSelection(
        user_ids=body.user_ids,
        all_users=body.all,
        trained_before=body.trained_before,
        other_base_fingerprint=other_fingerprint,
    )
    jobs = create_retrain_jobs(session, selection, body.hyperparameters, body.users_per_job)
    commit_and_dispatch(session, dispatcher, jobs)
    base_model_id = ctx.model_card().model_id
    return FineTuningJobList(data=[job_object(job, base_model_id) for job in jobs], has_more=False)


@router.post("/population", status_code=201, responses=errors(409))
def population(
    body: PopulationRequest, _admin: AdminDep, session: SessionDep, ctx: ContextDep, dispatcher: DispatcherDep
) -> PopulationTraining:
    """(Re)train the deployment's population prefix from a sample of every user's text. Users'
    prefix jobs queued after its version is published train on top of it and serve composed with
    it (`STEER_POPULATION_PREFIX`); retrain users (`POST /v1/admin/retrain`) to move them onto it.
    Users already trained keep the population version they trained on."""
    settings = ctx.settings
    control, job, drawn = train_population(
        session, settings, body.samples_per_user, body.max_users, body.hyperparameters, body.seed
    )
    commit_and_dispatch(session, dispatcher, [job])
    return PopulationTraining(
        control=control_object(control, active_prefix(session, control.id), count_samples(session, control.id)),
        users=drawn["users"],
        samples=drawn["samples"],
        job=job_object(job, ctx.model_card().model_id),
    )


@router.get("/workers")
def list_workers(request: Request, _admin: AdminDep, ctx: ContextDep) -> WorkerList:
    """The training and inference workers with a recent heartbeat (within
    `STEER_INFER_WORKER_TIMEOUT_S`), oldest first: host, pid, start, last heartbeat and what each
    works on. Embedded mode has no worker processes: an empty list."""
    try:
        workers = worker_registry.live_workers(ctx)
    except redis.RedisError as exc:
        raise HTTPException(503, "the broker (Redis) is unavailable; retry later") from exc
    return WorkerList(data=[Worker(**asdict(w)) for w in workers], has_more=False)
