"""Instant versions for queued jobs in the distributed mode.

The embedded executor publishes a queued job's instant versions as the job is submitted
(core/service/instant_version.py). In the distributed mode the API process holds no model, and a
training worker is busy training another job: a user onboarded behind it would wait for that job
to end before `user:<id>` answers. So the API also appends each job it dispatches to the Redis
stream `steer:train:instant`, and the inference workers, which hold the model and are free between
batches, follow it (`InstantVersionListener`, one thread per worker, a consumer group so one worker
handles each job) and publish the instant versions of the jobs still queued. A job that starts
first publishes its own; the registry publishes an instant version only while the user has no
active version, under the user's row lock, so the two can never both publish one.

A lost entry (Redis restarted empty, no inference worker running) costs only the wait: the job
publishes its users' instant versions when it starts, as before.
"""

from __future__ import annotations

import logging
import threading

import redis

from core.service.context import ServiceContext
from core.service.instant_version import publish_for_queued_job

log = logging.getLogger("steer.instant")

INSTANT_STREAM = "steer:train:instant"
GROUP = "instant"
_MAX_LEN = 10_000  # entries kept (approximately): far more than jobs queued at once
_RETRY_S = 1.0


def announce_queued_job(client: redis.Redis, job_id: str) -> None:
    """Ask an inference worker to publish `job_id`'s instant versions while the job is queued."""
    client.xadd(INSTANT_STREAM, {"job_id": job_id}, maxlen=_MAX_LEN, approximate=True)


def ensure_group(client: redis.Redis) -> None:
    # From the stream's start when the group is new: a job announced before the first worker came up
    # is still handled (a job no longer queued costs one lookup).
    try:
        client.xgroup_create(INSTANT_STREAM, GROUP, id="0", mkstream=True)
    except redis.ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


class InstantVersionListener:
    """Follows `INSTANT_STREAM` in the consumer group `instant` and publishes the instant versions
    of each announced job still queued; run it on its own thread of an inference worker."""

    def __init__(self, client: redis.Redis, ctx: ServiceContext, consumer: str, *, block_ms: int = 1000):
        self.client, self.ctx, self.consumer, self.block_ms = client, ctx, consumer, block_ms
        self._stop = threading.Event()

    def start(self) -> threading.Thread:
        self._thread = threading.Thread(target=self.run, name="steer-instant-versions", daemon=True)
        self._thread.start()
        return self._thread

    def stop(self, timeout_s: float = 5.0) -> None:
        """Ask the loop to end and wait for it: a blocking read returns within its block time."""
        self._stop.set()
        thread = getattr(self, "_thread", None)
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout_s)
            if thread.is_alive():
                log.warning("%s did not stop within %.0f s", thread.name, timeout_s)

    def run(self) -> None:
        grouped = False
        while not self._stop.is_set():
            try:
                if not grouped:
                    ensure_group(self.client)
                    grouped = True
                reply = self.client.xreadgroup(
                    GROUP, self.consumer, {INSTANT_STREAM: ">"}, count=8, block=self.block_ms
                )
                for _, entries in reply or []:
                    for entry_id, fields in entries:
                        self._publish(fields.get(b"job_id", b"").decode())
                        self.client.xack(INSTANT_STREAM, GROUP, entry_id)
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                log.warning("instant-version stream unavailable (%s); retrying", exc)
                self._stop.wait(_RETRY_S)
            except redis.ResponseError as exc:  # the group vanished with a Redis restart
                log.warning("instant-version stream: %s; recreating the group", exc)
                grouped = False
                self._stop.wait(_RETRY_S)
            except Exception:  # noqa: BLE001 - the thread must outlive anything one entry does
                log.exception("instant-version listener error; continuing")
                self._stop.wait(_RETRY_S)

    def _publish(self, job_id: str) -> None:
        if not job_id:
            return
        try:
            publish_for_queued_job(self.ctx, job_id)
        except Exception:  # noqa: BLE001 - the job publishes them itself when it starts
            log.exception("instant versions of queued job %s failed; the job will publish them when it starts", job_id)
