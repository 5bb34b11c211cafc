"""One attempt at a training job, around whatever it trains: claiming the job under a lease,
progress and cancellation while it trains, its events, and how it ends (finished, or back in the
queue after a transient error or a shutdown). core/service/training_job.py runs the attempt.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import and_, or_, select, update
from sqlalchemy.exc import DBAPIError, OperationalError

from core.db import Job, database_now, session_scope, utcnow
from core.db.models import JOB_FINISHED_STATUSES
from core.service.context import ServiceContext
from core.service.crash_points import crash_point
from core.service.errors import ServiceError
from core.service.job_lease import (
    JobLease,
    holder_is_gone,
    holds_lease,
    lease_expired,
    lease_holder,
    new_lease_token,
    takeover_grace_s,
)
from core.service.jobs import add_event
from core.service.metrics import TRAIN_STEP_SECONDS
from core.service.registry import remove_unindexed_blobs
from core.storage import BlobStoreUnavailable
from core.tuners.base import Progress

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 3
"""A job whose worker died this many times (OOM, node loss) is failed instead of redelivered forever."""


CANCEL_POLL_S = 1.0


EVENTS_PER_JOB = 20


TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (OperationalError, BlobStoreUnavailable)


class TransientJobError(ServiceError):
    """The job hit a transient store/database error and went back to the queue; retry it."""


class JobInterrupted(ServiceError):
    """The process is shutting down; the job went back to the queue and resumes on restart."""


@dataclass
class Attempt:
    """Bookkeeping of one attempt."""

    job_id: str
    lease: JobLease
    stop_requested: Callable[[], bool] | None
    last_poll: float = 0.0
    last_elapsed: float = 0.0
    interrupted: bool = False
    events_every: int = 1
    result: dict[str, Any] = field(default_factory=lambda: {"users": {}, "skipped": {}})


def claim(ctx: ServiceContext, job_id: str) -> str | None:
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
        remove_unindexed_blobs_of(ctx, user_ids)
        return None
    return token


def lease_lost(job_id: str) -> None:
    log.warning("job %s: this attempt lost its lease and stopped; the new holder finishes the job", job_id)


def on_progress(ctx: ServiceContext, run: Attempt, progress: Progress) -> None:
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


def should_cancel(ctx: ServiceContext, run: Attempt) -> bool:
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


def job_event(
    ctx: ServiceContext, job_id: str, message: str, data: dict[str, Any] | None = None, level: str = "info"
) -> None:
    with session_scope(ctx.session_factory) as session:
        add_event(session, job_id, message, data, level=level)


def requeue(ctx: ServiceContext, run: Attempt, message: str, level: str = "info") -> None:
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


def finish(
    ctx: ServiceContext,
    run: Attempt,
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
        remove_unindexed_blobs_of(ctx, user_ids)
    return status


def remove_unindexed_blobs_of(ctx: ServiceContext, user_ids: list[str]) -> None:
    """A job that ends without publishing may have left blobs of an interrupted attempt."""
    for user_id in user_ids:
        try:
            remove_unindexed_blobs(ctx.session_factory, ctx.store, user_id)
        except Exception:  # noqa: BLE001 - the next publish for this user sweeps again
            log.warning("could not sweep unindexed blobs of user %s", user_id, exc_info=True)
