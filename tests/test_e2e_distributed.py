"""End to end on real parts: Postgres, Redis + a real Celery worker process, SeaweedFS S3.

Onboarding over HTTP -> the worker trains (tiny model) -> prefix in S3 and in the index with a
matching sha256 -> loss values in the job events -> erasing the user removes samples, blobs
and rows, checked directly in the store and the database.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import func, select

from core.db import ApiKey, Job, PrefixVersion, Sample, User
from core.db.migrate import upgrade_to_head
from core.storage import sha256_hex
from tests.support.api import ADMIN, SAMPLES, api_client
from tests.support.processes import distributed_env as distributed_env_for
from tests.support.processes import end, settings_from_env, spawn_train_worker

pytestmark = pytest.mark.integration
JOB_TIMEOUT_S = 240


@pytest.fixture
def distributed_env(fresh_postgres_database: str, redis_url: str, s3_server) -> dict[str, str]:
    # Its own database, as it has its own bucket: controls train beside the users of the database,
    # and other tests' users have their blobs in other buckets.
    upgrade_to_head(fresh_postgres_database)
    return distributed_env_for(
        fresh_postgres_database,
        redis_url,
        s3_server,
        "e2e",
        STEER_TRAIN_MAX_STEPS_DEFAULT="3",
        STEER_TRAIN_BATCH_SIZE_DEFAULT="2",
        STEER_TRAIN_PREFIX_LEN_DEFAULT="2",
        STEER_TRAIN_MAX_SEQ_LEN="64",
        STEER_CONTROL_COMPANIONS="8",  # exercise recipe (b): users' prefixes read from S3
    )


@pytest.fixture
def celery_worker(distributed_env: dict[str, str], tmp_path: Path) -> Iterator[Path]:
    """A real `celery worker` process on queue `train`; yields the path of its log."""
    log_path = tmp_path / "worker.log"
    process = spawn_train_worker(distributed_env, log_path)
    try:
        yield log_path
    finally:
        end(process)


def _wait_for_job(client, job_id: str, worker_log: Path) -> dict:
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while time.monotonic() < deadline:
        job = client.get(f"/v1/fine_tuning/jobs/{job_id}", headers=ADMIN).json()
        if job["status"] in ("succeeded", "failed", "cancelled"):
            return job
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} still {job['status']}; worker log:\n{worker_log.read_text()[-4000:]}")


def _events(client, job_id: str) -> list[str]:
    events = client.get(f"/v1/fine_tuning/jobs/{job_id}/events?limit=100", headers=ADMIN).json()["data"]
    return [e["message"] for e in events]


def minio_keys(minio, bucket: str, prefix: str) -> list[str]:
    return [o.object_name for o in minio.list_objects(bucket, prefix=prefix, recursive=True)]


def test_onboarding_to_erasure_on_real_services(distributed_env, celery_worker, s3_server, tmp_path):
    settings = settings_from_env(distributed_env)
    assert settings.mode == "distributed" and settings.effective_blob_store == "s3"
    bucket = settings.s3_bucket
    with api_client(settings) as client:
        ready = client.get("/readyz")
        assert ready.status_code == 200, ready.text
        assert ready.json()["checks"] == {"database": "ok", "broker": "ok", "store": "ok"}

        body = client.post("/v1/onboarding", headers=ADMIN, json={"external_id": "ada", "samples": SAMPLES})
        assert body.status_code == 201, body.text
        user_id, job_id = body.json()["user"]["id"], body.json()["job"]["id"]

        job = _wait_for_job(client, job_id, celery_worker)
        assert job["status"] == "succeeded", (job, celery_worker.read_text()[-4000:])
        assert job["fine_tuned_model"] == "ft:tiny-llama-random:ada:v1"

        events = client.get(f"/v1/fine_tuning/jobs/{job_id}/events?limit=100", headers=ADMIN).json()["data"]
        losses = [e["data"]["train_loss"] for e in events if e["data"] and "train_loss" in e["data"]]
        assert losses and all(loss > 0 for loss in losses)

        ctx = client.app.state.ctx
        with ctx.session_factory() as session:
            row = session.execute(select(PrefixVersion).where(PrefixVersion.user_id == user_id)).scalar_one()
            assert (row.version, row.status, row.job_id) == (1, "active", job_id)
        # Straight from the S3 server, not through Steer's store: the bytes match the index.
        minio = s3_server.minio_client()
        response = minio.get_object(bucket, row.blob_key)
        try:
            data = response.read()
        finally:
            response.close()
            response.release_conn()
        assert sha256_hex(data) == row.sha256 and len(data) == row.bytes
        stored = sorted(o.object_name for o in minio.list_objects(bucket, prefix=f"users/{user_id}/", recursive=True))
        assert stored == sorted([row.blob_key, row.state_blob_key])

        # A control trains on the Celery worker beside users' prefixes read from S3, like a user's.
        name = f"terse-{uuid.uuid4().hex[:8]}"
        control = client.post("/v1/controls", headers=ADMIN, json={"name": name, "samples": ["Short.", "Done."]})
        assert control.status_code == 201, control.text
        control_job = _wait_for_job(client, control.json()["job"]["id"], celery_worker)
        why = (control_job.get("error"), _events(client, control_job["id"]), celery_worker.read_text()[-6000:])
        assert control_job["status"] == "succeeded", why
        assert control_job["fine_tuned_model"] == f"control:{name}:v1"
        events = client.get(f"/v1/fine_tuning/jobs/{control_job['id']}/events?limit=100", headers=ADMIN).json()
        beside = [e["message"] for e in events["data"] if e["message"].startswith("Training the control beside")]
        assert beside and not beside[0].startswith("Training the control beside 0 "), beside
        control_id = control.json()["control"]["id"]
        assert minio_keys(minio, bucket, f"users/{control_id}/")
        assert client.delete(f"/v1/controls/{name}", headers=ADMIN).status_code == 200
        assert minio_keys(minio, bucket, f"users/{control_id}/") == []

        erased = client.delete(f"/v1/users/{user_id}", headers=ADMIN)
        assert erased.status_code == 200 and erased.json()["deleted"] is True
        assert list(minio.list_objects(bucket, prefix=f"users/{user_id}/", recursive=True)) == []
        with ctx.session_factory() as session:
            # Scoped to this user: other tests of the session share the database.
            assert session.get(User, user_id) is None
            for model in (ApiKey, Sample, PrefixVersion):
                count = session.execute(select(func.count()).select_from(model).where(model.user_id == user_id))
                assert count.scalar_one() == 0, model.__name__
            assert session.get(Job, job_id) is None
        assert client.get(f"/v1/users/{user_id}", headers=ADMIN).status_code == 404
