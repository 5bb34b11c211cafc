"""The embedded mode's training executor: one background thread running queued jobs, fairly.

It calls the same `run_training_job` as the Celery worker. On start it picks up jobs left
queued (or running, from a process that died) in the database, so a restart loses nothing.

Fairness: a submitted job id only wakes the thread; which queued job runs next is decided from the
database: the oldest job of the owner (the one user a job trains; each batch job is its own owner)
that has had the fewest jobs run so far. So a user who queues many jobs cannot make another user's
onboarding wait behind all of them: it runs after at most the job already running.

Time to value does not wait for that turn: as a job is submitted, a second thread publishes its
users' instant versions (core/service/instant_version.py), so a user onboarded behind other jobs
answers in seconds.
"""

from __future__ import annotations

import logging
import queue
import threading
from concurrent.futures import ThreadPoolExecutor

from sqlalchemy import select, update

from core.db import Job, session_scope
from core.service.context import ServiceContext
from core.service.instant_version import publish_for_queued_job
from core.service.training_job import JobInterrupted, run_training_job

log = logging.getLogger(__name__)
_STOP = object()


class EmbeddedExecutor:
    """Runs training jobs one at a time in a daemon thread of this process."""

    def __init__(self, ctx: ServiceContext) -> None:
        self.ctx = ctx
        self._queue: queue.Queue[object] = queue.Queue()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._runs_by_owner: dict[str, int] = {}
        self._instant: ThreadPoolExecutor | None = None

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stopping.clear()
        with session_scope(self.ctx.session_factory) as session:
            # This process is the only runner: an attempt recorded as running died with the
            # previous process, whatever its lease says.
            session.execute(
                update(Job).where(Job.status == "running").values(status="queued", lease_token=None, lease_holder=None)
            )
            pending = (
                session.execute(select(Job.id).where(Job.status.in_(("queued", "running"))).order_by(Job.created_at))
                .scalars()
                .all()
            )
        self._instant = ThreadPoolExecutor(1, thread_name_prefix="steer-instant")
        for job_id in pending:
            self.submit(job_id)
        self._thread = threading.Thread(target=self._loop, name="steer-training", daemon=True)
        self._thread.start()

    def submit(self, job_id: str) -> None:
        self._queue.put(job_id)
        if self._instant is not None:
            self._instant.submit(self._publish_instant_versions, job_id)

    def stop(self, timeout: float = 30.0) -> None:
        """Stop after the current training step; the running job goes back to the queue."""
        if self._thread is None:
            return
        self._stopping.set()
        self._queue.put(_STOP)
        self._thread.join(timeout)
        self._thread = None
        if self._instant is not None:
            self._instant.shutdown(wait=True, cancel_futures=True)
            self._instant = None

    def _publish_instant_versions(self, job_id: str) -> None:
        try:
            publish_for_queued_job(self.ctx, job_id)
        except Exception:  # noqa: BLE001 - the job publishes them itself when it starts
            log.warning("could not publish instant versions for queued job %s", job_id, exc_info=True)

    def _loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP or self._stopping.is_set():
                return
            # Jobs that went back to the queue in this pass (a transient error) wait for the next
            # wake-up (the lost-job sweep dispatches them again) instead of spinning here.
            deferred: set[str] = set()
            while (job := self._next_job(deferred)) is not None:
                job_id, owner = job
                self._runs_by_owner[owner] = self._runs_by_owner.get(owner, 0) + 1
                try:
                    run_training_job(job_id, self.ctx, should_stop=self._stopping.is_set)
                except JobInterrupted:
                    return
                except Exception:  # noqa: BLE001 - the job row records it; keep serving others
                    log.exception("training job %s failed", job_id)
                deferred.add(job_id)
                if self._stopping.is_set():
                    return

    def _next_job(self, deferred: set[str]) -> tuple[str, str] | None:
        """(job id, owner) of the queued job to run next, fairly across owners; None if none."""
        with session_scope(self.ctx.session_factory) as session:
            jobs = session.scalars(
                select(Job)
                .where(Job.status == "queued", Job.cancel_requested.is_(False))
                .order_by(Job.created_at, Job.id)
            )
            queued = [(job.id, list(job.user_ids)) for job in jobs]
        candidates = [(job_id, _owner(job_id, user_ids)) for job_id, user_ids in queued if job_id not in deferred]
        if not candidates:
            return None
        # min() keeps the first (oldest) of equals: oldest job of the least-served owner.
        return min(candidates, key=lambda c: self._runs_by_owner.get(c[1], 0))


def _owner(job_id: str, user_ids: list[str]) -> str:
    return user_ids[0] if len(user_ids) == 1 else job_id
