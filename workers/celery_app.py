"""The Celery app of the training workers (`steer worker train`), configured from Settings.

Reliability choices, each for a failure an operator will meet:
* `task_acks_late` + `task_reject_on_worker_lost`: a worker killed mid-job (OOM, node loss)
  does not lose the job; the broker redelivers it and `run_training_job` resumes idempotently;
* `worker_prefetch_multiplier=1` with concurrency 1: one job per device, no job parked behind
  a long one on a busy worker;
* the Redis visibility timeout exceeds the hard time limit, so a job still training is never
  redelivered to a second worker;
* soft time limit = `STEER_TRAIN_TIME_LIMIT_S` (the job is failed cleanly), hard limit a
  minute later (the process is killed).
"""

from __future__ import annotations

from celery import Celery
from celery.signals import setup_logging

from core.config import Settings, get_settings
from core.logging_setup import configure_logging

TRAIN_QUEUE = "train"
HARD_LIMIT_GRACE_S = 60


def make_celery(settings: Settings) -> Celery:
    if not settings.redis_url:
        raise RuntimeError("the training workers need STEER_REDIS_URL (distributed mode)")
    soft = settings.train_time_limit_s
    hard = soft + HARD_LIMIT_GRACE_S
    app = Celery("steer", broker=settings.redis_url, include=["workers.train"])
    app.conf.update(
        task_default_queue=TRAIN_QUEUE,
        task_routes={"steer.train": {"queue": TRAIN_QUEUE}},
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        worker_concurrency=1,
        task_soft_time_limit=soft,
        task_time_limit=hard,
        task_ignore_result=True,  # job state lives in the database, not in a result backend
        task_serializer="json",
        accept_content=["json"],
        broker_transport_options={"visibility_timeout": int(hard * 2 + 600)},
        broker_connection_retry_on_startup=True,
        broker_connection_timeout=5,
        task_publish_retry_policy={"max_retries": 2, "interval_start": 0.2, "interval_step": 0.5},
        worker_hijack_root_logger=False,
    )
    return app


@setup_logging.connect
def _steer_logging(loglevel: int | str | None = None, **_kwargs: object) -> None:
    """Celery's lines in Steer's format (timestamps, levels, STEER_LOG_FORMAT=json) instead of its own."""
    configure_logging(loglevel or "INFO")


# `celery -A workers.celery_app worker` finds this.
app = make_celery(get_settings()) if get_settings().redis_url else Celery("steer", include=["workers.train"])
