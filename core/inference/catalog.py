"""Which models a caller may use, and which stored prefix a `model` field means.

    <base model id>                 the frozen base model, no prefix
    ft:<base>:<external_id>:v<N>    that exact prefix version (the `fine_tuned_model` of a job);
                                    a version marked corrupt answers a clear error
    ft:<base>:<external_id>         that user's active version
    user:<external_id>              alias of the same: the user's active version

The active version is looked up on every request (one indexed query), so a newly published
version is used by the next request. Authorization is decided here, before anything is queued:
a user key sees only its own models; another user's model is reported exactly like an unknown
one (404), so ids do not leak who exists.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from core.db import PrefixVersion, User
from core.errors import CorruptArtifact
from core.inference.prefix_cache import PrefixRef
from core.service.api_keys import Caller
from core.service.errors import InvalidInput, NotFound
from core.service.model_ids import format_model_id, parse_model_id
from core.service.registry import active_prefix

USER_ALIAS = "user:"


@dataclass(frozen=True)
class ModelEntry:
    id: str
    owned_by: str
    created: int


class NoTrainedPrefix(InvalidInput):
    """The user exists but has no active prefix yet (HTTP 400, code `model_not_ready`)."""

    code = "model_not_ready"


class CorruptModel(CorruptArtifact):
    """That exact version's stored bytes failed their checksum; it is never served."""


def resolve_model(session: Session, caller: Caller, model: str, base_model_id: str) -> PrefixRef | None:
    """The prefix `model` names for `caller` (None: the base model). Raises NotFound / NoTrainedPrefix."""
    if model == base_model_id:
        return None
    external_id, version = _parse(model, base_model_id)
    user = session.scalar(select(User).where(User.external_id == external_id, User.deleted_at.is_(None)))
    if user is None or not caller.may_access(user.id):
        raise NotFound(f"The model '{model}' does not exist or you do not have access to it.")
    if version is None:
        row = active_prefix(session, user.id)
    else:
        row = session.scalar(
            select(PrefixVersion).where(PrefixVersion.user_id == user.id, PrefixVersion.version == version)
        )
    if row is not None and row.base_model_id != base_model_id:
        row = None
    if row is None and version is None:
        raise NoTrainedPrefix(
            f"The user '{external_id}' has no trained prefix yet; train one first, or use the base "
            f"model '{base_model_id}' explicitly.",
            param="model",
        )
    if row is None:
        raise NotFound(f"The model '{model}' does not exist or you do not have access to it.")
    if row.status == "corrupt":
        raise CorruptModel(
            f"The model '{model}' is corrupt in storage (checksum mismatch) and cannot be served; "
            f"use 'user:{external_id}' for the user's current good version."
        )
    return prefix_ref(row)


def prefix_ref(row: PrefixVersion) -> PrefixRef:
    """What a job needs to load the prefix version `row` (the index row's key and checksum)."""
    return PrefixRef(user_id=row.user_id, version=row.version, blob_key=row.blob_key, sha256=row.sha256)


def list_models(session: Session, caller: Caller, base_model_id: str, base_created: int = 0) -> list[ModelEntry]:
    """The base model, then every prefix version (and the `user:` alias of active ones) the caller may use."""
    entries = [ModelEntry(base_model_id, "steer", base_created)]
    query = (
        select(PrefixVersion, User.external_id)
        .join(User, User.id == PrefixVersion.user_id)
        .where(User.deleted_at.is_(None), PrefixVersion.base_model_id == base_model_id)
        .order_by(User.external_id, PrefixVersion.version)
    )
    if not caller.is_admin:
        query = query.where(User.id == caller.user_id)
    for version, external_id in session.execute(query).all():
        if version.status == "corrupt":
            continue
        created = int(version.created_at.timestamp())
        entries.append(ModelEntry(format_model_id(base_model_id, external_id, version.version), external_id, created))
        if version.status == "active":
            entries.append(ModelEntry(USER_ALIAS + external_id, external_id, created))
    return entries


def _parse(model: str, base_model_id: str) -> tuple[str, int | None]:
    if model.startswith(USER_ALIAS) and len(model) > len(USER_ALIAS):
        return model[len(USER_ALIAS) :], None
    ref = parse_model_id(model)
    if ref is None or ref.base_model_id != base_model_id:
        raise NotFound(f"The model '{model}' does not exist or you do not have access to it.")
    return ref.external_id, ref.version
