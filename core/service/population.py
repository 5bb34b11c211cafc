"""The deployment's population prefix: one prefix trained on a sample of every user's text, under
which each user's own prefix trains and serves (issue 11; docs/EVALUATION.md, "What users read, a
population prefix and memory prefixes").

What all users' writing shares (the register, the format, the model's habits on it) goes into the
population prefix, so a user's own capacity goes to what is theirs: the likelihood-ratio idea of
authorship attribution. On both registers evaluated it raised held-out fit, attribution and general
text together.

It is the control named `population` (model_ids.POPULATION_CONTROL): samples, jobs, versions,
rollback and the prefix cache are a control's. What differs:
- its samples are copied from the users' (`train_population`), a fixed share per user so a
  prolific user does not become the population; each copy names its user, and deleting a sample or
  erasing a user deletes the copies (core/service/samples.py, users.py); the trained prefix still
  carries what it learnt from them until the population is retrained;
- with `STEER_POPULATION_PREFIX` on, a user's prefix job trains with the active population version
  composed before the user's prefix (frozen), and the new user version records that population
  version (`PrefixVersion.population_version_id`): it is served composed with exactly the
  population it was trained on, so retraining the population never changes a served user's output
  until that user is retrained on the new one;
- it trains like a user (preservation term on), not like an attribute control, on a batch as large
  as the rows of several users, as the evaluation trained it; only `POST /v1/admin/population`
  creates or retrains it (the controls routes refuse the name).
"""

from __future__ import annotations

import random

from sqlalchemy import Select, delete, distinct, func, select
from sqlalchemy.orm import Session

from core.config import Settings
from core.db import Job, PrefixVersion, Sample, User
from core.service.controls import CONTROL, external_id_of
from core.service.errors import Conflict, InvalidInput
from core.service.hyperparameters import METHOD, validate_hyperparameters
from core.service.jobs import create_job
from core.service.model_ids import POPULATION_CONTROL, POPULATION_COPY_SOURCE
from core.service.recipe import (
    POPULATION_MAX_USERS,
    POPULATION_SAMPLES_PER_USER,
    PopulationRecipe,
    population_recipe,
)
from core.service.registry import active_prefix
from core.service.samples import add_samples
from core.tuners.registry import PREFIX as PREFIX_METHOD


def active_population(session: Session, settings: Settings, base_fingerprint: str) -> PrefixVersion | None:
    """The population version a user's prefix trains on now: the control's active version on this
    base, when the deployment uses one (`STEER_POPULATION_PREFIX`)."""
    if not settings.population_prefix:
        return None
    control = population_control(session)
    row = None if control is None else active_prefix(session, control.id)
    if row is None or row.base_fingerprint != base_fingerprint:
        return None
    return row


def population_control(session: Session) -> User | None:
    return session.scalar(
        select(User).where(
            User.external_id == external_id_of(POPULATION_CONTROL), User.kind == CONTROL, User.deleted_at.is_(None)
        )
    )


MAX_SAMPLES = 20_000
"""Samples a population trains on at most (samples_per_user x max_users)."""
SAMPLES_PER_USER = POPULATION_SAMPLES_PER_USER
MAX_USERS = POPULATION_MAX_USERS
MAX_SAMPLES_PER_USER = 1000
MAX_DRAWN_USERS = 10_000


def train_population(
    session: Session, settings: Settings, samples_per_user: int, max_users: int, hyperparameters: object, seed: int = 0
) -> tuple[User, Job, dict[str, int]]:
    """Replace the population's samples with up to `samples_per_user` samples of each of up to
    `max_users` live users (drawn at random, reproducibly by `seed`), and queue its training job.
    Returns the control, the job, and counts of users and samples drawn."""
    if not 1 <= samples_per_user <= MAX_SAMPLES_PER_USER:
        raise InvalidInput(f"samples_per_user must be in [1, {MAX_SAMPLES_PER_USER}]", param="samples_per_user")
    if not 1 <= max_users <= MAX_DRAWN_USERS:
        raise InvalidInput(f"max_users must be in [1, {MAX_DRAWN_USERS}]", param="max_users")
    if samples_per_user * max_users > MAX_SAMPLES:
        raise InvalidInput(f"samples_per_user x max_users must be at most {MAX_SAMPLES}", param="max_users")
    values = validate_hyperparameters(hyperparameters)
    if values[METHOD] not in (None, PREFIX_METHOD):
        raise InvalidInput("the population trains a prefix: method must be 'prefix'", param=f"hyperparameters.{METHOD}")
    recipe = population_recipe(settings, samples_per_user, max_users)
    drawn = _draw_samples(session, recipe, random.Random(seed))
    if len(drawn) < 2:
        raise InvalidInput(
            f"a population needs the text of at least 2 users; {len(drawn)} live user(s) have samples",
            param="max_users",
        )
    control = population_control(session)
    if control is None:
        control = User(external_id=external_id_of(POPULATION_CONTROL), kind=CONTROL)
        session.add(control)
        session.flush()
    else:
        _refuse_while_training(session, control)
    session.execute(delete(Sample).where(Sample.user_id == control.id))
    room = _without_sample_cap(settings, sum(len(texts) for texts in drawn.values()))
    added = 0
    for user_id, texts in drawn.items():  # each copy names its user: erasure finds it (users.py)
        rows, _ = add_samples(session, room, control, texts, POPULATION_COPY_SOURCE + user_id)
        added += len(rows)
    job = create_job(session, CONTROL, [control], recipe.values(values, users=len(drawn)))
    return control, job, {"users": len(drawn), "samples": added}


def population_due(session: Session, settings: Settings) -> bool:
    """Whether the deployment should (re)train its population now (`STEER_POPULATION_AUTO_USERS`):
    enough users with samples and none yet, or twice the users the active one was drawn from; never
    while one trains, nor after a failed one (an admin looks first)."""
    if not settings.population_prefix or settings.population_auto_users == 0:
        return False
    users = session.scalar(
        select(func.count(distinct(Sample.user_id)))
        .join(User, User.id == Sample.user_id)
        .where(User.kind == "user", User.deleted_at.is_(None))
    )
    if users < max(2, settings.population_auto_users):  # a population of one user is that user
        return False
    control = population_control(session)
    if control is None:
        return True
    last = session.scalars(_jobs_of(control)).first()
    if last is not None and last.status in ("queued", "running", "failed"):
        return False
    if active_prefix(session, control.id) is None:
        return True
    drawn_from = session.scalar(select(func.count(distinct(Sample.source))).where(Sample.user_id == control.id))
    return users >= 2 * drawn_from


def _refuse_while_training(session: Session, control: User) -> None:
    """A second population request while one trains would replace the samples under the running
    job (it reads them when it starts) and publish two versions in an order no one chose."""
    training = session.scalars(_jobs_of(control).where(Job.status.in_(("queued", "running")))).first()
    if training is not None:
        raise Conflict(
            f"the population is already training (job {training.id}, {training.status}); "
            "wait for it to finish or cancel it"
        )


def _jobs_of(control: User) -> Select[tuple[Job]]:
    """The population's training jobs, newest first."""
    return select(Job).where(Job.kind == CONTROL, Job.trains(control.id)).order_by(Job.created_at.desc())


def _draw_samples(session: Session, recipe: PopulationRecipe, rng: random.Random) -> dict[str, list[str]]:
    """The recipe's draw from the live users with samples: users first, then only their samples'
    ids, then the drawn texts, so the draw's memory is bounded by what it keeps (the same random
    choices as `PopulationRecipe.draw` over the same texts: the evaluation draws with that)."""
    users = session.scalars(
        select(Sample.user_id)
        .join(User, User.id == Sample.user_id)
        .where(User.kind == "user", User.deleted_at.is_(None))
        .distinct()
    )
    drawn = {}
    for user_id in recipe.users(list(users), rng):
        ids = list(session.scalars(select(Sample.id).where(Sample.user_id == user_id).order_by(Sample.id)))
        picked = [ids[i] for i in recipe.pick(len(ids), rng)]
        drawn[user_id] = list(session.scalars(select(Sample.text).where(Sample.id.in_(picked)).order_by(Sample.id)))
    return drawn


def _without_sample_cap(settings: Settings, count: int) -> Settings:
    """The per-user sample cap is a user's quota; the population holds a share of everyone's."""
    if count <= settings.max_total_samples_per_user:
        return settings
    return settings.model_copy(update={"max_total_samples_per_user": count})
