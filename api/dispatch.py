"""Handing committed jobs to whoever runs them: the embedded executor or the Celery workers."""

from __future__ import annotations

import logging
from typing import Protocol

import redis

from core.service.context import ServiceContext
from core.service.errors import DispatchError
from core.service.executor import EmbeddedExecutor
from core.service.instant_queue import announce_queued_job
from core.service.job_lease import JobRecovery, recover_lost_jobs

log = logging.getLogger(__name__)
TRAIN_TASK = "steer.train"
TRAIN_QUEUE = "train"


class JobDispatcher(Protocol):
    def start(self) -> None: ...
    def submit(self, job_id: str) -> None: ...
    def stop(self) -> None: ...


class CeleryDispatcher:
    """Sends `steer.train(job_id)` to the `train` queue; the worker does the rest.

    It also dispatches again, every `STEER_JOB_SWEEP_INTERVAL_S`, the jobs whose worker host died
    (lease expired) or whose message the broker lost (see core/service/job_lease.py).
    """

    def __init__(self, ctx: ServiceContext) -> None:
        from workers.celery_app import make_celery  # Celery only in distributed mode

        self.celery = make_celery(ctx.settings)
        settings = ctx.settings
        # Inference workers publish a queued job's instant versions (core/service/instant_queue.py).
        self.instant = ctx.redis() if settings.train_instant_version else None
        self.recovery = JobRecovery(
            lambda: recover_lost_jobs(
                ctx.session_factory,
                self.submit,
                lease_s=settings.job_lease_s,
                redispatch_after_s=settings.job_redispatch_after_s,
            ),
            settings.job_sweep_interval_s,
        )

    def start(self) -> None:
        self.recovery.start()

    def submit(self, job_id: str) -> None:
        try:
            self.celery.send_task(TRAIN_TASK, args=[job_id], queue=TRAIN_QUEUE)
        except Exception as exc:  # noqa: BLE001 - kombu raises many connection error types
            raise DispatchError(f"cannot queue job {job_id}: the broker is unavailable ({exc})") from exc
        if self.instant is not None:
            try:
                announce_queued_job(self.instant, job_id)
            except redis.RedisError as exc:  # the job publishes them itself when it starts
                log.warning("job %s: instant versions not announced to the inference workers: %s", job_id, exc)

    def stop(self) -> None:
        self.recovery.stop()

    def ping(self) -> None:
        with self.celery.connection_for_write() as connection:
            connection.ensure_connection(max_retries=1, timeout=3)

    def queue_depth(self) -> int | None:
        try:
            with self.celery.connection_for_read() as connection:
                return int(connection.default_channel.client.llen(TRAIN_QUEUE))
        except Exception as exc:  # noqa: BLE001 - kombu raises many connection error types
            log.warning("training queue depth unknown: the broker is unavailable (%s)", exc)
            return None


def make_dispatcher(ctx: ServiceContext) -> JobDispatcher:
    if ctx.settings.mode == "distributed":
        return CeleryDispatcher(ctx)
    return EmbeddedExecutor(ctx)
