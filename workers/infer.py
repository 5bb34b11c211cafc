"""`steer worker infer`: one inference worker process.

Loads the base model, builds the prefix cache and the batching engine, and serves jobs from the
Redis stream `steer:infer:requests` until SIGTERM/SIGINT. Run as many as there are machines.
"""

from __future__ import annotations

import logging
import os
import signal
import socket

import redis

from core.config import get_settings
from core.inference.heartbeat import WorkerHeartbeat

log = logging.getLogger("steer.worker.infer")


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    settings = get_settings()
    if settings.redis_url is None:
        raise SystemExit("steer worker infer needs STEER_REDIS_URL (embedded mode serves in the API process)")
    client = redis.Redis.from_url(settings.redis_url)
    consumer = f"{socket.gethostname()}-{os.getpid()}"
    # Announced while the model loads: the API queues requests for this worker instead of refusing them.
    heartbeat = WorkerHeartbeat(client, consumer, settings.infer_worker_timeout_s).start()
    # Imported only now: importing torch alone takes seconds.
    from core.inference.erasure import ErasureListener
    from core.inference.redis_transport import RedisInferenceWorker
    from core.inference.service import build_engine
    from core.model import load_base_model
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
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: worker.stop())
    log.info("inference worker ready: base=%s max_batch_size=%d", base.model_id, settings.max_batch_size)
    try:
        worker.run()
    finally:
        if erasures is not None:
            erasures.stop()
        engine.stop()


if __name__ == "__main__":
    main()
