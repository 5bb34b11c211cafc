"""`/v1/files`: training files, shaped like OpenAI's Files API (`purpose="fine-tune"`)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Form, Query, Request, UploadFile
from fastapi.responses import PlainTextResponse, Response

from api.deps import CallerDep, SessionDep, SettingsDep
from api.openapi import BODY_ERRORS
from api.responses import File, FileDeleted, FileList
from api.schemas import file_object
from core.service.errors import InvalidInput
from core.service.files import create_file, delete_file, get_file, list_files

router = APIRouter(prefix="/files", tags=["files"])


@router.post("", responses=BODY_ERRORS)
async def upload(
    file: Annotated[
        UploadFile,
        Form(
            description='.jsonl: one {"messages": [...]} (chat format; the assistant turns are the '
            'user\'s writing) or {"text": ...} object per line; .txt: one sample per paragraph'
        ),
    ],
    purpose: Annotated[str, Form(description='"fine-tune"')],
    request: Request,
    session: SessionDep,
    caller: CallerDep,
    settings: SettingsDep,
) -> File:
    """Upload a training file; it is checked now (400 naming the bad line) and kept as sent. A user
    key owns it; an admin upload belongs to no user and only the admin key sees it."""
    if len((await request.form()).getlist("file")) > 1:  # the form is parsed once; this reads it again
        raise InvalidInput("upload one file per request (this one has several `file` parts)", param="file")
    data = await file.read()
    row = create_file(session, settings, caller, file.filename or "", purpose, data)
    session.commit()  # before answering: the client may name the file in its very next request
    return file_object(row)


@router.get("")
def list_all(
    session: SessionDep,
    caller: CallerDep,
    purpose: str | None = None,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> FileList:
    """Files newest first (a user key: its own); `after` is the last id of the previous page."""
    page = list_files(session, caller, purpose=purpose, after=after, limit=limit)
    return FileList(data=[file_object(row) for row in page.items], has_more=page.has_more)


@router.get("/{file_id}")
def get_one(file_id: str, session: SessionDep, caller: CallerDep) -> File:
    return file_object(get_file(session, caller, file_id))


@router.get(
    "/{file_id}/content",
    response_class=Response,
    responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}, "description": "The file as sent"}},
)
def content(file_id: str, session: SessionDep, caller: CallerDep) -> Response:
    """The file's bytes as uploaded (UTF-8 text: it was checked when uploaded)."""
    return PlainTextResponse(get_file(session, caller, file_id).data)


@router.delete("/{file_id}")
def remove(file_id: str, session: SessionDep, caller: CallerDep) -> FileDeleted:
    """Delete the file; samples a job already took from it stay the user's samples."""
    row = delete_file(session, caller, file_id)
    session.commit()
    return FileDeleted(id=row.id, deleted=True)
