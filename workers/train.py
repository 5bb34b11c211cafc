"""`steer.train`: the Celery task adapter around `core.service.training_job.run_training_job`.

Each pool process (the one that trains) announces itself in Redis with a heartbeat carrying the job
it runs and its training metrics (`core/inference/heartbeat.py`): `GET /v1/admin/workers`,
`/readyz` (`training_workers`) and the API's `/metrics` read them."""

from __future__ import annotations

import logging
import threading

import redis
from celery import shared_task
from celery.signals import worker_process_init, worker_process_shutdown
from prometheus_client import CollectorRegistry, generate_latest, start_http_server
from sqlalchemy.exc import OperationalError

from core.config import get_settings
from core.inference.heartbeat import WorkerHeartbeat, worker_name
from core.logging_setup import disable_progress_bars_unless_tty, request_id
from core.service.context import ServiceContext, build_context
from core.service.metrics import TRAIN_STEP_SECONDS
from core.service.training_job import TransientJobError, run_training_job
from core.storage import BlobStoreUnavailable

log = logging.getLogger(__name__)
MAX_RETRIES = 5

_context: ServiceContext | None = None
_context_lock = threading.Lock()
_current_job: str | None = None  # the job this process trains now, for its heartbeat
_heartbeat: WorkerHeartbeat | None = None


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
    global _current_job
    final = self.request.retries >= MAX_RETRIES
    _current_job = job_id
    token = request_id.set(job_id)  # the job's log lines carry its id where a request's carry theirs
    try:
        return run_training_job(job_id, worker_context(), final_attempt=final)
    finally:
        request_id.reset(token)
        _current_job = None


@worker_process_init.connect
def _serve_metrics(**_kwargs: object) -> None:
    """Announce the process that trains (the pool child) and expose its training step histogram:
    published with its heartbeat, and on `--metrics-port` when set."""
    global _heartbeat
    disable_progress_bars_unless_tty()
    settings = get_settings()
    registry = CollectorRegistry()
    registry.register(TRAIN_STEP_SECONDS)
    if settings.redis_url is not None:
        _heartbeat = WorkerHeartbeat(
            redis.Redis.from_url(settings.redis_url),
            worker_name(),
            settings.infer_worker_timeout_s,
            kind="training",
            current=lambda: _current_job,
            metrics=lambda: generate_latest(registry),
        ).start()
    port = settings.worker_metrics_port
    if port is not None:
        start_http_server(port, registry=registry)
        log.info("training metrics on :%s/metrics", port)


@worker_process_shutdown.connect
def _leave(**_kwargs: object) -> None:
    if _heartbeat is not None:
        _heartbeat.stop()
