"""`run_training_job`: the one task function behind every training job.

The Celery worker (`workers/train.py`) and the embedded in-process executor both call it with
a job id. It is idempotent by job id: a finished job is left alone, a retried one skips users
whose prefix an earlier attempt already published, so redelivery never duplicates a version.

Each user trains the job's method (hyperparameter `method`: core/tuners/registry.py); controls always
train prefixes.

A fault never makes a user's model silently worse: a store that cannot be reached while the job
reads the active version is a transient error (the job is retried), not a cold start; and a new
version is activated only if its validation loss is no worse than the active version's on the
same rows, scored by the same code in the same job, whatever method either was trained with (else
it is kept as a "candidate").
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from sqlalchemy import and_, or_, select, update
from sqlalchemy.exc import DBAPIError, OperationalError

from core.db import Job, PrefixVersion, User, database_now, session_scope, utcnow
from core.db.models import JOB_FINISHED_STATUSES
from core.engine.adaptation import Adaptation
from core.engine.data import prepare_samples
from core.engine.model import BaseModel
from core.errors import ArtifactError, InvalidTrainingData, SteerError, TrainingCancelled
from core.service.context import ServiceContext
from core.service.controls import CONTROL, companion_prefixes
from core.service.crash_points import crash_point
from core.service.errors import ServiceError
from core.service.hyperparameters import OBJECTIVE, resolve, training_config
from core.service.instant_version import publish_instant_versions
from core.service.job_lease import (
    JobLease,
    LeaseLost,
    holder_is_gone,
    holds_lease,
    lease_expired,
    lease_holder,
    new_lease_token,
    takeover_grace_s,
)
from core.service.jobs import add_event
from core.service.metrics import TRAIN_STEP_SECONDS
from core.service.model_ids import subject_model_id
from core.service.population import active_population
from core.service.preferences import user_pairs
from core.service.registry import (
    PREFIX_DTYPE,
    PrefixArtifacts,
    active_prefix,
    load_state_bytes,
    publish_prefix,
    remove_unindexed_blobs,
    served_population,
)
from core.service.samples import user_sample_texts
from core.storage import BlobNotFound, BlobStoreUnavailable
from core.tuners.artifacts import Prefix, load_prefix, load_training_state, save_prefix, save_training_state
from core.tuners.base import Progress, TrainedAdaptation, TrainingConfig, UserData
from core.tuners.preference import NO_PREFERENCE_LOSS, OBJECTIVE_DPO
from core.tuners.registry import PREFIX
from core.tuners.seq2seq import is_encoder_decoder
from core.tuners.train import train_adapters

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 3
"""A job whose worker died this many times (OOM, node loss) is failed instead of redelivered forever."""
CANCEL_POLL_S = 1.0
EVENTS_PER_JOB = 20
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (OperationalError, BlobStoreUnavailable)
NO_WORSE_TOLERANCE = 1e-3
"""Validation loss (nats per token) a new version may exceed the active one's by and still count as
no worse: the active version is scored as stored (float16), the new one before that rounding."""


DPO_PREFERRED_NLL_TOLERANCE = 0.10
"""How much less likely (relative, per token) a DPO version may make the user's preferred answers
than its reference does and still replace it: DPO may lower both answers' likelihood while it widens
the margin, but not the user's own text by much."""


class TransientJobError(ServiceError):
    """The job hit a transient store/database error and went back to the queue; retry it."""


class JobInterrupted(ServiceError):
    """The process is shutting down; the job went back to the queue and resumes on restart."""


@dataclass
class _Run:
    """Bookkeeping of one attempt."""

    job_id: str
    lease: JobLease
    stop_requested: Callable[[], bool] | None
    last_poll: float = 0.0
    last_elapsed: float = 0.0
    interrupted: bool = False
    events_every: int = 1
    result: dict[str, Any] = field(default_factory=lambda: {"users": {}, "skipped": {}})


def run_training_job(
    job_id: str,
    ctx: ServiceContext,
    *,
    final_attempt: bool = True,
    should_stop: Callable[[], bool] | None = None,
) -> str | None:
    """Run job `job_id` to an end state and return it (None: nothing to do).

    Raises `TransientJobError` (job requeued) when a transient error hits and this is not the
    final attempt, and `JobInterrupted` (job requeued) when `should_stop` turns true. A job that
    another live attempt holds is left to it (a duplicate delivery): returns None.
    """
    token = _claim(ctx, job_id)
    if token is None:
        return None
    lease = JobLease(ctx.session_factory, job_id, token, ctx.settings.job_lease_s)
    with lease:
        return _run_claimed(ctx, _Run(job_id=job_id, lease=lease, stop_requested=should_stop), final_attempt)


def _run_claimed(ctx: ServiceContext, run: _Run, final_attempt: bool) -> str | None:
    job_id = run.job_id
    try:
        _train_and_publish(ctx, run)
    except LeaseLost:
        return _lease_lost(job_id)
    except TrainingCancelled:
        if run.lease.lost:
            return _lease_lost(job_id)
        if run.interrupted:
            _requeue(ctx, run, "Interrupted by shutdown; the job will resume")
            raise JobInterrupted(f"job {job_id} interrupted") from None
        return _finish(ctx, run, "cancelled", message="Job cancelled")
    except TRANSIENT_ERRORS as exc:
        if not final_attempt:
            _requeue(ctx, run, f"Transient error, will retry: {exc}", level="warning")
            raise TransientJobError(str(exc)) from exc
        return _finish(ctx, run, "failed", error=f"storage or database unavailable: {exc}")
    except (InvalidTrainingData, ArtifactError, SteerError) as exc:
        return _finish(ctx, run, "failed", error=str(exc))
    except BaseException as exc:
        if type(exc).__name__ == "SoftTimeLimitExceeded":  # Celery's, without importing Celery
            limit = ctx.settings.train_time_limit_s
            return _finish(ctx, run, "failed", error=f"job exceeded the time limit of {limit:g} s")
        log.exception("training job %s crashed", job_id)
        _finish(ctx, run, "failed", error=f"internal error: {type(exc).__name__}: {exc}")
        raise
    candidates = [u for u in run.result["users"].values() if u["status"] == "candidate"]
    message = "Job succeeded"
    if candidates:
        message += f"; {len(candidates)} new version(s) kept as candidates, not activated (worse than the active one)"
    return _finish(ctx, run, "succeeded", message=message, result=run.result)


def _lease_lost(job_id: str) -> None:
    log.warning("job %s: this attempt lost its lease and stopped; the new holder finishes the job", job_id)


def _claim(ctx: ServiceContext, job_id: str) -> str | None:
    """Mark the job running (one more attempt) under a new lease; returns the lease token.

    None if the job is finished, cancelled, unknown, or held by another attempt that may be alive
    (a duplicate delivery; if that attempt dies, the lost-job sweep dispatches it again). A running
    job whose holder is provably gone (its process ended in this process namespace, or it missed
    `takeover_grace_s` of renewals) is taken over at once: Celery redelivers a task the moment its
    pool child dies, and waiting for the lease would leave the job stalled for a minute.
    """
    token = new_lease_token()
    lease_s = ctx.settings.job_lease_s
    with session_scope(ctx.session_factory) as session:
        now = database_now(session)
        job = session.get(Job, job_id)
        if job is None:
            log.warning("training job %s does not exist; ignoring it", job_id)
            return None
        seen_token, seen_holder = job.lease_token, job.lease_holder
        gone = job.status == "running" and holder_is_gone(seen_holder)
        silent = lease_expired(takeover_grace_s(lease_s), now)
        claimable = or_(Job.status == "queued", silent)
        if gone:  # compare-and-swap on the lease we saw, so a concurrent claimer cannot win twice
            claimable = or_(claimable, and_(Job.status == "running", Job.lease_token == seen_token))
        claimed = session.execute(
            update(Job)
            .where(Job.id == job_id, claimable, Job.cancel_requested.is_(False))
            .values(
                status="running",
                attempts=Job.attempts + 1,
                started_at=now,
                lease_token=token,
                lease_holder=lease_holder(),
                heartbeat_at=now,
            )
            .execution_options(synchronize_session=False)
        ).rowcount
        session.refresh(job)
        if not claimed:
            stale = gone or session.execute(select(Job.id).where(Job.id == job_id, silent)).first() is not None
            if job.status == "running" and not stale:
                log.info("training job %s is held by a live attempt (%s); leaving it to that one", job_id, seen_holder)
            elif job.status not in JOB_FINISHED_STATUSES:  # cancel requested while queued/running
                job.status, job.finished_at, job.lease_token, job.lease_holder = "cancelled", utcnow(), None, None
                add_event(session, job_id, "Job cancelled")
            return None
        if seen_token is not None:  # a running job taken over, not a queued one started
            why = "its process is gone" if gone else "it stopped renewing its lease"
            add_event(session, job_id, f"Took the job over from the previous attempt: {why}", level="warning")
        gave_up = job.attempts > MAX_ATTEMPTS
        if gave_up:
            job.status, job.finished_at, job.lease_token, job.lease_holder = "failed", utcnow(), None, None
            job.error = f"gave up after {MAX_ATTEMPTS} attempts (the worker was lost each time)"
            add_event(session, job_id, job.error, level="error")
        else:
            add_event(session, job_id, f"Training started (attempt {job.attempts})")
        user_ids = list(job.user_ids)
    if gave_up:
        _remove_unindexed_blobs(ctx, user_ids)
        return None
    return token


def _train_and_publish(ctx: ServiceContext, run: _Run) -> None:
    settings = ctx.settings
    with session_scope(ctx.session_factory) as session:
        job = session.get(Job, run.job_id)
        assert job is not None
        resolved = resolve(job.hyperparameters, settings)
        job.hyperparameters = resolved
        published = {row.user_id: row for row in session.query(PrefixVersion).filter(PrefixVersion.job_id == job.id)}
        users = [session.get(User, uid) for uid in job.user_ids]
        controls = {user.id for user in users if user is not None and user.kind == CONTROL}
        prefers = resolved.get(OBJECTIVE) == OBJECTIVE_DPO
        todo: list[UserData] = []
        for uid, user in zip(job.user_ids, users):
            if user is None or user.deleted_at is not None:
                run.result["skipped"][uid] = "user deleted"
            elif uid in published:
                run.result["users"][uid] = _published_entry(user.external_id, published[uid])
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
    if not todo:
        if run.result["users"]:
            return  # an earlier attempt published everything
        raise InvalidTrainingData("; ".join(f"user {u}: {why}" for u, why in run.result["skipped"].items()))

    config = training_config(resolved, settings)
    base = ctx.base_model()
    if settings.train_instant_version and not is_encoder_decoder(base) and not prefers:
        users = [(d.user_id, external_ids[d.user_id], d.samples) for d in todo if d.user_id not in controls]
        publish_instant_versions(ctx, base, run.job_id, users, config)
    has_users = any(data.user_id not in controls for data in todo)  # controls never train on it
    population = _population(ctx, run.job_id, base) if config.method == PREFIX and has_users else None
    populations: dict[str, Adaptation | None] = {}  # population version id -> its KV, read once per job
    active_at_start: dict[str, int | None] = {}  # user -> their active version as training starts
    compared_with: dict[str, int | None] = {}  # user -> the active version the new one must beat
    for data in todo:
        active = _active_version(ctx, data.user_id)
        active_at_start[data.user_id] = None if active is None else active.version
        if active is not None and active.base_fingerprint != base.fingerprint:
            active = None  # trained on another base model: nothing to build on or compare with
        data.resume_state = _warm_start_state(ctx, run.job_id, base, active, config)
        if data.user_id in controls:
            data.reference_kv = _active_adaptation(ctx, run.job_id, base, active)
            data.companions = _companions(ctx, run.job_id, base, data.user_id)
        else:
            # Compared as served: with the population version it trained on, whichever this job uses.
            data.reference_kv = _served_adaptation(ctx, run.job_id, base, active, populations)
            data.reference_composed = True
            if population is not None:
                data.companions = [population.kv]
        compared_with[data.user_id] = None if data.reference_kv is None or active is None else active.version
    crash_point("before_first_step", run.job_id)
    run.events_every = max(1, config.max_steps // EVENTS_PER_JOB)
    trained: list[tuple[TrainingConfig, TrainedAdaptation]] = []
    for group_config, group in _method_groups(config, todo, controls):
        what = f"{len(group)} user(s) on {base.model_id}, method {group_config.method}"
        _event(ctx, run.job_id, f"Training {what}, for up to {group_config.max_steps} steps")
        results = train_adapters(
            base,
            group,
            group_config,
            on_progress=lambda progress: _on_progress(ctx, run, progress),
            should_cancel=lambda: _should_cancel(ctx, run),
        )
        trained.extend((group_config, result) for result in results)
    for group_config, result in trained:
        metrics = {k: v for k, v in result.metrics.items() if v is None or isinstance(v, (int, float, bool, str, dict))}
        active_version = compared_with[result.user_id]
        metrics["method"] = result.method
        metrics["active_val_loss"] = metrics.pop("reference_val_loss", None)
        metrics["compared_with_version"] = active_version
        activate, why = _no_worse_preferences(metrics) if prefers else _no_worse(metrics, active_version)
        on_population = population is not None and result.user_id not in controls and result.method == PREFIX
        if on_population:
            metrics["population_version"] = population.version
        artifacts = _artifacts(base, group_config, result, metrics)
        if on_population:
            artifacts = replace(artifacts, population_version_id=population.version_id)
        row = publish_prefix(
            ctx.session_factory,
            ctx.store,
            result.user_id,
            artifacts,
            job_id=run.job_id,
            lease_token=run.lease.token,
            activate=activate,
            expected_active=active_at_start[result.user_id],
        )
        if row is None:
            run.result["skipped"][result.user_id] = "user deleted during training"
            continue
        if activate and row.status == "candidate":
            why = "another version became active during training; it was not compared with this one"
        entry = _published_entry(external_ids[result.user_id], row)
        run.result["users"][result.user_id] = {**entry, "reason": why}
        data = {
            "user_id": result.user_id,
            "version": row.version,
            "status": row.status,
            "method": result.method,
            "reason": why,
        }
        published = f"{entry['model']} ({result.method})"
        if row.status == "active":
            _event(ctx, run.job_id, f"Published and activated {published}: {why}", data)
        else:
            message = f"Published {published} as a candidate, not activated: {why}"
            _event(ctx, run.job_id, message, data, level="warning")


def _method_groups(
    config: TrainingConfig, todo: list[UserData], controls: set[str]
) -> list[tuple[TrainingConfig, list[UserData]]]:
    """The job's users under the job's method, its controls under 'prefix' (a control is a prefix
    that composes with any user's adaptation); a job holds one or the other in practice."""
    users = [data for data in todo if data.user_id not in controls]
    prefixes = [data for data in todo if data.user_id in controls]
    groups = [(config, users), (replace(config, method=PREFIX), prefixes)]
    return [(group_config, group) for group_config, group in groups if group]


def _artifacts(
    base: BaseModel, config: TrainingConfig, result: TrainedAdaptation, metrics: dict[str, Any]
) -> PrefixArtifacts:
    """The servable artifact of any method, and a prefix's training state to continue from."""
    adaptation = result.adaptation
    prefix = Prefix(
        adaptation.kv,
        base.model_id,
        base.fingerprint,
        config.to_dict(),
        metrics,
        lora=adaptation.lora,
        method=result.method,
    )
    keeps_state = result.method == PREFIX and bool(result.state) and result.prefix_config is not None
    return PrefixArtifacts(
        prefix=save_prefix(prefix, PREFIX_DTYPE),
        state=save_training_state(result.state, result.prefix_config.to_dict(), base) if keeps_state else None,
        base_model_id=base.model_id,
        base_fingerprint=base.fingerprint,
        prefix_len=prefix.prefix_len,
        metrics=metrics,
    )


def _no_worse(metrics: dict[str, Any], active_version: int | None) -> tuple[bool, str]:
    """Whether a new version may replace the active one, and why: only if its validation loss is no
    worse than the active version's on the same rows (scored by the same code in the same job)."""
    new, old = metrics.get("val_loss"), metrics.get("active_val_loss")
    if active_version is None:
        return True, "nothing to compare with (no readable active version on this base model)"
    if new is None or old is None:
        return True, "no validation rows to compare on"
    versus = f"validation loss {new:.4f}, active v{active_version} {old:.4f} on the same rows"
    if new <= old + NO_WORSE_TOLERANCE:
        return True, versus
    return False, f"worse than the active version ({versus}); an admin may activate it"


def _no_worse_preferences(metrics: dict[str, Any]) -> tuple[bool, str]:
    """A DPO version replaces the active one only if, on the user's held-out pairs, it ranks the
    preferred answers higher than its reference (the active version as served) does, and keeps the
    preferred answers' own likelihood (the user's text) within `DPO_PREFERRED_NLL_TOLERANCE`."""
    score = metrics.get("preference")
    if not score:
        return True, "no held-out preference pairs to compare on"
    versus = (
        f"held-out preference loss {score['loss']:.4f} (reference {NO_PREFERENCE_LOSS:.4f}), accuracy "
        f"{score['accuracy']:.2f}, preferred-answer loss {score['preferred_nll']:.4f} "
        f"(reference {score['reference_preferred_nll']:.4f})"
    )
    if score["loss"] >= NO_PREFERENCE_LOSS - NO_WORSE_TOLERANCE:
        return False, f"no better than its reference on held-out pairs ({versus}); an admin may activate it"
    if score["preferred_nll"] > score["reference_preferred_nll"] * (1 + DPO_PREFERRED_NLL_TOLERANCE):
        return False, f"the user's preferred answers became less likely ({versus}); an admin may activate it"
    return True, versus


def _published_entry(external_id: str, row: PrefixVersion) -> dict[str, Any]:
    model = subject_model_id(row.base_model_id, external_id, row.version)
    method = (row.metrics or {}).get("method", PREFIX)
    return {"model": model, "version": row.version, "status": row.status, "method": method, "metrics": row.metrics}


def _active_version(ctx: ServiceContext, user_id: str) -> PrefixVersion | None:
    with session_scope(ctx.session_factory) as session:
        return active_prefix(session, user_id)


def _warm_start_state(
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
        _event(ctx, job_id, message, level="warning")
        return None
    wanted = {k: v for k, v in config.prefix.to_dict().items() if k != "init"}
    if {k: v for k, v in prefix_config.items() if k != "init"} != wanted:
        return None
    return state


def _active_adaptation(
    ctx: ServiceContext, job_id: str, base: BaseModel, active: PrefixVersion | None
) -> Adaptation | None:
    """The active version as served (its KV and/or LoRA, any method), for the training loop to
    score on the user's validation rows. None when there is none or it is corrupt (nothing sound to
    compare with); a store that cannot be reached raises (transient)."""
    if active is None:
        return None
    try:
        return load_prefix(ctx.store.get(active.blob_key, expected_sha256=active.sha256), base).adaptation
    except (ArtifactError, BlobNotFound) as exc:
        message = f"User {active.user_id}: active v{active.version} is unreadable ({exc}); not compared"
        _event(ctx, job_id, message, level="warning")
        return None


@dataclass(frozen=True)
class _Population:
    version_id: str
    version: int
    kv: Any  # (L, 2, H, P, D)


def _population(ctx: ServiceContext, job_id: str, base: BaseModel) -> _Population | None:
    """The deployment's population prefix users train on top of (core/service/population.py), or
    None: none trained, turned off, or unreadable (then users train alone; a warning says why)."""
    with session_scope(ctx.session_factory) as session:
        row = active_population(session, ctx.settings, base.fingerprint)
    if row is None:
        return None
    try:
        stored = load_prefix(ctx.store.get(row.blob_key, expected_sha256=row.sha256), base)
    except (ArtifactError, BlobNotFound) as exc:
        message = f"The population prefix v{row.version} is unreadable ({exc}); training alone"
        _event(ctx, job_id, message, level="warning")
        return None
    _event(ctx, job_id, f"Training on top of the population prefix v{row.version}")
    return _Population(row.id, row.version, stored.kv)


def _served_adaptation(
    ctx: ServiceContext,
    job_id: str,
    base: BaseModel,
    active: PrefixVersion | None,
    populations: dict[str, Adaptation | None] | None = None,
) -> Adaptation | None:
    """The active version exactly as served: composed after its population version, if any
    (`populations`: the population versions this job has read, by id; most users share one)."""
    adaptation = _active_adaptation(ctx, job_id, base, active)
    if adaptation is None:
        return None
    with session_scope(ctx.session_factory) as session:
        population = served_population(session, active)
    if population is None:
        return adaptation
    populations = {} if populations is None else populations
    if population.id not in populations:
        populations[population.id] = _active_adaptation(ctx, job_id, base, population)
    under = populations[population.id]
    if under is None or under.kv is None:
        return adaptation
    kv = under.kv if adaptation.kv is None else torch.cat([under.kv, adaptation.kv], dim=3)
    return replace(adaptation, kv=kv)


def _companions(ctx: ServiceContext, job_id: str, base: BaseModel, control_id: str) -> list | None:
    """Users' prefixes for a control to train beside (`STEER_CONTROL_COMPANIONS`; none: alone)."""
    count = ctx.settings.control_companions
    if count == 0:
        _event(ctx, job_id, "Training the control alone")
        return None
    with session_scope(ctx.session_factory) as session:
        rows = companion_prefixes(session, control_id, base.fingerprint, count)
    kvs = []
    for row in rows:
        try:
            stored = load_prefix(ctx.store.get(row.blob_key, expected_sha256=row.sha256), base)
        except (ArtifactError, BlobNotFound) as exc:  # a corrupt or just-erased prefix: the user's problem
            log.warning("control %s: skipping companion prefix of user %s: %s", control_id, row.user_id, exc)
            continue
        if stored.method == PREFIX:  # a companion is a prefix KV: users of other methods are left out
            kvs.append(stored.kv)
    _event(ctx, job_id, f"Training the control beside {len(kvs)} users' prefixes")
    return kvs or None


def _on_progress(ctx: ServiceContext, run: _Run, progress: Progress) -> None:
    if progress.step == max(1, progress.max_steps // 2):
        crash_point("mid_training", run.job_id)
    TRAIN_STEP_SECONDS.observe(max(progress.elapsed_s - run.last_elapsed, 0.0))
    run.last_elapsed = progress.elapsed_s
    data = {
        "step": progress.step,
        "total_steps": progress.max_steps,
        "train_loss": round(progress.loss, 6),
        "val_loss": None if progress.val_loss is None else round(progress.val_loss, 6),
        "tokens_per_s": round(progress.tokens_per_s, 1),
        "eta_s": round(progress.eta_s, 1),
        "active_users": progress.active_users,
    }
    with session_scope(ctx.session_factory) as session:
        session.execute(
            update(Job).where(Job.id == run.job_id, Job.lease_token == run.lease.token).values(progress=data)
        )
        if progress.step % run.events_every == 0 or progress.step == progress.max_steps or progress.step == 1:
            add_event(
                session,
                run.job_id,
                f"Step {progress.step}/{progress.max_steps}: training loss={progress.loss:.4f}",
                data,
            )


def _should_cancel(ctx: ServiceContext, run: _Run) -> bool:
    if run.lease.lost:
        return True
    if run.stop_requested is not None and run.stop_requested():
        run.interrupted = True
        return True
    now = time.monotonic()
    if now - run.last_poll < CANCEL_POLL_S:
        return False
    run.last_poll = now
    with session_scope(ctx.session_factory) as session:
        job = session.get(Job, run.job_id)
        return job is None or job.cancel_requested


def _event(
    ctx: ServiceContext, job_id: str, message: str, data: dict[str, Any] | None = None, level: str = "info"
) -> None:
    with session_scope(ctx.session_factory) as session:
        add_event(session, job_id, message, data, level=level)


def _requeue(ctx: ServiceContext, run: _Run, message: str, level: str = "info") -> None:
    run.lease.release()
    try:
        with session_scope(ctx.session_factory) as session:
            requeued = session.execute(
                update(Job)
                .where(Job.id == run.job_id, Job.status == "running", Job.lease_token == run.lease.token)
                .values(status="queued", lease_token=None, lease_holder=None, dispatched_at=database_now(session))
            ).rowcount
            if requeued:
                add_event(session, run.job_id, message, level=level)
    except (OperationalError, DBAPIError):
        log.warning("could not requeue job %s (database down); redelivery will pick it up", run.job_id)


def _finish(
    ctx: ServiceContext,
    run: _Run,
    status: str,
    *,
    message: str | None = None,
    error: str | None = None,
    result: dict[str, Any] | None = None,
) -> str | None:
    """Record the end of the job; None (nothing recorded) if this attempt no longer holds it."""
    job_id = run.job_id
    run.lease.release()
    with session_scope(ctx.session_factory) as session:
        if not holds_lease(session, job_id, run.lease.token):
            # Erased with its user, or taken over by another attempt after this one went silent.
            log.warning("job %s: not recording %s, this attempt no longer holds the job", job_id, status)
            return None
        job = session.get(Job, job_id)
        assert job is not None
        job.status, job.finished_at, job.error, job.lease_token, job.lease_holder = status, utcnow(), error, None, None
        if result is not None:
            job.result = result
            models = [entry["model"] for entry in result["users"].values()]
            job.fine_tuned_model = models[0] if len(job.user_ids) == 1 and len(models) == 1 else None
        add_event(session, job_id, message or f"Job failed: {error}", level="error" if error else "info")
        user_ids = list(job.user_ids)
    if status != "succeeded":
        _remove_unindexed_blobs(ctx, user_ids)
    return status


def _remove_unindexed_blobs(ctx: ServiceContext, user_ids: list[str]) -> None:
    """A job that ends without publishing may have left blobs of an interrupted attempt."""
    for user_id in user_ids:
        try:
            remove_unindexed_blobs(ctx.session_factory, ctx.store, user_id)
        except Exception:  # noqa: BLE001 - the next publish for this user sweeps again
            log.warning("could not sweep unindexed blobs of user %s", user_id, exc_info=True)
