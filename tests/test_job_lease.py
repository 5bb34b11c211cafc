"""Job leases: a live attempt keeps its job, an expired one is taken over, a taken-over attempt
writes nothing, and the sweep dispatches each lost job exactly once.

Embedded mode (SQLite, and Postgres for the clock test) with a recording dispatcher, tiny model; the
distributed versions of the same guarantees (real Celery worker host killed, broker restarted empty) are in
tests/test_reliability_workers.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy import select

import core.db.models
import core.db.session
from core.db import Job, JobEvent, PrefixVersion, database_now, utcnow
from core.db.migrate import upgrade_to_head
from core.service.job_attempt import Attempt, claim
from core.service.job_lease import JobLease, lease_holder, recover_lost_jobs, takeover_grace_s
from core.service.training_job import _run_claimed, run_training_job
from tests.support.api import RecordingDispatcher, api_client, make_settings, onboard, tiny_base_model

LEASE_S = 60.0


def _set(ctx, job_id: str, **values) -> None:
    with ctx.session_factory.begin() as session:
        job = session.get(Job, job_id)
        for key, value in values.items():
            setattr(job, key, value)


def _job(ctx, job_id: str) -> Job:
    with ctx.session_factory() as session:
        job = session.get(Job, job_id)
        session.expunge(job)
        return job


def _client(tmp_path: Path):
    return api_client(
        make_settings(tmp_path, job_lease_s=LEASE_S), base=tiny_base_model(), dispatcher=RecordingDispatcher()
    )


def test_a_live_lease_turns_a_duplicate_delivery_away_and_an_expired_one_is_taken_over(tmp_path):
    with _client(tmp_path) as client:
        ctx = client.app.state.ctx
        job_id = onboard(client, "dora")["job"]["id"]
        _set(ctx, job_id, status="running", attempts=1, lease_token="other-attempt", heartbeat_at=utcnow())
        assert run_training_job(job_id, ctx) is None  # the other attempt is alive: leave it the job
        job = _job(ctx, job_id)
        assert (job.status, job.lease_token, job.attempts) == ("running", "other-attempt", 1)

        _set(ctx, job_id, heartbeat_at=utcnow() - timedelta(seconds=LEASE_S + 1))
        assert run_training_job(job_id, ctx) == "succeeded"  # its host went silent: take over
        job = _job(ctx, job_id)
        assert (job.status, job.lease_token, job.attempts) == ("succeeded", None, 2)


def _holder_with_pid(pid: int, host: str | None = None, namespace: str | None = None) -> str:
    """This process's lease holder string with another pid (or host, or process namespace)."""
    this_host, _pid, this_namespace = lease_holder().split(":")
    return f"{host or this_host}:{pid}:{namespace or this_namespace}"


def _events(ctx, job_id: str) -> list[str]:
    with ctx.session_factory() as session:
        return list(session.execute(select(JobEvent.message).where(JobEvent.job_id == job_id)).scalars())


def test_a_redelivery_takes_over_at_once_from_a_holder_whose_process_is_gone(tmp_path):
    """Celery redelivers a task the moment its pool child is SIGKILLed; the lease (heartbeat still
    fresh) names that child, whose pid no longer runs here: the new attempt takes the job at once."""
    with _client(tmp_path) as client:
        ctx = client.app.state.ctx
        job_id = onboard(client, "hal")["job"]["id"]
        assert claim(ctx, job_id) is not None
        assert _job(ctx, job_id).lease_holder == lease_holder()  # "<host>:<pid>:<process namespace>"
        assert lease_holder().split(":")[1] == str(os.getpid())
        dead = subprocess.Popen([sys.executable, "-c", "pass"])
        dead.wait()  # exited and reaped: its pid runs nothing
        _set(ctx, job_id, lease_holder=_holder_with_pid(dead.pid), heartbeat_at=utcnow())
        assert run_training_job(job_id, ctx) == "succeeded"
        job = _job(ctx, job_id)
        assert (job.status, job.attempts, job.lease_holder) == ("succeeded", 2, None)
        assert "Took the job over from the previous attempt: its process is gone" in _events(ctx, job_id)


def test_a_redelivery_leaves_a_holder_that_may_be_alive_and_takes_one_silent_past_the_grace(tmp_path):
    with _client(tmp_path) as client:
        ctx = client.app.state.ctx
        job_id = onboard(client, "ivy")["job"]["id"]
        alive_here = _holder_with_pid(os.getppid())  # a live process in this namespace
        elsewhere = _holder_with_pid(2**22 + 7, host="other-host", namespace="other-boot.1")  # unknowable
        for holder in (alive_here, elsewhere, "garbage", None):
            _set(ctx, job_id, status="running", attempts=1, lease_token="t", lease_holder=holder, heartbeat_at=utcnow())
            assert run_training_job(job_id, ctx) is None, holder
            job = _job(ctx, job_id)
            assert (job.status, job.lease_token, job.attempts) == ("running", "t", 1), holder

        # Silent for longer than two renewals (well inside the lease): taken over by the redelivery.
        silent = utcnow() - timedelta(seconds=takeover_grace_s(LEASE_S) + 1)
        assert takeover_grace_s(LEASE_S) + 1 < LEASE_S
        _set(ctx, job_id, lease_holder=elsewhere, heartbeat_at=silent)
        assert run_training_job(job_id, ctx) == "succeeded"
        assert "Took the job over from the previous attempt: it stopped renewing its lease" in _events(ctx, job_id)


def test_an_attempt_that_lost_its_lease_publishes_nothing_and_does_not_touch_the_job(tmp_path):
    with _client(tmp_path) as client:
        ctx = client.app.state.ctx
        job_id = onboard(client, "erin")["job"]["id"]
        paused_token = claim(ctx, job_id)  # attempt A claims, then its host freezes
        assert paused_token is not None
        _set(ctx, job_id, heartbeat_at=utcnow() - timedelta(seconds=LEASE_S + 1))
        assert run_training_job(job_id, ctx) == "succeeded"  # attempt B takes over and finishes
        finished = _job(ctx, job_id)

        # A wakes up: its renewal fails, and if it trains on regardless, its publish is refused.
        paused = JobLease(ctx.session_factory, job_id, paused_token, LEASE_S)
        assert paused.renew() is False and paused.lost
        zombie = JobLease(ctx.session_factory, job_id, paused_token, LEASE_S)  # not yet aware
        assert _run_claimed(ctx, Attempt(job_id=job_id, lease=zombie, stop_requested=None), final_attempt=True) is None

        with ctx.session_factory() as session:
            rows = session.execute(select(PrefixVersion)).scalars().all()
        assert [(r.version, r.job_id) for r in rows] == [(1, job_id)]
        indexed = {key for r in rows for key in (r.blob_key, r.state_blob_key) if key}
        assert set(ctx.store.list("users/")) == indexed
        after = _job(ctx, job_id)
        assert (after.status, after.result, after.finished_at) == ("succeeded", finished.result, finished.finished_at)


def test_a_lease_is_renewed_while_the_attempt_runs(tmp_path):
    with _client(tmp_path) as client:
        ctx = client.app.state.ctx
        job_id = onboard(client, "fay")["job"]["id"]
        token = claim(ctx, job_id)
        _set(ctx, job_id, heartbeat_at=utcnow() - timedelta(seconds=30))
        with JobLease(ctx.session_factory, job_id, token, lease_s=0.4):
            deadline = utcnow() + timedelta(seconds=10)
            while _job(ctx, job_id).heartbeat_at < utcnow() - timedelta(seconds=5):
                assert utcnow() < deadline, "the lease was never renewed"
        assert _job(ctx, job_id).lease_token == token


def test_the_sweep_dispatches_each_lost_job_once_and_leaves_the_others(tmp_path):
    with _client(tmp_path) as client:
        ctx = client.app.state.ctx
        now = utcnow()
        long_ago = now - timedelta(hours=1)
        ids = {name: onboard(client, name)["job"]["id"] for name in ("dead", "alive", "lost", "waiting", "done")}
        _set(ctx, ids["dead"], status="running", lease_token="t1", heartbeat_at=now - timedelta(seconds=LEASE_S + 5))
        _set(ctx, ids["alive"], status="running", lease_token="t2", heartbeat_at=now - timedelta(seconds=5))
        _set(ctx, ids["lost"], dispatched_at=long_ago)  # queued, handed to a broker that forgot it
        _set(ctx, ids["waiting"], dispatched_at=now - timedelta(seconds=10))
        _set(ctx, ids["done"], status="succeeded", heartbeat_at=long_ago, dispatched_at=long_ago)

        dispatched: list[str] = []
        sweep = {"lease_s": LEASE_S, "redispatch_after_s": 600, "now": now}
        assert sorted(recover_lost_jobs(ctx.session_factory, dispatched.append, **sweep)) == sorted(
            [ids["dead"], ids["lost"]]
        )
        # A second sweeper at the same moment (another API process) finds nothing left to take.
        assert recover_lost_jobs(ctx.session_factory, dispatched.append, **sweep) == []
        assert sorted(dispatched) == sorted([ids["dead"], ids["lost"]])

        dead = _job(ctx, ids["dead"])
        assert (dead.status, dead.lease_token) == ("queued", None)
        assert _job(ctx, ids["alive"]).lease_token == "t2" and _job(ctx, ids["alive"]).status == "running"
        assert _job(ctx, ids["done"]).status == "succeeded"
        with ctx.session_factory() as session:
            messages = session.execute(select(JobEvent.message).where(JobEvent.job_id == ids["dead"])).scalars().all()
        assert messages.count("Job dispatched again: its worker stopped renewing the lease") == 1
        # The old holder of the dead job cannot renew: it was told to stop.
        assert JobLease(ctx.session_factory, ids["dead"], "t1", LEASE_S).renew() is False
        assert run_training_job(ids["dead"], ctx) == "succeeded"


def test_a_sweep_whose_dispatch_fails_retries_on_the_next_sweep(tmp_path):
    with _client(tmp_path) as client:
        ctx = client.app.state.ctx
        job_id = onboard(client, "gil")["job"]["id"]
        _set(ctx, job_id, dispatched_at=utcnow() - timedelta(hours=1))

        def broker_down(_job_id: str) -> None:
            raise ConnectionError("broker down")

        assert recover_lost_jobs(ctx.session_factory, broker_down, lease_s=LEASE_S, redispatch_after_s=600) == []
        assert _job(ctx, job_id).status == "queued"
        dispatched: list[str] = []
        assert recover_lost_jobs(ctx.session_factory, dispatched.append, lease_s=LEASE_S, redispatch_after_s=600) == [
            job_id
        ]
        assert dispatched == [job_id]


class _HourSlowClock(datetime):
    """`datetime` as seen on a host whose clock is an hour behind."""

    @classmethod
    def now(cls, tz=None):
        return datetime.now(tz) - timedelta(hours=1)


def test_on_postgres_lease_times_come_from_the_database_clock_not_the_hosts(
    tmp_path, fresh_postgres_database, monkeypatch
):
    """A worker whose clock is an hour slow claims a job; an API host with a correct clock then
    sweeps. Written with the worker's clock, the heartbeat would look an hour old and the live job
    would be taken away; written with the database's, it is fresh."""
    upgrade_to_head(fresh_postgres_database)
    settings = make_settings(tmp_path, database_url=fresh_postgres_database, job_lease_s=LEASE_S)
    with api_client(settings, base=tiny_base_model(), dispatcher=RecordingDispatcher()) as client:
        ctx = client.app.state.ctx
        job_id = onboard(client, "slow-clock")["job"]["id"]
        with monkeypatch.context() as worker_host:
            worker_host.setattr(core.db.models, "datetime", _HourSlowClock)  # what utcnow() reads
            worker_host.setattr(core.db.session, "datetime", _HourSlowClock)
            assert utcnow() < datetime.now(UTC) - timedelta(minutes=59)  # the skew is in place
            token = claim(ctx, job_id)
            assert token is not None
            assert JobLease(ctx.session_factory, job_id, token, LEASE_S).renew()
        with ctx.session_factory() as session:
            database_clock = database_now(session)
        assert abs(_job(ctx, job_id).heartbeat_at - database_clock) < timedelta(seconds=30)
        dispatched: list[str] = []
        assert recover_lost_jobs(ctx.session_factory, dispatched.append, lease_s=LEASE_S, redispatch_after_s=900) == []
        job = _job(ctx, job_id)
        assert (job.status, job.lease_token, dispatched) == ("running", token, [])
