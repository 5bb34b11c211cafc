"""Controls: shared attribute prefixes that any request may compose with a user's prefix
(`model: "user:alice+brief"`, or `controls: ["brief"]` in the body). The admin creates, retrains
and deletes them; every key may list and use them."""

from __future__ import annotations

from fastapi import APIRouter, Request

from api.deps import (
    AdminDep,
    BaseModelIdDep,
    CallerDep,
    ContextDep,
    DispatcherDep,
    SessionDep,
    SettingsDep,
    VersionPath,
)
from api.jobs_dispatch import commit_and_dispatch
from api.openapi import ADMIN_ERRORS, BODY_ERRORS, errors
from api.responses import (
    Control,
    ControlCreated,
    ControlDeleted,
    ControlList,
    FineTuningJob,
    OnboardingSamples,
    PrefixVersionList,
)
from api.responses import PrefixVersion as PrefixVersionBody
from api.schemas import ControlRequest, RetrainControlRequest, control_object, job_object, prefix_object
from api.uploads import read_sample_upload, upload_openapi
from core.db import User
from core.service.controls import create_control, delete_control, get_control, list_controls, train_control
from core.service.registry import activate_version, active_prefix, list_versions
from core.service.samples import count_samples, validate_samples

router = APIRouter(prefix="/controls", tags=["controls"])

_BODY = upload_openapi(ControlRequest, {"name": {"type": "string"}})


def _object(session, control: User) -> Control:
    return control_object(control, active_prefix(session, control.id), count_samples(session, control.id))


@router.post("", status_code=201, openapi_extra=_BODY, responses={**ADMIN_ERRORS, **BODY_ERRORS, **errors(409)})
async def create(
    request: Request,
    _admin: AdminDep,
    session: SessionDep,
    settings: SettingsDep,
    base_model_id: BaseModelIdDep,
    dispatcher: DispatcherDep,
) -> ControlCreated:
    """Define a control from example texts of its attribute (JSON `samples`, or .txt/.jsonl files)
    and start training it; requests may use it once its first version is published."""
    upload = await read_sample_upload(request, settings, ControlRequest)
    texts = validate_samples(upload.samples, settings)
    control, job, duplicates = create_control(
        session, settings, upload.fields["name"], texts, upload.source, upload.fields.get("hyperparameters")
    )
    commit_and_dispatch(session, dispatcher, [job])
    return ControlCreated(
        control=_object(session, control),
        samples=OnboardingSamples(added=len(texts) - duplicates, duplicates=duplicates),
        job=job_object(job, base_model_id),
    )


@router.post("/{name}/retrain", status_code=201, responses={**ADMIN_ERRORS, **BODY_ERRORS})
def retrain(
    name: str,
    session: SessionDep,
    _admin: AdminDep,
    base_model_id: BaseModelIdDep,
    dispatcher: DispatcherDep,
    body: RetrainControlRequest | None = None,
) -> FineTuningJob:
    """Train a new version of the control (e.g. after users were retrained on a new base model)."""
    job = train_control(session, get_control(session, name), None if body is None else body.hyperparameters)
    commit_and_dispatch(session, dispatcher, [job])
    return job_object(job, base_model_id)


@router.get("")
def list_all(session: SessionDep, _caller: CallerDep) -> ControlList:
    """Every control, by name; any key may use them."""
    return ControlList(data=[_object(session, c) for c in list_controls(session)], has_more=False)


@router.get("/{name}")
def get_one(name: str, session: SessionDep, _caller: CallerDep) -> Control:
    return _object(session, get_control(session, name))


@router.get("/{name}/versions")
def versions(name: str, session: SessionDep, _caller: CallerDep) -> PrefixVersionList:
    """Every trained version of the control, oldest first; one is `active`."""
    control = get_control(session, name)
    rows = list_versions(session, control.id)
    return PrefixVersionList(data=[prefix_object(control, row) for row in rows], has_more=False)


@router.post("/{name}/versions/{version}/activate", responses={**ADMIN_ERRORS, **errors(409)})
def activate(name: str, version: VersionPath, session: SessionDep, _admin: AdminDep) -> PrefixVersionBody:
    """Serve this version of the control from now on (roll back, or forward again)."""
    control = get_control(session, name)
    return prefix_object(control, activate_version(session, control.id, version))


@router.delete("/{name}", responses=ADMIN_ERRORS)
def erase(name: str, ctx: ContextDep, _admin: AdminDep) -> ControlDeleted:
    """Delete the control: its samples, every version's blob and row, and its jobs."""
    with ctx.session_factory() as session:
        control_id = get_control(session, name).id
    delete_control(ctx.session_factory, ctx.store, name)
    return ControlDeleted(id=control_id, name=name, deleted=True)
