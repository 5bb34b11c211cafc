"""A user's writing samples: list, add (JSON or .txt/.jsonl upload), delete."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request

from api.deps import CallerDep, SessionDep, SettingsDep
from api.openapi import BODY_ERRORS
from api.responses import SampleDeleted, SampleList, SamplesAdded
from api.schemas import SamplesRequest, sample_object
from api.uploads import read_sample_upload, upload_openapi
from core.service.samples import add_samples, delete_sample, list_samples, validate_samples
from core.service.users import get_user

router = APIRouter(prefix="/users/{user_id}/samples", tags=["samples"])

_BODY = upload_openapi(SamplesRequest, {})


@router.get("")
def list_all(
    user_id: str,
    session: SessionDep,
    caller: CallerDep,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> SampleList:
    user = get_user(session, caller, user_id)
    page = list_samples(session, user, after=after, limit=limit)
    return SampleList(data=[sample_object(s) for s in page.items], has_more=page.has_more)


@router.post("", status_code=201, openapi_extra=_BODY, responses=BODY_ERRORS)
async def add(
    user_id: str, request: Request, session: SessionDep, caller: CallerDep, settings: SettingsDep
) -> SamplesAdded:
    """Add samples; exact (whitespace-insensitive) duplicates of stored ones are skipped.
    Training does not start by itself: create a fine-tuning job when ready."""
    user = get_user(session, caller, user_id)
    upload = await read_sample_upload(request, settings, SamplesRequest)
    added, duplicates = add_samples(session, settings, user, validate_samples(upload.samples, settings), upload.source)
    return SamplesAdded(data=[sample_object(s) for s in added], has_more=False, duplicates=duplicates)


@router.delete("/{sample_id}")
def remove(user_id: str, sample_id: str, session: SessionDep, caller: CallerDep) -> SampleDeleted:
    user = get_user(session, caller, user_id)
    delete_sample(session, user, sample_id)
    return SampleDeleted(id=sample_id, deleted=True)
