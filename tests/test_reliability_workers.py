"""Worker faults: training and inference workers killed with SIGKILL at the worst moments.

Training: a real Celery worker (prefork, three pool children) trains jobs on a private Redis, a private
Postgres and SeaweedFS S3. A test-only hook (`core/service/crash_points.py`) SIGKILLs the pool
child at a named point of a chosen job: before the first step, mid-training, or after the blob
upload but before the index commit. Celery forks a fresh child and the broker redelivers the job
(`acks_late` + `reject_on_worker_lost`). Afterwards the index and the store are checked directly.

Lost hosts and lost messages: the whole worker (parent and children) is killed mid-training, so
nothing hands the job back to the broker; and the broker restarts empty with a job queued. In both
the API's lost-job sweep (`core/service/job_lease.py`) dispatches the job again once its lease
expired or its message went silent, and a fresh worker finishes it.

Inference: two `workers.infer` processes share the request stream; the one serving a stream is
killed and the client (the official openai client) gets a clean error from the survivor, which
reclaimed the request with XAUTOCLAIM, within its deadline; the next request completes.
"""

from __future__ import annotations

import random
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
import redis
from sqlalchemy import select

from core.db import Job, PrefixVersion
from core.db.migrate import upgrade_to_head
from core.inference.redis_transport import GROUP, REQUESTS_STREAM
from core.service.context import build_context
from core.service.registry import active_prefix
from tests.support.api import ADMIN, SAMPLES, api_client, tiny_base_model
from tests.support.inference import ServerThread, build_app, create_user, publish_random_prefix
from tests.support.processes import distributed_env, end, settings_from_env, spawn, spawn_train_worker
from tests.support.seaweed import flip_a_byte
from tests.support.services import PrivatePostgres, PrivateRedis

pytestmark = pytest.mark.integration
CRASH_POINTS = ("before_first_step", "mid_training", "after_upload")
TRIALS_PER_POINT = 7  # one-shot kills: the redelivered attempt must succeed
ALWAYS_CRASHING = 1  # jobs whose every attempt is killed after the upload: must fail cleanly
JOBS_TIMEOUT_S = 360  # 22 jobs and 24+ kills take ~2 min on 2 idle cores; a stuck job never ends at all
INFER_TIMEOUT_S = 15


LEASE_S = 5  # a worker silent this long is taken for dead (production: 60 s)
RECOVERY_TIMEOUT_S = 90


@pytest.fixture(scope="module")
def private_redis() -> Iterator[PrivateRedis]:
    rd = PrivateRedis()
    try:
        rd.start()
        yield rd
    finally:
        rd.close()


@pytest.fixture(scope="module")
def private_services(s3_server, private_redis) -> Iterator[dict[str, str]]:
    pg, rd = PrivatePostgres(), private_redis
    try:
        pg.start()
        upgrade_to_head(pg.url)
        yield distributed_env(
            pg.url,
            rd.url,
            s3_server,
            "faults",
            STEER_TRAIN_MAX_STEPS_DEFAULT="2",
            STEER_TRAIN_BATCH_SIZE_DEFAULT="2",
            STEER_TRAIN_PREFIX_LEN_DEFAULT="2",
            STEER_TRAIN_MAX_SEQ_LEN="64",
            STEER_REQUEST_TIMEOUT_S=str(INFER_TIMEOUT_S),
            STEER_INFER_CLAIM_IDLE_S="1",
            STEER_JOB_LEASE_S=str(LEASE_S),
            STEER_JOB_SWEEP_INTERVAL_S="1",
        )
    finally:
        pg.close()


def test_training_worker_killed_at_any_point_loses_no_job_and_leaves_no_orphan(private_services, s3_server, tmp_path):
    crash_dir = tmp_path / "crashes"
    crash_dir.mkdir()
    plan = [p for p in CRASH_POINTS for _ in range(TRIALS_PER_POINT)] + ["after_upload!"] * ALWAYS_CRASHING
    random.Random(6).shuffle(plan)
    settings = settings_from_env(private_services)
    with api_client(settings) as client:
        jobs: dict[str, str] = {}  # job id -> crash plan
        for index, point in enumerate(plan):
            # Users 0-3 are onboarded twice: their second job publishes version 2.
            external_id = f"crash-{index % (len(plan) - 4)}"
            body = client.post("/v1/onboarding", headers=ADMIN, json={"external_id": external_id, "samples": SAMPLES})
            assert body.status_code == 201, body.text
            jobs[body.json()["job"]["id"]] = point
            (crash_dir / body.json()["job"]["id"]).write_text(point)
        # The worker starts only now, so every plan is in place before its job can run.
        log_path = tmp_path / "worker.log"
        worker = spawn_train_worker(
            {**private_services, "STEER_TEST_CRASH_DIR": str(crash_dir)}, log_path, concurrency=3
        )
        started = time.monotonic()
        try:
            final = _wait_until_finished(client, list(jobs), log_path)
        finally:
            end(worker)
        elapsed = time.monotonic() - started
        ctx = client.app.state.ctx
        with ctx.session_factory() as session:
            rows = list(session.execute(select(PrefixVersion)).scalars())
            attempts = {job.id: job.attempts for job in session.execute(select(Job)).scalars()}

    # 1. Every job ended: one-shot kills succeeded after redelivery, always-killed ones failed clearly.
    for job_id, point in jobs.items():
        job = final[job_id]
        if point.endswith("!"):
            assert job["status"] == "failed", job
            assert "gave up after 3 attempts" in job["error"]["message"], job
        else:
            assert job["status"] == "succeeded", (point, job)
            assert attempts[job_id] == 2, (point, attempts[job_id])
            assert not (crash_dir / job_id).exists(), f"the {point} crash of {job_id} never happened"
    # 2. No duplicate versions: one row per succeeded job, consecutive versions per user.
    by_job = Counter(row.job_id for row in rows)
    succeeded = {j for j, job in final.items() if job["status"] == "succeeded"}
    assert set(by_job) == succeeded and set(by_job.values()) == {1}
    for user_id in {row.user_id for row in rows}:
        versions = sorted(row.version for row in rows if row.user_id == user_id)
        assert versions == list(range(1, len(versions) + 1)), versions
    # 3. Store == index: no orphan blob, no row pointing at a missing blob.
    indexed = {key for row in rows for key in (row.blob_key, row.state_blob_key) if key}
    stored = set(ctx.store.list("users/"))
    assert stored == indexed, {"orphans": sorted(stored - indexed), "missing": sorted(indexed - stored)}
    kills = log_path.read_text().count("test crash hook: killing")
    print(
        f"\n{len(jobs)} jobs, {kills} worker kills: {len(succeeded)} succeeded after redelivery, "
        f"{len(jobs) - len(succeeded)} failed cleanly, 0 stuck, 0 orphans, 0 missing blobs ({elapsed:.0f} s)"
    )
    assert kills >= TRIALS_PER_POINT * len(CRASH_POINTS) + ALWAYS_CRASHING * 3


def _wait_until_finished(
    client, job_ids: list[str], log_path: Path, timeout_s: float = JOBS_TIMEOUT_S
) -> dict[str, dict]:
    deadline = time.monotonic() + timeout_s
    final: dict[str, dict] = {}
    while time.monotonic() < deadline and len(final) < len(job_ids):
        for job_id in job_ids:
            if job_id not in final:
                job = client.get(f"/v1/fine_tuning/jobs/{job_id}", headers=ADMIN).json()
                if job["status"] in ("succeeded", "failed", "cancelled"):
                    final[job_id] = job
        time.sleep(0.5)
    stuck = sorted(set(job_ids) - set(final))
    assert not stuck, f"{len(stuck)} jobs never finished; worker log:\n{log_path.read_text()[-5000:]}"
    return final


def _train_worker(env: dict[str, str], log_path: Path, crash_dir: Path | None = None) -> subprocess.Popen:
    extra = {"STEER_TEST_CRASH_DIR": str(crash_dir)} if crash_dir else {}
    return spawn_train_worker({**env, **extra}, log_path)


def _assert_store_matches_index(ctx) -> list[PrefixVersion]:
    with ctx.session_factory() as session:
        rows = list(session.execute(select(PrefixVersion)).scalars())
    indexed = {key for row in rows for key in (row.blob_key, row.state_blob_key) if key}
    stored = set(ctx.store.list("users/"))
    assert stored == indexed, {"orphans": sorted(stored - indexed), "missing": sorted(indexed - stored)}
    return rows


def test_a_job_whose_whole_worker_host_died_is_run_again_after_its_lease_expires(private_services, tmp_path):
    crash_dir = tmp_path / "crashes"
    crash_dir.mkdir()
    with api_client(settings_from_env(private_services)) as client:
        body = client.post("/v1/onboarding", headers=ADMIN, json={"external_id": "host-loss", "samples": SAMPLES})
        assert body.status_code == 201, body.text
        job_id = body.json()["job"]["id"]
        (crash_dir / job_id).write_text("mid_training@host")
        first = _train_worker(private_services, tmp_path / "worker1.log", crash_dir)
        try:
            first.wait(JOBS_TIMEOUT_S)  # the hook kills the worker's whole process group
        finally:
            end(first)
        killed_at = time.monotonic()
        assert not (crash_dir / job_id).exists(), (tmp_path / "worker1.log").read_text()[-3000:]
        job = client.get(f"/v1/fine_tuning/jobs/{job_id}", headers=ADMIN).json()
        assert job["status"] in ("running", "queued"), job  # nobody told the broker anything

        second = _train_worker(private_services, tmp_path / "worker2.log")
        try:
            final = _wait_until_finished(client, [job_id], tmp_path / "worker2.log", RECOVERY_TIMEOUT_S)[job_id]
        finally:
            end(second)
        recovered_after = time.monotonic() - killed_at
        assert final["status"] == "succeeded", final
        ctx = client.app.state.ctx
        with ctx.session_factory() as session:
            assert session.get(Job, job_id).attempts == 2
        rows = [row for row in _assert_store_matches_index(ctx) if row.job_id == job_id]
        assert [row.version for row in rows] == [1]
        events = client.get(f"/v1/fine_tuning/jobs/{job_id}/events?limit=100", headers=ADMIN).json()["data"]
        assert any("stopped renewing the lease" in e["message"] for e in events)
        print(f"\nworker host killed mid-training: job succeeded {recovered_after:.1f} s later (lease {LEASE_S} s)")


def _production_lease_env(env: dict[str, str]) -> dict[str, str]:
    """`env` with the lease and sweep settings left at their production defaults."""
    return {k: v for k, v in env.items() if k not in ("STEER_JOB_LEASE_S", "STEER_JOB_SWEEP_INTERVAL_S")}


def _wait_for_kill(crash_dir: Path, job_id: str, log_path: Path) -> float:
    """When the crash hook fired: it deletes the plan file just before the SIGKILL."""
    deadline = time.monotonic() + JOBS_TIMEOUT_S
    while (crash_dir / job_id).exists():
        assert time.monotonic() < deadline, log_path.read_text()[-3000:]
        time.sleep(0.05)
    return time.monotonic()


def test_a_killed_pool_child_is_taken_over_at_once_with_the_production_lease(private_services, tmp_path):
    """Only the busy pool child dies (its host lives): Celery redelivers the task at once, and the
    new attempt sees that the lease holder's process is gone and takes the job over, instead of
    leaving it `running` until the 60 s lease expires and the 30 s sweep finds it."""
    env = _production_lease_env(private_services)
    settings = settings_from_env(env)
    assert (settings.job_lease_s, settings.job_sweep_interval_s) == (60, 30)  # production defaults
    crash_dir = tmp_path / "crashes"
    crash_dir.mkdir()
    with api_client(settings) as client:
        body = client.post("/v1/onboarding", headers=ADMIN, json={"external_id": "child-loss", "samples": SAMPLES})
        assert body.status_code == 201, body.text
        job_id = body.json()["job"]["id"]
        (crash_dir / job_id).write_text("mid_training")
        log_path = tmp_path / "worker.log"
        worker = _train_worker(env, log_path, crash_dir)
        try:
            killed_at = _wait_for_kill(crash_dir, job_id, log_path)
            final = _wait_until_finished(client, [job_id], log_path, RECOVERY_TIMEOUT_S)[job_id]
        finally:
            end(worker)
        recovered_after = time.monotonic() - killed_at
        assert final["status"] == "succeeded", final
        ctx = client.app.state.ctx
        with ctx.session_factory() as session:
            assert session.get(Job, job_id).attempts == 2
        assert [row.version for row in _assert_store_matches_index(ctx) if row.job_id == job_id] == [1]
        listed = client.get(f"/v1/fine_tuning/jobs/{job_id}/events?limit=100", headers=ADMIN).json()["data"]
        events = [e["message"] for e in listed]
        assert "Took the job over from the previous attempt: its process is gone" in events, events
        assert not any("stopped renewing the lease" in e for e in events)  # not the sweep's doing
        # A generous bound (the goal is 15 s, with the new pool child loading the model): well
        # before the lease could have expired.
        assert recovered_after < settings.job_lease_s, recovered_after
        print(f"\npool child killed mid-training: job succeeded {recovered_after:.1f} s later (lease 60 s, sweep 30 s)")


def test_a_whole_host_lost_with_the_production_lease_is_recovered_within_lease_plus_sweep(private_services, tmp_path):
    """The figure for the operator: with production defaults a job whose whole worker host died
    (nothing redelivers it) is dispatched again within lease + sweep interval of the kill."""
    env = _production_lease_env(private_services)
    settings = settings_from_env(env)
    bound = settings.job_lease_s + settings.job_sweep_interval_s
    crash_dir = tmp_path / "crashes"
    crash_dir.mkdir()
    with api_client(settings) as client:
        body = client.post("/v1/onboarding", headers=ADMIN, json={"external_id": "host-loss-60", "samples": SAMPLES})
        job_id = body.json()["job"]["id"]
        (crash_dir / job_id).write_text("mid_training@host")
        first = _train_worker(env, tmp_path / "worker1.log", crash_dir)
        try:
            killed_at = _wait_for_kill(crash_dir, job_id, tmp_path / "worker1.log")
            first.wait(30)
        finally:
            end(first)
        second = _train_worker(env, tmp_path / "worker2.log")
        try:
            redispatched_after = None
            while redispatched_after is None and time.monotonic() - killed_at < bound + 30:
                events = client.get(f"/v1/fine_tuning/jobs/{job_id}/events?limit=100", headers=ADMIN).json()["data"]
                if any("stopped renewing the lease" in e["message"] for e in events):
                    redispatched_after = time.monotonic() - killed_at
                time.sleep(0.5)
            final = _wait_until_finished(client, [job_id], tmp_path / "worker2.log", RECOVERY_TIMEOUT_S)[job_id]
        finally:
            end(second)
        succeeded_after = time.monotonic() - killed_at
        assert final["status"] == "succeeded", final
        assert redispatched_after is not None and redispatched_after < bound, redispatched_after
        print(
            f"\nworker host killed mid-training: dispatched again {redispatched_after:.1f} s later, succeeded "
            f"{succeeded_after:.1f} s later (lease {settings.job_lease_s:g} s, "
            f"sweep {settings.job_sweep_interval_s:g} s)"
        )


def test_a_job_queued_in_a_broker_that_restarted_empty_is_dispatched_again(private_services, private_redis, tmp_path):
    env = {**private_services, "STEER_JOB_REDISPATCH_AFTER_S": "3"}
    with api_client(settings_from_env(env)) as client:
        body = client.post("/v1/onboarding", headers=ADMIN, json={"external_id": "broker-loss", "samples": SAMPLES})
        assert body.status_code == 201, body.text
        job_id = body.json()["job"]["id"]
        private_redis.stop()  # the queued message dies with the broker (it keeps nothing on disk)
        private_redis.start()
        assert redis.Redis.from_url(private_redis.url).llen("train") == 0
        worker = _train_worker(env, tmp_path / "worker.log")
        try:
            final = _wait_until_finished(client, [job_id], tmp_path / "worker.log", RECOVERY_TIMEOUT_S)[job_id]
        finally:
            end(worker)
        assert final["status"] == "succeeded", final
        ctx = client.app.state.ctx
        rows = [row for row in _assert_store_matches_index(ctx) if row.job_id == job_id]
        assert [row.version for row in rows] == [1]
        events = client.get(f"/v1/fine_tuning/jobs/{job_id}/events?limit=100", headers=ADMIN).json()["data"]
        assert any("never started" in e["message"] for e in events)


# -- inference --------------------------------------------------------------------------------------


def _serving_consumer(client: redis.Redis, deadline_s: float = 10) -> str:
    """The consumer (host-pid) holding the one pending request."""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        pending = client.xpending_range(REQUESTS_STREAM, GROUP, min="-", max="+", count=10)
        if pending:
            return pending[0]["consumer"].decode()
        time.sleep(0.05)
    raise AssertionError("no worker took the request")


def test_inference_worker_killed_mid_stream_another_worker_answers_within_the_deadline(
    private_services, s3_server, tmp_path
):
    settings = settings_from_env(private_services)
    ctx = build_context(settings, base_model=tiny_base_model())
    user = create_user(ctx, "stream-user")
    publish_random_prefix(ctx, ctx.base_model(), user, seed=3)
    workers = [spawn(["-m", "workers.infer"], private_services, tmp_path / f"infer{i}.log") for i in range(2)]
    try:
        with ServerThread(build_app(ctx)) as server:
            client = openai.OpenAI(base_url=server.base_url, api_key=user.key, max_retries=0, timeout=90)
            # Both workers up (first answers may wait for the model to load).
            for _ in range(4):
                client.completions.create(model="user:stream-user", prompt="Hi", max_tokens=2)
            stream = client.completions.create(
                model="user:stream-user", prompt="Tell me", max_tokens=2000, temperature=0, stream=True
            )
            started = time.time()
            chunks = iter(stream)
            next(chunks), next(chunks)
            consumer = _serving_consumer(redis.Redis.from_url(settings.redis_url))
            victim = next(w for w in workers if consumer.endswith(f"-{w.pid}"))
            victim.send_signal(signal.SIGKILL)
            victim.wait(10)
            with pytest.raises(openai.APIError) as info:
                for _ in chunks:
                    pass
            took = time.time() - started
            # The survivor reclaimed the request (claim idle 1 s) well before the deadline.
            assert "stopped" in info.value.message, info.value.message
            assert took < INFER_TIMEOUT_S, took
            survivor = next(w for w in workers if w is not victim)
            assert survivor.poll() is None
            again = client.completions.create(model="user:stream-user", prompt="Tell me", max_tokens=8, temperature=0)
            assert again.choices[0].text and again.choices[0].finish_reason == "length"
            # A worker that finds a tampered prefix reports it; the API quarantines it and the
            # alias is served from the previous version (the corruption tests cover the rest).
            publish_random_prefix(ctx, ctx.base_model(), user, seed=4)
            with ctx.session_factory() as session:
                tampered = active_prefix(session, user.user_id)
            flip_a_byte(s3_server.minio_client(), settings.s3_bucket, tampered.blob_key)
            fallback = client.completions.create(
                model="user:stream-user", prompt="Tell me", max_tokens=8, temperature=0
            )
            assert fallback.choices[0].text == again.choices[0].text
            print(
                f"\nworker killed mid-stream: clean error after {took:.1f} s (deadline {INFER_TIMEOUT_S} s); "
                "next request answered by the survivor"
            )
    finally:
        for worker in workers:
            end(worker)
        ctx.close()
