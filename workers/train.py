"""`steer.train`: the Celery task adapter around `core.service.training_job.run_training_job`."""

from __future__ import annotations

import logging
import threading

from celery import shared_task
from celery.signals import worker_process_init
from prometheus_client import CollectorRegistry, start_http_server
from sqlalchemy.exc import OperationalError

from core.config import get_settings
from core.service.context import ServiceContext, build_context
from core.service.metrics import TRAIN_STEP_SECONDS
from core.service.training_job import TransientJobError, run_training_job
from core.storage import BlobStoreUnavailable

log = logging.getLogger(__name__)
MAX_RETRIES = 5

_context: ServiceContext | None = None
_context_lock = threading.Lock()


def worker_context() -> ServiceContext:
    """One context per worker process: the base model is loaded once and reused by every job."""
    global _context
    with _context_lock:
        if _context is None:
            _context = build_context(get_settings())
        return _context


@shared_task(
    name="steer.train",
    bind=True,
    # Errors before the job was claimed (database down) retry too; the job row is untouched.
    autoretry_for=(TransientJobError, OperationalError, BlobStoreUnavailable),
    retry_backoff=5,
    retry_backoff_max=300,
    retry_jitter=True,
    max_retries=MAX_RETRIES,
)
def train(self, job_id: str) -> str | None:
    """Run one training job by id. Transient store/DB errors requeue the job and retry with
    backoff; the last retry marks it failed instead."""
    final = self.request.retries >= MAX_RETRIES
    return run_training_job(job_id, worker_context(), final_attempt=final)


@worker_process_init.connect
def _serve_metrics(**_kwargs: object) -> None:
    """Expose the training step histogram from the process that trains (the pool child)."""
    port = get_settings().worker_metrics_port
    if port is not None:
        registry = CollectorRegistry()
        registry.register(TRAIN_STEP_SECONDS)
        start_http_server(port, registry=registry)
        log.info("training metrics on :%s/metrics", port)
