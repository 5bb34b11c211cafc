"""The embedded mode's training executor: one background thread running queued jobs in order.

It calls the same `run_training_job` as the Celery worker. On start it picks up jobs left
queued (or running, from a process that died) in the database, so a restart loses nothing.
"""

from __future__ import annotations

import logging
import queue
import threading

from sqlalchemy import select, update

from core.db import Job, session_scope
from core.service.context import ServiceContext
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

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stopping.clear()
        with session_scope(self.ctx.session_factory) as session:
            # This process is the only runner: an attempt recorded as running died with the
            # previous process, whatever its lease says.
            session.execute(update(Job).where(Job.status == "running").values(status="queued", lease_token=None))
            pending = (
                session.execute(select(Job.id).where(Job.status.in_(("queued", "running"))).order_by(Job.created_at))
                .scalars()
                .all()
            )
        for job_id in pending:
            self.submit(job_id)
        self._thread = threading.Thread(target=self._loop, name="steer-training", daemon=True)
        self._thread.start()

    def submit(self, job_id: str) -> None:
        self._queue.put(job_id)

    def stop(self, timeout: float = 30.0) -> None:
        """Stop after the current training step; the running job goes back to the queue."""
        if self._thread is None:
            return
        self._stopping.set()
        self._queue.put(_STOP)
        self._thread.join(timeout)
        self._thread = None

    def _loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP or self._stopping.is_set():
                return
            try:
                run_training_job(str(item), self.ctx, should_stop=self._stopping.is_set)
            except JobInterrupted:
                return
            except Exception:  # noqa: BLE001 - the job row records it; keep serving others
                log.exception("training job %s failed", item)
