"""`POST /v1/onboarding`: create (or reuse) a user, store samples, start training, in one call."""

from __future__ import annotations

from fastapi import APIRouter, Request

from api.deps import AdminDep, BaseModelIdDep, DispatcherDep, SessionDep, SettingsDep
from api.jobs_dispatch import commit_and_dispatch
from api.openapi import ADMIN_ERRORS, BODY_ERRORS
from api.responses import Onboarding, OnboardingSamples
from api.schemas import OnboardingRequest, job_object, user_object
from api.uploads import read_sample_upload, upload_openapi
from core.service.api_keys import issue_user_key
from core.service.jobs import create_job
from core.service.population import MAX_USERS, SAMPLES_PER_USER, population_due, train_population
from core.service.samples import add_samples, validate_samples
from core.service.users import get_or_create_user

router = APIRouter(tags=["onboarding"])

_BODY = upload_openapi(OnboardingRequest, {"external_id": {"type": "string"}})


@router.post("/onboarding", status_code=201, openapi_extra=_BODY, responses={**ADMIN_ERRORS, **BODY_ERRORS})
async def onboard(
    request: Request,
    _admin: AdminDep,
    session: SessionDep,
    settings: SettingsDep,
    base_model_id: BaseModelIdDep,
    dispatcher: DispatcherDep,
) -> Onboarding:
    """Create the user (or take the existing one with this external id), add the samples and
    start a training job. The user's API key is in the answer only when the user is new."""
    upload = await read_sample_upload(request, settings, OnboardingRequest)
    texts = validate_samples(upload.samples, settings)
    user, created = get_or_create_user(session, upload.fields["external_id"])
    added, duplicates = add_samples(session, settings, user, texts, upload.source)
    jobs = []
    if population_due(session, settings):  # queued first: an idle deployment trains it before the user
        jobs.append(train_population(session, settings, SAMPLES_PER_USER, MAX_USERS, None)[1])
    job = create_job(session, "onboarding", [user], upload.fields.get("hyperparameters"))
    jobs.append(job)
    key = issue_user_key(session, user) if created else None
    commit_and_dispatch(session, dispatcher, jobs)
    return Onboarding(
        user=user_object(user),
        created=created,
        api_key=key,
        samples=OnboardingSamples(added=len(added), duplicates=duplicates),
        job=job_object(job, base_model_id),
    )
