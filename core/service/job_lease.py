"""Leases on training jobs: which attempt may run a job, and finding jobs whose runner is gone.

The broker alone cannot tell a slow job from a dead host: with Redis, an unacknowledged message
comes back only after the visibility timeout (hours, because a job may train for an hour), and a
message lost with a broker restart never comes back. So the job row carries a lease:

* claiming a job writes a fresh `lease_token` and `heartbeat_at`; a `JobLease` thread renews the
  heartbeat every quarter of the lease while the attempt lives (also during long steps, model
  loading and uploads, which block the training thread);
* only the holder of the current token may publish a prefix or finish the job (fencing), so an
  attempt that was presumed dead and then resumed stops without writing anything;
* `recover_lost_jobs` (run periodically by the API's dispatcher in distributed mode) puts back in
  the queue and dispatches again every running job whose heartbeat is older than the lease, and
  every queued job handed to the broker long ago and still not started. A duplicate message is
  harmless: a claim of a finished job, or of one a live attempt holds, does nothing;
* a redelivered message (Celery hands a task back at once when its pool child dies) takes the job
  over without waiting for the lease when the holder is provably gone: the lease names its holder
  (`lease_holder`: host, pid, process namespace), and a claim made in the same process namespace
  sees that the pid no longer runs; from elsewhere, a holder silent for `takeover_grace_s` (two
  missed renewals) counts as gone.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta
from functools import lru_cache
from pathlib import Path

from sqlalchemy import and_, or_, select, update
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker

from core.db import Job, database_now, session_scope
from core.service.errors import ServiceError
from core.service.jobs import add_event

log = logging.getLogger(__name__)
RENEWALS_PER_LEASE = 4
MISSED_RENEWALS_FOR_TAKEOVER = 2


class LeaseLost(ServiceError):
    """Another attempt took the job over; this one must stop without writing."""


def new_lease_token() -> str:
    return uuid.uuid4().hex


def takeover_grace_s(lease_s: float) -> float:
    """How long a holder may stay silent before a redelivered task takes its job (15 s of 60)."""
    return lease_s / RENEWALS_PER_LEASE * MISSED_RENEWALS_FOR_TAKEOVER


@lru_cache(maxsize=1)
def _process_namespace() -> str:
    """Where a pid means one process: this kernel boot and pid namespace (containers sharing a host
    name, or one host's containers, never compare pids of another namespace)."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        inode = os.readlink("/proc/self/ns/pid").strip("pid:[]")
        return f"{boot}.{inode}"
    except OSError:  # no procfs: pids are compared only between processes of the same host name
        return f"host.{socket.gethostname()}"


def lease_holder() -> str:
    """This process as a lease holder: "<host>:<pid>:<process namespace>"."""
    return f"{socket.gethostname()}:{os.getpid()}:{_process_namespace()}"


def holder_is_gone(holder: str | None) -> bool:
    """True only when `holder` provably no longer runs: it lived in this process namespace and its
    pid is gone (or a zombie awaiting its parent). False when unknown or elsewhere."""
    parts = (holder or "").split(":")
    if len(parts) != 3 or parts[2] != _process_namespace() or not parts[1].isdigit():
        return False
    pid = parts[1]
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # another user's live process
        return False
    try:  # a SIGKILLed child its parent has not reaped yet still has a pid
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return False


def lease_expired(lease_s: float, now: datetime):
    """SQL condition: the job is running and its holder has not renewed within `lease_s` of `now`
    (the database's clock, `database_now`, like every lease time)."""
    stale_before = now - timedelta(seconds=lease_s)
    return and_(Job.status == "running", or_(Job.heartbeat_at.is_(None), Job.heartbeat_at < stale_before))


def holds_lease(session: Session, job_id: str, token: str) -> bool:
    """True if `token` is still the job's lease; locks the job row until the transaction ends, so
    a takeover cannot slip in between this check and the caller's commit (Postgres)."""
    holder = session.execute(select(Job.lease_token).where(Job.id == job_id).with_for_update()).scalar_one_or_none()
    return holder == token


class JobLease:
    """Renews one attempt's lease from a daemon thread; `lost` turns true when it was taken over."""

    def __init__(self, factory: sessionmaker[Session], job_id: str, token: str, lease_s: float) -> None:
        self.factory, self.job_id, self.token = factory, job_id, token
        self.interval = max(lease_s / RENEWALS_PER_LEASE, 0.1)
        self._lost = threading.Event()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"lease-{job_id}", daemon=True)

    @property
    def lost(self) -> bool:
        return self._lost.is_set()

    def __enter__(self) -> JobLease:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.release()

    def release(self) -> None:
        """Stop renewing (before the holder's last write, which ends the lease)."""
        self._stopped.set()
        if self._thread.is_alive():
            self._thread.join(self.interval + 5)

    def renew(self) -> bool:
        """One renewal; False once the lease belongs to someone else. A database error is not a
        loss: the holder keeps training and tries again (a takeover needs the database too)."""
        try:
            with session_scope(self.factory) as session:
                renewed = session.execute(
                    update(Job)
                    .where(Job.id == self.job_id, Job.lease_token == self.token, Job.status == "running")
                    .values(heartbeat_at=database_now(session))
                    .execution_options(synchronize_session=False)
                ).rowcount
        except DBAPIError:
            log.warning("could not renew the lease of job %s (database unavailable)", self.job_id)
            return True
        if not renewed:
            log.warning("job %s: lease lost to another attempt; stopping this one", self.job_id)
            self._lost.set()
        return bool(renewed)

    def _run(self) -> None:
        while not self._stopped.wait(self.interval):
            if not self.renew():
                return


def recover_lost_jobs(
    factory: sessionmaker[Session],
    dispatch: Callable[[str], None],
    *,
    lease_s: float,
    redispatch_after_s: float,
    now: datetime | None = None,
) -> list[str]:
    """Queue and dispatch again the jobs whose runner or message is gone; returns their ids.

    Each job is taken with one conditional UPDATE, so concurrent sweepers (several API processes)
    dispatch it once. Taking a running job clears its lease: the old attempt, should it still be
    alive, finds that out at its next renewal or publish and stops.
    """
    with session_scope(factory) as session:
        now = now or database_now(session)
        silent_since = now - timedelta(seconds=redispatch_after_s)
        lost = or_(
            lease_expired(lease_s, now),
            # NULL: the last dispatch failed (or the job predates dispatch times): dispatch it now.
            and_(Job.status == "queued", or_(Job.dispatched_at.is_(None), Job.dispatched_at < silent_since)),
        )
        candidates = session.execute(select(Job.id, Job.status).where(lost).order_by(Job.created_at)).all()
    recovered = []
    for job_id, status in candidates:
        with session_scope(factory) as session:
            taken = session.execute(
                update(Job)
                .where(Job.id == job_id, lost)
                .values(status="queued", lease_token=None, lease_holder=None, dispatched_at=now)
                .execution_options(synchronize_session=False)
            ).rowcount
            if not taken:
                continue  # started, finished or taken by another sweeper meanwhile
            reason = "its worker stopped renewing the lease" if status == "running" else "it was never started"
            add_event(session, job_id, f"Job dispatched again: {reason}", level="warning")
        try:
            dispatch(job_id)
        except Exception:  # noqa: BLE001 - broker down: clear the mark so the next sweep retries
            log.warning("could not dispatch recovered job %s; will retry", job_id, exc_info=True)
            with session_scope(factory) as session:
                session.execute(update(Job).where(Job.id == job_id, Job.status == "queued").values(dispatched_at=None))
            continue
        log.warning("job %s dispatched again (%s)", job_id, reason)
        recovered.append(job_id)
    return recovered


class JobRecovery:
    """Runs `recover_lost_jobs` every `interval_s` seconds in a daemon thread."""

    def __init__(self, sweep: Callable[[], list[str]], interval_s: float) -> None:
        self.sweep, self.interval_s = sweep, interval_s
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._stopped.clear()
        self._thread = threading.Thread(target=self._run, name="steer-job-recovery", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()
        if self._thread is not None:
            self._thread.join(10)
            self._thread = None

    def _run(self) -> None:
        while not self._stopped.wait(self.interval_s):
            try:
                self.sweep()
            except Exception:  # noqa: BLE001 - database down: try again next interval
                log.warning("lost-job sweep failed; retrying in %.0f s", self.interval_s, exc_info=True)
