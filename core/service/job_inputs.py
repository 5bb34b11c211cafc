"""What a training job trains from: each user's data, warm start, reference and companions.

`gather_users` reads the job's users (samples, or preference pairs for a DPO job), skipping the
deleted and the empty; `prepare_references` gives each the state to warm-start from, the active
version to beat *as served* (composed after its population version), and what its rows train
beside (the population prefix for users, users' prefixes for a control). Every stored version is
read through core/service/registry.py's `read_version`; a corrupt one is warned about in the job's
events and left out, a store that cannot be reached raises (the job is retried).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from core.db import Job, PrefixVersion, User, session_scope
from core.engine.adaptation import Adaptation, composed
from core.engine.data import prepare_samples
from core.engine.model import BaseModel
from core.errors import ArtifactError
from core.service.context import ServiceContext
from core.service.controls import CONTROL, companion_prefixes
from core.service.job_attempt import Attempt, job_event
from core.service.population import active_population
from core.service.preferences import user_pairs
from core.service.publish_policy import published_entry
from core.service.registry import active_prefix, load_state_bytes, read_version, served_composition
from core.service.samples import user_sample_texts
from core.storage import BlobNotFound
from core.tuners.artifacts import load_training_state
from core.tuners.base import TrainingConfig, UserData
from core.tuners.registry import PREFIX

log = logging.getLogger(__name__)


@dataclass
class JobUsers:
    """The users a job trains this attempt, and what is known of them."""

    todo: list[UserData]
    controls: set[str]
    """Ids (among `todo`) of controls: they train prefixes, never on the population."""
    external_ids: dict[str, str]
    active_at_start: dict[str, int | None] = field(default_factory=dict)
    """user -> their active version as training starts (publishing activates only over it)"""
    compared_with: dict[str, int | None] = field(default_factory=dict)
    """user -> the active version the new one must beat (None: nothing sound to compare with)"""
    population: Population | None = None


def gather_users(ctx: ServiceContext, run: Attempt, prefers: bool) -> JobUsers:
    """The job's users still to train (a retried attempt skips those it published: they go to
    `run.result` as they are); the deleted and those with nothing to train on are skipped, why noted."""
    with session_scope(ctx.session_factory) as session:
        job = session.get(Job, run.job_id)
        published = {row.user_id: row for row in session.query(PrefixVersion).filter(PrefixVersion.job_id == job.id)}
        users = [session.get(User, uid) for uid in job.user_ids]
        controls = {user.id for user in users if user is not None and user.kind == CONTROL}
        todo: list[UserData] = []
        for uid, user in zip(job.user_ids, users):
            if user is None or user.deleted_at is not None:
                run.result["skipped"][uid] = "user deleted"
            elif uid in published:
                run.result["users"][uid] = published_entry(user.external_id, published[uid])
            elif prefers:
                if pairs := user_pairs(session, uid):
                    todo.append(UserData(user_id=uid, samples=[], pairs=pairs))
                else:
                    run.result["skipped"][uid] = "no preference pairs"
            elif not prepare_samples(texts := user_sample_texts(session, uid)):
                run.result["skipped"][uid] = "no usable writing samples"
            else:
                todo.append(UserData(user_id=uid, samples=texts))
        external_ids = {user.id: user.external_id for user in users if user is not None}
    return JobUsers(todo, controls, external_ids)


def prepare_references(ctx: ServiceContext, job_id: str, base: BaseModel, config: TrainingConfig, users: JobUsers):
    """Fill each user's warm start, reference and companions (in place), and the job's population."""
    has_users = any(data.user_id not in users.controls for data in users.todo)  # controls never train on it
    if config.method == PREFIX and has_users:
        users.population = population_prefix(ctx, job_id, base)
    populations: dict[str, Adaptation | None] = {}  # population version id -> its adaptation, read once per job
    for data in users.todo:
        active = active_version_of(ctx, data.user_id)
        users.active_at_start[data.user_id] = None if active is None else active.version
        if active is not None and active.base_fingerprint != base.fingerprint:
            active = None  # trained on another base model: nothing to build on or compare with
        data.resume_state = warm_start_state(ctx, job_id, base, active, config)
        if data.user_id in users.controls:
            data.reference_kv = active_adaptation(ctx, job_id, base, active)
            data.companions = companions_of(ctx, job_id, base, data.user_id)
        else:
            # Compared as served: with the population version it trained on, whichever this job uses.
            data.reference_kv = served_adaptation(ctx, job_id, base, active, populations)
            data.reference_composed = True
            if users.population is not None:
                data.companions = [users.population.kv]
        beaten = None if data.reference_kv is None or active is None else active.version
        users.compared_with[data.user_id] = beaten


def active_version_of(ctx: ServiceContext, user_id: str) -> PrefixVersion | None:
    with session_scope(ctx.session_factory) as session:
        return active_prefix(session, user_id)


def warm_start_state(
    ctx: ServiceContext, job_id: str, base: BaseModel, active: PrefixVersion | None, config: TrainingConfig
) -> Any:
    """Continue from the user's active prefix when it has the same prefix shape; otherwise (first
    training, new shape, corrupt state) start fresh. A store that cannot be reached raises
    (a transient error: the job is retried), never a silent cold start."""
    if active is None or not active.state_blob_key:
        return None
    try:
        state, prefix_config = load_training_state(load_state_bytes(ctx.store, active) or b"", base)
    except (ArtifactError, BlobNotFound) as exc:
        message = f"User {active.user_id}: cannot warm-start from v{active.version} ({exc}); starting fresh"
        job_event(ctx, job_id, message, level="warning")
        return None
    wanted = {k: v for k, v in config.prefix.to_dict().items() if k != "init"}
    if {k: v for k, v in prefix_config.items() if k != "init"} != wanted:
        return None
    return state


def active_adaptation(
    ctx: ServiceContext, job_id: str, base: BaseModel, active: PrefixVersion | None
) -> Adaptation | None:
    """The active version as served (its KV and/or LoRA, any method), for the training loop to
    score on the user's validation rows. None when there is none or it is corrupt (nothing sound to
    compare with); a store that cannot be reached raises (transient)."""
    if active is None:
        return None
    try:
        return read_version(ctx.store, active, base).adaptation
    except (ArtifactError, BlobNotFound) as exc:
        message = f"User {active.user_id}: active v{active.version} is unreadable ({exc}); not compared"
        job_event(ctx, job_id, message, level="warning")
        return None


@dataclass(frozen=True)
class Population:
    version_id: str
    version: int
    kv: Any  # (L, 2, H, P, D)


def population_prefix(ctx: ServiceContext, job_id: str, base: BaseModel) -> Population | None:
    """The deployment's population prefix users train on top of (core/service/population.py), or
    None: none trained, turned off, or unreadable (then users train alone; a warning says why)."""
    with session_scope(ctx.session_factory) as session:
        row = active_population(session, ctx.settings, base.fingerprint)
    if row is None:
        return None
    try:
        stored = read_version(ctx.store, row, base)
    except (ArtifactError, BlobNotFound) as exc:
        message = f"The population prefix v{row.version} is unreadable ({exc}); training alone"
        job_event(ctx, job_id, message, level="warning")
        return None
    job_event(ctx, job_id, f"Training on top of the population prefix v{row.version}")
    return Population(row.id, row.version, stored.kv)


def served_adaptation(
    ctx: ServiceContext,
    job_id: str,
    base: BaseModel,
    active: PrefixVersion | None,
    populations: dict[str, Adaptation | None] | None = None,
) -> Adaptation | None:
    """The active version exactly as served (core/service/registry.py's `served_composition`):
    composed after its population version, if any (`populations`: the population versions this job
    has read, by id; most users share one). An unreadable population: the version alone."""
    adaptation = active_adaptation(ctx, job_id, base, active)
    if adaptation is None:
        return None
    with session_scope(ctx.session_factory) as session:
        under = served_composition(session, active)[:-1]
    populations = {} if populations is None else populations
    parts = []
    for population in under:
        if population.id not in populations:
            populations[population.id] = active_adaptation(ctx, job_id, base, population)
        if populations[population.id] is not None:
            parts.append(populations[population.id])
    return composed([*parts, adaptation]) if parts else adaptation


def companions_of(ctx: ServiceContext, job_id: str, base: BaseModel, control_id: str) -> list | None:
    """Users' prefixes for a control to train beside (`STEER_CONTROL_COMPANIONS`; none: alone)."""
    count = ctx.settings.control_companions
    if count == 0:
        job_event(ctx, job_id, "Training the control alone")
        return None
    with session_scope(ctx.session_factory) as session:
        rows = companion_prefixes(session, control_id, base.fingerprint, count)
    kvs = []
    for row in rows:
        try:
            stored = read_version(ctx.store, row, base)
        except (ArtifactError, BlobNotFound) as exc:  # a corrupt or just-erased prefix: the user's problem
            log.warning("control %s: skipping companion prefix of user %s: %s", control_id, row.user_id, exc)
            continue
        if stored.method == PREFIX:  # a companion is a prefix KV: users of other methods are left out
            kvs.append(stored.kv)
    job_event(ctx, job_id, f"Training the control beside {len(kvs)} users' prefixes")
    return kvs or None
