"""Which models a caller may use, and which stored prefixes a `model` field means.

    <base model id>                 the frozen base model, no prefix
    ft:<base>:<external_id>:v<N>    that exact prefix version (the `fine_tuned_model` of a job);
                                    a version marked corrupt answers a clear error
    ft:<base>:<external_id>         that user's active version
    user:<external_id>              alias of the same: the user's active version
    control:<name>                  the base model with that control's active version
    <any of the above>+<name>...    composed with controls, e.g. `user:alice+formal+brief`

Controls may also be named in the request body (`controls: [...]`, `extra_body` in the openai
client); they follow those of the model string. Each composed part is a prefix of its own; a row's
prefix is their concatenation, user first (the order does not change the result: attention over
prefix keys does not depend on their order, and tokens start after all of them). A user version
trained on top of the deployment's population prefix brings that population version with it, first
(core/service/population.py).

External ids may contain `+`, so the model part is the *longest* `+`-separated head that names a
model the caller may use; the rest are control names. (A user `bob+formal` therefore wins over
`bob` with the control `formal`.)

The active version is looked up on every request (one indexed query), so a newly published
version is used by the next request. Authorization is decided here, before anything is queued:
a user key sees only its own models; another user's model is reported exactly like an unknown
one (404), so ids do not leak who exists. Every key may use every control.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import and_, or_, select
from sqlalchemy.orm import Session

from core.db import PrefixVersion, User
from core.errors import CorruptArtifact
from core.inference.prefix_cache import PrefixRef
from core.service import controls
from core.service.api_keys import Caller
from core.service.errors import InvalidInput, NotFound
from core.service.model_ids import (
    EXTERNAL_ID_PATTERN,
    POPULATION_CONTROL,
    format_model_id,
    parse_control_ref,
    parse_model_id,
)
from core.service.registry import active_prefix, served_composition

USER_ALIAS = "user:"
CONTROL_SEPARATOR = "+"


@dataclass(frozen=True)
class ModelEntry:
    id: str
    owned_by: str
    created: int


class NoTrainedPrefix(InvalidInput):
    """The user exists but has no active prefix yet (HTTP 400, code `model_not_ready`).

    `user_id` is set when the model was a user's alias (`user:<id>`): its instant version may be a
    moment away (`CompletionService.resolve` waits for it while the user has a job in flight)."""

    code = "model_not_ready"

    def __init__(self, message: str, param: str | None = None, user_id: str | None = None) -> None:
        super().__init__(message, param=param)
        self.user_id = user_id


class CorruptModel(CorruptArtifact):
    """That exact version's stored bytes failed their checksum; it is never served."""


def resolve_model(
    session: Session, caller: Caller, model: str, base_model_id: str, control_names: Sequence[str] = ()
) -> list[PrefixRef]:
    """The prefixes `model` (and `control_names`) name for `caller`, in composition order: the
    user's (if any), then each control's. Empty: the bare base model.
    Raises NotFound / NoTrainedPrefix / CorruptModel / InvalidInput."""
    head, named = _split_controls(session, caller, model, base_model_id)
    wanted = [*named]
    for text in control_names:
        ref = parse_control_ref(text) if isinstance(text, str) else None
        if ref is None:
            raise InvalidInput(f"{text!r} is not a control name (name or name:v<N>)", param="controls")
        wanted.append(ref)
    if len({name for name, _ in wanted}) != len(wanted):
        raise InvalidInput("a control is named twice", param="model")
    if len(wanted) > controls.MAX_CONTROLS_PER_REQUEST:
        raise InvalidInput(f"at most {controls.MAX_CONTROLS_PER_REQUEST} controls per request", param="model")
    if len(head) > 1 and any(name == POPULATION_CONTROL for name, _ in wanted):
        raise InvalidInput(
            "this model already includes the population prefix it was trained on; do not name it", param="model"
        )
    refs = [_control_ref(session, name, version, base_model_id) for name, version in wanted]
    return head + refs


def _split_controls(
    session: Session, caller: Caller, model: str, base_model_id: str
) -> tuple[list[PrefixRef], list[tuple[str, int | None]]]:
    """(the prefixes of the model part, the controls after it); see the module docstring.

    Only the cuts that leave at most `MAX_CONTROLS_PER_REQUEST` controls are tried, longest head
    first, so a long `+` chain costs a handful of lookups whatever its length (a chain of 3,000
    parts once cost a query per cut and seconds of CPU)."""
    parts = model.split(CONTROL_SEPARATOR)
    shortest_head = max(1, len(parts) - controls.MAX_CONTROLS_PER_REQUEST)
    for cut in range(len(parts), shortest_head - 1, -1):
        tail = [parse_control_ref(part) for part in parts[cut:]]
        if None in tail:
            continue
        head = CONTROL_SEPARATOR.join(parts[:cut])
        if head.startswith(controls.EXTERNAL_ID_PREFIX):
            alone = parse_control_ref(head.removeprefix(controls.EXTERNAL_ID_PREFIX))
            if alone is not None:
                return [], [alone, *tail]
            continue
        try:
            return _resolve_one(session, caller, head, base_model_id), tail
        except NotFound:
            continue
    if shortest_head > 1:
        raise InvalidInput(f"at most {controls.MAX_CONTROLS_PER_REQUEST} controls per request", param="model")
    raise NotFound(f"The model '{_shown(model)}' does not exist or you do not have access to it.")


def _shown(model: str) -> str:
    """`model` as an error message quotes it: a long one cut short (the message is not a mirror)."""
    return model if len(model) <= 200 else model[:200] + "..."


def _control_ref(session: Session, name: str, version: int | None, base_model_id: str) -> PrefixRef:
    label = name if version is None else f"{name}:v{version}"
    control = _live_subject(session, controls.external_id_of(name), controls.CONTROL)
    if control is None:
        raise NotFound(f"The control '{name}' does not exist.")
    row = _named_version(session, control.id, version)
    if row is None and version is not None:
        raise NotFound(f"The control '{label}' does not exist.")
    if row is None or row.base_model_id != base_model_id:
        raise NoTrainedPrefix(f"The control '{label}' has no trained prefix on this base model yet.", param="model")
    if row.status == "corrupt":
        raise CorruptModel(f"The control '{label}' is corrupt in storage (checksum mismatch); use '{name}'.")
    return prefix_ref(row)


def _resolve_one(session: Session, caller: Caller, model: str, base_model_id: str) -> list[PrefixRef]:
    """The prefixes one model id names, in composition order: the population version it trained on,
    if any, then the user's (none: the base model)."""
    if model == base_model_id:
        return []
    user, row = _user_version(session, caller, model, base_model_id)
    if row is None and _parse(model, base_model_id)[1] is None:
        raise NoTrainedPrefix(
            f"The user '{user.external_id}' has no trained prefix yet; train one first, or use the base "
            f"model '{base_model_id}' explicitly.",
            param="model",
            user_id=user.id,
        )
    if row is None:
        raise NotFound(f"The model '{_shown(model)}' does not exist or you do not have access to it.")
    if row.status == "corrupt":
        raise CorruptModel(
            f"The model '{_shown(model)}' is corrupt in storage (checksum mismatch) and cannot be served; "
            f"use 'user:{user.external_id}' for the user's current good version."
        )
    return [prefix_ref(version) for version in served_composition(session, row)]


def prefix_ref(row: PrefixVersion) -> PrefixRef:
    """What a job needs to load the prefix version `row` (the index row's key and checksum)."""
    return PrefixRef(user_id=row.user_id, version=row.version, blob_key=row.blob_key, sha256=row.sha256)


def list_models(session: Session, caller: Caller, base_model_id: str, base_created: int = 0) -> list[ModelEntry]:
    """The base model; every prefix version (and the `user:` alias of active ones) the caller may
    use; every trained control as `control:<name>`; and for a user key, its alias composed with each
    control (`user:<id>+<name>`), so a client that can only pick a model from this list can compose."""
    entries = [ModelEntry(base_model_id, "steer", base_created)]
    aliases: list[str] = []
    query = (
        select(PrefixVersion, User.external_id)
        .join(User, User.id == PrefixVersion.user_id)
        .where(User.deleted_at.is_(None), User.kind == "user", PrefixVersion.base_model_id == base_model_id)
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
            aliases.append(USER_ALIAS + external_id)
    for control in controls.list_controls(session):
        row = active_prefix(session, control.id)
        if row is None or row.base_model_id != base_model_id:
            continue
        name, created = controls.name_of(control), int(row.created_at.timestamp())
        entries.append(ModelEntry(control.external_id, "steer", created))
        if not caller.is_admin and name != POPULATION_CONTROL:  # a user's version brings its own population
            entries += [ModelEntry(alias + CONTROL_SEPARATOR + name, "steer", created) for alias in aliases]
    return entries


def _parse(model: str, base_model_id: str) -> tuple[str, int | None]:
    if model.startswith(USER_ALIAS) and EXTERNAL_ID_PATTERN.fullmatch(model[len(USER_ALIAS) :]):
        return model[len(USER_ALIAS) :], None
    ref = parse_model_id(model)
    if ref is None or ref.base_model_id != base_model_id:
        raise NotFound(f"The model '{_shown(model)}' does not exist or you do not have access to it.")
    return ref.external_id, ref.version


def retrieve_model(
    session: Session, caller: Caller, model: str, base_model_id: str, base_created: int = 0
) -> ModelEntry:
    """One model id the caller may use: every id `/v1/models` lists, and every other id a completion
    accepts (`control:<name>:v<N>`, `user:<id>+<control>`, ...); `NotFound` otherwise (also for a
    user without an active prefix, and for corrupt versions, which are never listed).

    It is the completion's own resolution, so the two cannot disagree; `created` is the newest
    composed part's, `owned_by` the user's external id when a user's prefix is part of it."""
    missing = NotFound(f"The model '{_shown(model)}' does not exist or you do not have access to it.")
    if model == base_model_id:
        return ModelEntry(base_model_id, "steer", base_created)
    try:
        refs = resolve_model(session, caller, model, base_model_id)
    except (InvalidInput, CorruptArtifact):  # NoTrainedPrefix is an InvalidInput
        raise missing from None
    if not refs:  # the base model composed with nothing: only its own id names it
        raise missing
    rows = session.execute(
        select(PrefixVersion.created_at, User.kind, User.external_id)
        .join(User, User.id == PrefixVersion.user_id)
        .where(or_(*(and_(PrefixVersion.user_id == r.user_id, PrefixVersion.version == r.version) for r in refs)))
    ).all()
    owner = next((external_id for _, kind, external_id in rows if kind == "user"), "steer")
    return ModelEntry(model, owner, max(int(created.timestamp()) for created, _, _ in rows))


def retire_model(session: Session, caller: Caller, model: str, base_model_id: str) -> PrefixVersion:
    """`DELETE /v1/models/{model}`: retire that exact version (`ft:<base>:<external_id>:v<N>`). It
    is no longer the user's active prefix; if it was, the newest other retired version becomes
    active (none left: the user's alias answers `model_not_ready` until the next training). The
    version stays stored and listed, so an admin or the user may activate it again."""
    _, version = _parse(model, base_model_id)
    if version is None:
        raise InvalidInput("name one version to retire: ft:<base>:<external_id>:v<N>", param="model")
    user, row = _user_version(session, caller, model, base_model_id)
    if row is None:
        raise NotFound(f"The model '{_shown(model)}' does not exist or you do not have access to it.")
    if row.status == "active":
        fallback = session.scalar(
            select(PrefixVersion)
            .where(
                PrefixVersion.user_id == user.id,
                PrefixVersion.status == "retired",
                PrefixVersion.base_model_id == base_model_id,
            )
            .order_by(PrefixVersion.version.desc())
            .limit(1)
        )
        if fallback is not None:
            fallback.status = "active"
    if row.status != "corrupt":
        row.status = "retired"
    session.flush()
    return row


def _live_subject(session: Session, external_id: str, kind: str) -> User | None:
    return session.scalar(
        select(User).where(User.external_id == external_id, User.kind == kind, User.deleted_at.is_(None))
    )


def _user_version(
    session: Session, caller: Caller, model: str, base_model_id: str
) -> tuple[User, PrefixVersion | None]:
    """The user a model id names (NotFound unless the caller may see them) and the version it
    names (the active one for an alias), if any on this base model."""
    external_id, version = _parse(model, base_model_id)
    user = _live_subject(session, external_id, "user")
    if user is None or not caller.may_access(user.id):
        raise NotFound(f"The model '{_shown(model)}' does not exist or you do not have access to it.")
    row = _named_version(session, user.id, version)
    if row is not None and row.base_model_id != base_model_id:
        row = None
    return user, row


def _named_version(session: Session, subject_id: str, version: int | None) -> PrefixVersion | None:
    """That exact version of a user's or control's prefix, or the active one when `version` is None."""
    if version is None:
        return active_prefix(session, subject_id)
    return session.scalar(
        select(PrefixVersion).where(PrefixVersion.user_id == subject_id, PrefixVersion.version == version)
    )
