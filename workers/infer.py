"""`steer worker infer`: one inference worker process.

Loads the base model, builds the prefix cache and the batching engine, and serves jobs from the
Redis stream `steer:infer:requests` until SIGTERM/SIGINT. Run as many as there are machines. It
also publishes the instant versions of users whose training job is still queued
(core/service/instant_queue.py).
"""

from __future__ import annotations

import logging
import signal

import redis
from prometheus_client import CollectorRegistry, generate_latest

from core.config import get_settings
from core.inference import metrics as inference_metrics
from core.inference.heartbeat import WorkerHeartbeat, worker_name
from core.logging_setup import configure_logging

log = logging.getLogger("steer.worker.infer")


def main() -> None:
    configure_logging()
    settings = get_settings()
    if settings.redis_url is None:
        raise SystemExit("steer worker infer needs STEER_REDIS_URL (embedded mode serves in the API process)")
    client = redis.Redis.from_url(settings.redis_url)
    consumer = worker_name()
    # Published with each heartbeat; the API's /metrics shows them with a `worker` label.
    registry = CollectorRegistry()
    inference_metrics.register_all(registry)
    engine = None

    def current() -> str | None:
        load = 0 if engine is None else engine.load
        return f"{load} rows in batch or queue" if load else None

    # Announced while the model loads: the API queues requests for this worker instead of refusing them.
    heartbeat = WorkerHeartbeat(
        client,
        consumer,
        settings.infer_worker_timeout_s,
        current=current,
        metrics=lambda: generate_latest(registry),
    ).start()
    # Imported only now: importing torch alone takes seconds.
    from core.engine.model import load_base_model
    from core.inference.erasure import ErasureListener
    from core.inference.redis_transport import RedisInferenceWorker
    from core.inference.service import build_engine
    from core.service.context import build_context
    from core.service.instant_queue import InstantVersionListener
    from core.storage import make_blob_store

    base = load_base_model(
        settings.base_model, device=settings.device, dtype=settings.dtype, cache_root=settings.model_cache_dir
    )
    engine = build_engine(settings, base, make_blob_store(settings)).start()
    worker = RedisInferenceWorker(
        client,
        engine,
        consumer=consumer,
        claim_idle_s=settings.infer_claim_idle_s,
        worker_timeout_s=settings.infer_worker_timeout_s,
        heartbeat=heartbeat,
    )
    # Erased users leave this worker's prefix cache too (core/inference/erasure.py).
    erasures = None
    if engine.prefixes is not None:  # not truthiness: an empty cache has len() 0
        erasures = ErasureListener(redis.Redis.from_url(settings.redis_url), engine.prefixes)
        erasures.start()
    # Users onboarded behind a busy training worker answer from here (core/service/instant_queue.py).
    instant = None
    if settings.train_instant_version:
        instant = InstantVersionListener(
            redis.Redis.from_url(settings.redis_url), build_context(settings, base_model=base), consumer
        )
        instant.start()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: worker.stop())
    log.info("inference worker ready: base=%s max_batch_size=%d", base.model_id, settings.max_batch_size)
    try:
        worker.run()
    finally:
        if erasures is not None:
            erasures.stop()
        if instant is not None:
            instant.stop()
        engine.stop()


if __name__ == "__main__":
    main()
