"""A user's writing samples: list, add (JSON or .txt/.jsonl upload), delete."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request

from api.deps import CallerDep, SessionDep, SettingsDep
from api.openapi import BODY_ERRORS
from api.schemas import SamplesRequest, list_object, sample_object
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
) -> dict[str, Any]:
    user = get_user(session, caller, user_id)
    page = list_samples(session, user, after=after, limit=limit)
    return list_object([sample_object(s) for s in page.items], page.has_more)


@router.post("", status_code=201, openapi_extra=_BODY, responses=BODY_ERRORS)
async def add(
    user_id: str, request: Request, session: SessionDep, caller: CallerDep, settings: SettingsDep
) -> dict[str, Any]:
    """Add samples; exact (whitespace-insensitive) duplicates of stored ones are skipped.
    Training does not start by itself: create a fine-tuning job when ready."""
    user = get_user(session, caller, user_id)
    upload = await read_sample_upload(request, settings, SamplesRequest)
    added, duplicates = add_samples(session, settings, user, validate_samples(upload.samples, settings), upload.source)
    result = list_object([sample_object(s) for s in added], False)
    result["duplicates"] = duplicates
    return result


@router.delete("/{sample_id}")
def remove(user_id: str, sample_id: str, session: SessionDep, caller: CallerDep) -> dict[str, Any]:
    user = get_user(session, caller, user_id)
    delete_sample(session, user, sample_id)
    return {"object": "sample.deleted", "id": sample_id, "deleted": True}
