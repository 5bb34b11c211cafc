"""Users, their API keys and their prefix versions. Erasing a user removes everything of theirs."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request

from api.deps import AdminDep, CallerDep, ContextDep, SessionDep, VersionPath
from api.openapi import ADMIN_ERRORS, errors
from api.responses import (
    ApiKey,
    ApiKeyInfo,
    ApiKeyInfoList,
    ApiKeyRotated,
    PrefixVersion,
    PrefixVersionList,
    User,
    UserDeleted,
    UserList,
)
from api.schemas import api_key_info_object, api_key_object, api_key_rotated_object, prefix_object, user_object
from core.inference.erasure import forget_erased_user
from core.service.api_keys import issue_user_key, list_keys, revoke_key, rotate_key
from core.service.registry import activate_version, active_prefix, list_versions
from core.service.users import delete_user, get_user, list_users

router = APIRouter(prefix="/users", tags=["users"])


@router.get("")
def list_all(
    session: SessionDep,
    caller: CallerDep,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    external_id: str | None = None,
) -> UserList:
    """Users (admin: all; a user key: itself), oldest first; filter by `external_id`."""
    page = list_users(session, caller, after=after, limit=limit, external_id=external_id)
    return UserList(data=[user_object(u, active_prefix(session, u.id)) for u in page.items], has_more=page.has_more)


@router.get("/{user_id}")
def get_one(user_id: str, session: SessionDep, caller: CallerDep) -> User:
    user = get_user(session, caller, user_id)
    return user_object(user, active_prefix(session, user.id))


@router.delete("/{user_id}")
def erase(user_id: str, request: Request, ctx: ContextDep, caller: CallerDep) -> UserDeleted:
    """Erase the user: samples, keys, every prefix blob and index row, their jobs, and their
    prefixes in the serving caches."""
    delete_user(ctx.session_factory, ctx.store, caller, user_id)
    forget_erased_user(request.app.state.completer, ctx.redis(), user_id)
    return UserDeleted(id=user_id, deleted=True)


@router.post("/{user_id}/api_keys", status_code=201, responses=ADMIN_ERRORS)
def new_key(user_id: str, session: SessionDep, admin: AdminDep) -> ApiKey:
    """Issue another key for the user (e.g. the first one was lost). Shown once."""
    user = get_user(session, admin, user_id)
    return api_key_object(issue_user_key(session, user))


@router.get("/{user_id}/api_keys")
def keys(user_id: str, session: SessionDep, caller: CallerDep) -> ApiKeyInfoList:
    """The user's keys (admin, or the user itself), oldest first, revoked ones included; never
    the keys themselves, only their first characters."""
    user = get_user(session, caller, user_id)
    return ApiKeyInfoList(data=[api_key_info_object(row) for row in list_keys(session, user)], has_more=False)


@router.delete("/{user_id}/api_keys/{key_id}")
def revoke(user_id: str, key_id: str, session: SessionDep, caller: CallerDep) -> ApiKeyInfo:
    """Revoke a key (admin, or the user itself, also the key making this call): it answers 401
    from the next request on, on every API process."""
    user = get_user(session, caller, user_id)
    return api_key_info_object(revoke_key(session, user, key_id))


@router.post("/{user_id}/api_keys/{key_id}/rotate", status_code=201, responses=errors(409))
def rotate(user_id: str, key_id: str, session: SessionDep, caller: CallerDep) -> ApiKeyRotated:
    """Issue a new key and revoke this one, in one step (admin, or the user itself). The new key
    is shown once."""
    user = get_user(session, caller, user_id)
    return api_key_rotated_object(*rotate_key(session, user, key_id))


@router.get("/{user_id}/prefixes")
def prefixes(user_id: str, session: SessionDep, caller: CallerDep) -> PrefixVersionList:
    """Every trained prefix version of the user, oldest first; one is `active`."""
    user = get_user(session, caller, user_id)
    return PrefixVersionList(data=[prefix_object(user, row) for row in list_versions(session, user.id)], has_more=False)


@router.post("/{user_id}/prefixes/{version}/activate", responses=errors(409))
def activate(user_id: str, version: VersionPath, session: SessionDep, caller: CallerDep) -> PrefixVersion:
    """Serve this version from now on (roll back to an earlier one, or forward again)."""
    user = get_user(session, caller, user_id)
    return prefix_object(user, activate_version(session, user.id, version))
