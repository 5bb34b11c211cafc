"""Controls: shared attribute prefixes ("brief", "formal", ...) that any user's requests may compose
with the user's own prefix (Control Prefixes, Clive et al. 2021): the user's prefix says who
writes, a control says how this time.

A control is a row of `users` of kind "control" with the external id `control:<name>` (no user can
have it: external ids have no colon). So it has writing samples, training jobs, prefix versions,
rollback and erasure exactly like a user, through the same code: the registry, the training
workers, the prefix cache. What differs: only the admin creates or deletes one, it has no API key,
every key may use it, and it may train with users' prefixes attached (`companion_prefixes`,
`STEER_CONTROL_COMPANIONS`; off by default: trained alone, controls kept the users' own text closer,
docs/EVALUATION.md "Control prefixes").
"""

from __future__ import annotations

import random

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from core.config import Settings
from core.db import Job, PrefixVersion, User
from core.service.api_keys import ADMIN
from core.service.errors import Conflict, InvalidInput, NotFound
from core.service.hyperparameters import METHOD, validate_hyperparameters
from core.service.jobs import create_job
from core.service.model_ids import CONTROL_NAME_PATTERN, CONTROL_PREFIX, POPULATION_CONTROL
from core.service.recipe import control_values
from core.service.samples import add_samples
from core.service.users import delete_user
from core.storage import BlobStore
from core.tuners.registry import PREFIX as PREFIX_METHOD

CONTROL = "control"
EXTERNAL_ID_PREFIX = CONTROL_PREFIX
NAME_PATTERN = CONTROL_NAME_PATTERN
MAX_CONTROLS_PER_REQUEST = 4


def validate_control_name(name: object, param: str = "name") -> str:
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise InvalidInput(
            "a control name is 1-64 characters of lowercase letters, digits, _ and -, starting with a letter",
            param=param,
        )
    return name


def external_id_of(name: str) -> str:
    return EXTERNAL_ID_PREFIX + name


def name_of(control: User) -> str:
    return control.external_id.removeprefix(EXTERNAL_ID_PREFIX)


def create_control(
    session: Session, settings: Settings, name: str, texts: list[str], source: str, hyperparameters: object
) -> tuple[User, Job, int]:
    """A new control trained from `texts` (validated samples): the control, its queued job, and
    how many of `texts` were duplicates."""
    validate_control_name(name)
    _not_the_population(name)
    if session.scalar(select(User.id).where(User.external_id == external_id_of(name))) is not None:
        raise Conflict(f"a control named {name!r} exists; delete it first or pick another name")
    control = User(external_id=external_id_of(name), kind=CONTROL)
    session.add(control)
    session.flush()
    _, duplicates = add_samples(session, settings, control, texts, source)
    return control, train_control(session, control, hyperparameters), duplicates


def train_control(session: Session, control: User, hyperparameters: object) -> Job:
    """A queued job (re)training `control` on its samples, beside the users' current prefixes."""
    _not_the_population(name_of(control))
    values = validate_hyperparameters(hyperparameters)
    if values[METHOD] not in (None, PREFIX_METHOD):
        # A control is a prefix composed with any user's adaptation, whatever its method.
        raise InvalidInput("a control trains a prefix: method must be 'prefix'", param=f"hyperparameters.{METHOD}")
    return create_job(session, CONTROL, [control], control_values(values))


def _not_the_population(name: str) -> None:
    """The population prefix is a control trained from users' text by its own route."""
    if name == POPULATION_CONTROL:
        raise InvalidInput(
            f"the control name {name!r} is reserved for the population prefix: POST /v1/admin/population",
            param="name",
        )


def get_control(session: Session, name: str) -> User:
    control = session.scalar(
        select(User).where(User.external_id == external_id_of(name), User.kind == CONTROL, User.deleted_at.is_(None))
    )
    if control is None:
        raise NotFound(f"no control named {name!r}")
    return control


def list_controls(session: Session) -> list[User]:
    return list(
        session.scalars(select(User).where(User.kind == CONTROL, User.deleted_at.is_(None)).order_by(User.external_id))
    )


def delete_control(factory: sessionmaker[Session], store: BlobStore, name: str) -> None:
    """Erase the control: samples, every version's blob and row, its jobs (as for a user)."""
    with factory() as session:
        control_id = get_control(session, name).id
    delete_user(factory, store, ADMIN, control_id, kind=CONTROL)


def companion_prefixes(session: Session, control_id: str, base_fingerprint: str, count: int) -> list[PrefixVersion]:
    """Up to `count` users' active prefixes on this base for a control to train beside, drawn at
    random but the same for the same control and population."""
    rows = session.scalars(
        select(PrefixVersion)
        .join(User, User.id == PrefixVersion.user_id)
        .where(
            User.kind == "user",
            User.deleted_at.is_(None),
            PrefixVersion.status == "active",
            PrefixVersion.base_fingerprint == base_fingerprint,
        )
        .order_by(PrefixVersion.user_id)
    ).all()
    return random.Random(control_id).sample(list(rows), min(count, len(rows)))
