"""Shared dependencies as typed aliases: a route states what it needs in its signature."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Path, Request, Security
from fastapi.security import HTTPBearer
from sqlalchemy.orm import Session

from api.dispatch import JobDispatcher
from core.config import Settings
from core.db import session_scope
from core.service.api_keys import Caller, authenticate
from core.service.context import ServiceContext
from core.service.errors import PermissionDenied, Unauthenticated
from core.service.model_ids import MAX_VERSION


def get_context(request: Request) -> ServiceContext:
    return request.app.state.ctx


def get_dispatcher(request: Request) -> JobDispatcher:
    return request.app.state.dispatcher


def get_session(ctx: Annotated[ServiceContext, Depends(get_context)]) -> Iterator[Session]:
    """One session per request: committed when the route returns (before the answer is sent),
    rolled back if it raises."""
    with session_scope(ctx.session_factory) as session:
        yield session


ContextDep = Annotated[ServiceContext, Depends(get_context)]


def get_base_model_id(ctx: ContextDep) -> str:
    """The served base model's id, as `/v1/models` and `fine_tuned_model` spell it."""
    return ctx.model_card().model_id


BaseModelIdDep = Annotated[str, Depends(get_base_model_id)]
# scope="function": the commit happens before the answer is sent, so a client's next request sees
# what this one wrote, and a failed commit is answered as an error instead of after a 200.
SessionDep = Annotated[Session, Depends(get_session, scope="function")]
DispatcherDep = Annotated[JobDispatcher, Depends(get_dispatcher)]


def get_settings_dep(ctx: ContextDep) -> Settings:
    return ctx.settings


SettingsDep = Annotated[Settings, Depends(get_settings_dep)]


# Declares the bearer scheme in the OpenAPI schema; the header is parsed below (errors in our format).
_BEARER = HTTPBearer(auto_error=False, description="The admin key or a per-user key (`sk-steer-...`).")


def get_caller(request: Request, ctx: ContextDep, _scheme: Annotated[object, Security(_BEARER)] = None) -> Caller:
    """The admin or the user whose key is in `Authorization: Bearer <key>`; 401 otherwise.

    Its own short session, not the request's: a completion (which needs no other database work)
    must not hold a pooled connection while it waits in the queue and streams; under load that
    exhausted the pool and turned would-be 429s into 500s."""
    header = request.headers.get("authorization", "")
    scheme, _, key = header.partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise Unauthenticated("missing API key: send 'Authorization: Bearer <key>'")
    with ctx.session_factory() as session:
        caller = authenticate(session, key.strip(), ctx.admin_key_hashes)
        session.commit()  # the key's `last_used_at`, when due (at most once a minute)
    if caller is None:
        raise Unauthenticated("invalid API key")
    return caller


CallerDep = Annotated[Caller, Depends(get_caller)]


def require_admin(caller: CallerDep) -> Caller:
    if not caller.is_admin:
        raise PermissionDenied("this endpoint needs the admin key")
    return caller


AdminDep = Annotated[Caller, Depends(require_admin)]


VersionPath = Annotated[int, Path(ge=1, le=MAX_VERSION, description="A prefix version number (`v<N>` of a model id)")]
"""A version number in a path: bounded like the model ids that name versions, so a number past the
database's 64-bit integers is a 400, never an overflow."""
