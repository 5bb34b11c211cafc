"""`run_training_job`: the one task function behind every training job, and its thin runner.

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

The concerns live apart: an attempt's lifecycle (claim, lease, progress, cancel, finish) in
core/service/job_attempt.py, what the users train from in core/service/job_inputs.py, what is
published and activated in core/service/publish_policy.py; this module runs them in order.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace

from core.db import Job, session_scope
from core.engine.model import BaseModel
from core.errors import ArtifactError, InvalidTrainingData, SteerError, TrainingCancelled
from core.service.context import ServiceContext
from core.service.crash_points import crash_point
from core.service.hyperparameters import OBJECTIVE, resolve, training_config
from core.service.instant_version import publish_instant_versions
from core.service.job_attempt import (
    EVENTS_PER_JOB,
    TRANSIENT_ERRORS,
    Attempt,
    JobInterrupted,
    TransientJobError,
    claim,
    finish,
    job_event,
    lease_lost,
    on_progress,
    requeue,
    should_cancel,
)
from core.service.job_inputs import JobUsers, gather_users, prepare_references
from core.service.job_lease import JobLease, LeaseLost
from core.service.publish_policy import artifacts_of, no_worse, no_worse_preferences, published_entry
from core.service.registry import publish_prefix
from core.tuners.base import TrainedAdaptation, TrainingConfig, UserData
from core.tuners.preference import OBJECTIVE_DPO
from core.tuners.registry import PREFIX
from core.tuners.seq2seq import is_encoder_decoder
from core.tuners.train import train_adapters

__all__ = ["JobInterrupted", "TransientJobError", "run_training_job"]

log = logging.getLogger(__name__)


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
    token = claim(ctx, job_id)
    if token is None:
        return None
    lease = JobLease(ctx.session_factory, job_id, token, ctx.settings.job_lease_s)
    with lease:
        return _run_claimed(ctx, Attempt(job_id=job_id, lease=lease, stop_requested=should_stop), final_attempt)


def _run_claimed(ctx: ServiceContext, run: Attempt, final_attempt: bool) -> str | None:
    job_id = run.job_id
    try:
        _train_and_publish(ctx, run)
    except LeaseLost:
        return lease_lost(job_id)
    except TrainingCancelled:
        if run.lease.lost:
            return lease_lost(job_id)
        if run.interrupted:
            requeue(ctx, run, "Interrupted by shutdown; the job will resume")
            raise JobInterrupted(f"job {job_id} interrupted") from None
        return finish(ctx, run, "cancelled", message="Job cancelled")
    except TRANSIENT_ERRORS as exc:
        if not final_attempt:
            requeue(ctx, run, f"Transient error, will retry: {exc}", level="warning")
            raise TransientJobError(str(exc)) from exc
        return finish(ctx, run, "failed", error=f"storage or database unavailable: {exc}")
    except (InvalidTrainingData, ArtifactError, SteerError) as exc:
        return finish(ctx, run, "failed", error=str(exc))
    except BaseException as exc:
        if type(exc).__name__ == "SoftTimeLimitExceeded":  # Celery's, without importing Celery
            limit = ctx.settings.train_time_limit_s
            return finish(ctx, run, "failed", error=f"job exceeded the time limit of {limit:g} s")
        log.exception("training job %s crashed", job_id)
        finish(ctx, run, "failed", error=f"internal error: {type(exc).__name__}: {exc}")
        raise
    candidates = [u for u in run.result["users"].values() if u["status"] == "candidate"]
    message = "Job succeeded"
    if candidates:
        message += f"; {len(candidates)} new version(s) kept as candidates, not activated (worse than the active one)"
    return finish(ctx, run, "succeeded", message=message, result=run.result)


def _train_and_publish(ctx: ServiceContext, run: Attempt) -> None:
    settings = ctx.settings
    with session_scope(ctx.session_factory) as session:
        job = session.get(Job, run.job_id)
        assert job is not None
        resolved = resolve(job.hyperparameters, settings)
        job.hyperparameters = resolved
    prefers = resolved.get(OBJECTIVE) == OBJECTIVE_DPO
    users = gather_users(ctx, run, prefers)
    if not users.todo:
        if run.result["users"]:
            return  # an earlier attempt published everything
        raise InvalidTrainingData("; ".join(f"user {u}: {why}" for u, why in run.result["skipped"].items()))

    config = training_config(resolved, settings)
    base = ctx.base_model()
    if settings.train_instant_version and not is_encoder_decoder(base) and not prefers:
        instant = [
            (d.user_id, users.external_ids[d.user_id], d.samples) for d in users.todo if d.user_id not in users.controls
        ]
        publish_instant_versions(ctx, base, run.job_id, instant, config)
    prepare_references(ctx, run.job_id, base, config, users)
    crash_point("before_first_step", run.job_id)
    run.events_every = max(1, config.max_steps // EVENTS_PER_JOB)
    trained: list[tuple[TrainingConfig, TrainedAdaptation]] = []
    for group_config, group in _method_groups(config, users.todo, users.controls):
        what = f"{len(group)} user(s) on {base.model_id}, method {group_config.method}"
        job_event(ctx, run.job_id, f"Training {what}, for up to {group_config.max_steps} steps")
        results = train_adapters(
            base,
            group,
            group_config,
            on_progress=lambda progress: on_progress(ctx, run, progress),
            should_cancel=lambda: should_cancel(ctx, run),
        )
        trained.extend((group_config, result) for result in results)
    for group_config, result in trained:
        _publish(ctx, run, base, users, group_config, result, prefers)


def _publish(
    ctx: ServiceContext,
    run: Attempt,
    base: BaseModel,
    users: JobUsers,
    config: TrainingConfig,
    result: TrainedAdaptation,
    prefers: bool,
) -> None:
    """Store one user's new version, activated if the publish policy says it is no worse."""
    metrics = {k: v for k, v in result.metrics.items() if v is None or isinstance(v, (int, float, bool, str, dict))}
    active_version = users.compared_with[result.user_id]
    metrics["method"] = result.method
    metrics["active_val_loss"] = metrics.pop("reference_val_loss", None)
    metrics["compared_with_version"] = active_version
    activate, why = no_worse_preferences(metrics) if prefers else no_worse(metrics, active_version)
    population = users.population
    on_population = population is not None and result.user_id not in users.controls and result.method == PREFIX
    if on_population:
        metrics["population_version"] = population.version
    artifacts = artifacts_of(base, config, result, metrics)
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
        expected_active=users.active_at_start[result.user_id],
    )
    if row is None:
        run.result["skipped"][result.user_id] = "user deleted during training"
        return
    if activate and row.status == "candidate":
        why = "another version became active during training; it was not compared with this one"
    entry = published_entry(users.external_ids[result.user_id], row)
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
        job_event(ctx, run.job_id, f"Published and activated {published}: {why}", data)
    else:
        job_event(ctx, run.job_id, f"Published {published} as a candidate, not activated: {why}", data, level="warning")


def _method_groups(
    config: TrainingConfig, todo: list[UserData], controls: set[str]
) -> list[tuple[TrainingConfig, list[UserData]]]:
    """The job's users under the job's method, its controls under 'prefix' (a control is a prefix
    that composes with any user's adaptation); a job holds one or the other in practice."""
    users = [data for data in todo if data.user_id not in controls]
    prefixes = [data for data in todo if data.user_id in controls]
    groups = [(config, users), (replace(config, method=PREFIX), prefixes)]
    return [(group_config, group) for group_config, group in groups if group]
