"""Training through the API in embedded mode (tiny model): jobs succeed, prefixes are stored
verified, retries never duplicate a version, and erasing a user leaves nothing behind."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import func, select
from sqlalchemy.exc import StatementError

from core.db import Job, JobEvent, PrefixVersion, Sample, User
from core.service.model_ids import format_model_id, parse_model_id
from core.service.registry import PrefixArtifacts, active_prefix, publish_prefix
from core.service.training_job import TransientJobError, run_training_job
from core.storage import BlobStoreUnavailable, sha256_hex
from tests.support.api import (
    ADMIN,
    SAMPLES,
    RecordingDispatcher,
    api_client,
    make_settings,
    onboard,
    tiny_base_model,
    wait_for_job,
)


def test_model_ids_round_trip_and_reject_garbage():
    model = format_model_id("tiny-llama-random", "alice@example.com", 3)
    assert model == "ft:tiny-llama-random:alice@example.com:v3"
    ref = parse_model_id(model)
    assert (ref.base_model_id, ref.external_id, ref.version) == ("tiny-llama-random", "alice@example.com", 3)
    assert parse_model_id("ft:tiny-llama-random:alice").version is None
    for bad in ("tiny", "ft:x", "ft:x:a:3", "ft:x:a:v0", "ft::a:v1", "ft:x:a:b:v1"):
        assert parse_model_id(bad) is None


def test_onboarding_trains_publishes_and_erasure_removes_everything(tmp_path: Path):
    with api_client(make_settings(tmp_path), base=tiny_base_model()) as client:
        ctx = client.app.state.ctx
        body = onboard(client, "alice")
        user_id = body["user"]["id"]
        job = wait_for_job(client, body["job"]["id"])
        assert job["status"] == "succeeded", job
        assert job["hyperparameters"]["max_steps"] == 2 and job["hyperparameters"]["prefix_len"] == 2
        ref = parse_model_id(job["fine_tuned_model"])
        assert (ref.external_id, ref.version, ref.base_model_id) == ("alice", 1, "tiny-llama-random")

        events = client.get(f"/v1/fine_tuning/jobs/{job['id']}/events?limit=100", headers=ADMIN).json()["data"]
        losses = [e["data"]["train_loss"] for e in events if e["data"] and "train_loss" in e["data"]]
        assert losses and all(loss > 0 for loss in losses)

        with ctx.session_factory() as session:
            row = session.execute(select(PrefixVersion).where(PrefixVersion.user_id == user_id)).scalar_one()
            assert row.status == "active" and row.job_id == job["id"]
            data = ctx.store.get(row.blob_key, expected_sha256=row.sha256)
            assert sha256_hex(data) == row.sha256 and len(data) == row.bytes
        assert set(ctx.store.list(f"users/{user_id}/")) == {row.blob_key, row.state_blob_key}

        # Retraining warm-starts from v1 and makes v2 active; v1 stays for rollback.
        retrain = client.post("/v1/fine_tuning/jobs", headers=ADMIN, json={"user": user_id})
        assert wait_for_job(client, retrain.json()["id"])["fine_tuned_model"].endswith(":v2")
        versions = client.get(f"/v1/users/{user_id}/prefixes", headers=ADMIN).json()["data"]
        assert [(v["version"], v["status"]) for v in versions] == [(1, "retired"), (2, "active")]
        rolled = client.post(f"/v1/users/{user_id}/prefixes/1/activate", headers=ADMIN).json()
        assert rolled["status"] == "active"
        assert client.get(f"/v1/users/{user_id}", headers=ADMIN).json()["fine_tuned_model"].endswith(":v1")

        assert client.delete(f"/v1/users/{user_id}", headers=ADMIN).status_code == 200
        assert ctx.store.list("users/") == []
        with ctx.session_factory() as session:
            for model in (User, Sample, PrefixVersion, Job):
                assert session.execute(select(func.count()).select_from(model)).scalar_one() == 0
            assert session.execute(select(func.count()).select_from(JobEvent)).scalar_one() == 0


def test_a_job_may_ask_for_the_preservation_term(tmp_path: Path):
    with api_client(make_settings(tmp_path), base=tiny_base_model(), dispatcher=RecordingDispatcher()) as client:
        ctx = client.app.state.ctx
        default = onboard(client, "kept")["job"]["id"]
        off = onboard(client, "free", hyperparameters={"preservation_weight": 0})["job"]["id"]
        assert run_training_job(default, ctx) == run_training_job(off, ctx) == "succeeded"
        jobs = {job_id: client.get(f"/v1/fine_tuning/jobs/{job_id}", headers=ADMIN).json() for job_id in (default, off)}
        assert jobs[default]["hyperparameters"]["preservation_weight"] == 0.5  # the engine's default
        assert jobs[off]["hyperparameters"]["preservation_weight"] == 0.0
        metrics = {job_id: next(iter(job["result"]["users"].values()))["metrics"] for job_id, job in jobs.items()}
        assert metrics[default]["preservation_kl"] >= 0 and metrics[off]["preservation_kl"] is None


def test_run_training_job_is_idempotent_by_job_id(tmp_path: Path):
    with api_client(make_settings(tmp_path), base=tiny_base_model(), dispatcher=RecordingDispatcher()) as client:
        ctx = client.app.state.ctx
        job_id = onboard(client, "bob")["job"]["id"]
        assert run_training_job(job_id, ctx) == "succeeded"
        assert run_training_job(job_id, ctx) is None  # finished: nothing to do
        # A redelivered message for a job whose worker died after publishing (its lease long
        # expired): no duplicate.
        with ctx.session_factory.begin() as session:
            job = session.get(Job, job_id)
            job.status, job.lease_token, job.heartbeat_at = "running", "dead-attempt", None
        assert run_training_job(job_id, ctx) == "succeeded"
        with ctx.session_factory() as session:
            versions = session.execute(select(PrefixVersion.version)).scalars().all()
            job = session.get(Job, job_id)
        assert versions == [1] and job.attempts == 2 and job.fine_tuned_model.endswith(":v1")


def test_a_cancelled_job_never_trains(tmp_path: Path):
    with api_client(make_settings(tmp_path), base=tiny_base_model(), dispatcher=RecordingDispatcher()) as client:
        ctx = client.app.state.ctx
        job_id = onboard(client, "carol")["job"]["id"]
        with ctx.session_factory.begin() as session:
            session.get(Job, job_id).cancel_requested = True  # requested while it was running
            session.get(Job, job_id).status = "running"
        assert run_training_job(job_id, ctx) is None
        with ctx.session_factory() as session:
            assert session.get(Job, job_id).status == "cancelled"
            assert session.execute(select(func.count()).select_from(PrefixVersion)).scalar_one() == 0


def test_publish_removes_the_blob_when_the_index_row_cannot_be_committed(tmp_path: Path):
    with api_client(make_settings(tmp_path), dispatcher=RecordingDispatcher()) as client:
        ctx = client.app.state.ctx
        user_id = onboard(client, "dan")["user"]["id"]
        artifacts = PrefixArtifacts(
            prefix=b"prefix-bytes",
            state=b"state-bytes",
            base_model_id="m",
            base_fingerprint="f",
            prefix_len=2,
            metrics={"not json": object()},  # the INSERT fails to serialize this
        )
        with pytest.raises(StatementError):  # object() is not JSON: the INSERT fails
            publish_prefix(ctx.session_factory, ctx.store, user_id, artifacts, job_id=None)
        assert ctx.store.list("users/") == []
        with ctx.session_factory() as session:
            assert session.execute(select(func.count()).select_from(PrefixVersion)).scalar_one() == 0


def test_admin_retrain_batches_users_into_multi_user_jobs(tmp_path: Path):
    with api_client(make_settings(tmp_path), base=tiny_base_model(), dispatcher=RecordingDispatcher()) as client:
        ctx = client.app.state.ctx
        users = [onboard(client, name)["user"]["id"] for name in ("u1", "u2", "u3")]
        response = client.post("/v1/admin/retrain", headers=ADMIN, json={"all": True, "users_per_job": 2})
        assert response.status_code == 201
        jobs = response.json()["data"]
        assert [len(j["user_ids"]) for j in jobs] == [2, 1] and all(j["kind"] == "admin-batch" for j in jobs)
        assert run_training_job(jobs[0]["id"], ctx) == "succeeded"
        done = client.get(f"/v1/fine_tuning/jobs/{jobs[0]['id']}", headers=ADMIN).json()
        assert set(done["result"]["users"]) == set(users[:2]) and done["fine_tuned_model"] is None
        # Only users whose prefix was trained on another base model: none yet.
        other = client.post("/v1/admin/retrain", headers=ADMIN, json={"other_base_model": True})
        assert other.status_code == 201 and other.json()["data"] == []
        with ctx.session_factory.begin() as session:
            session.execute(PrefixVersion.__table__.update().values(base_fingerprint="old-model"))
        other = client.post("/v1/admin/retrain", headers=ADMIN, json={"other_base_model": True})
        assert [sorted(j["user_ids"]) for j in other.json()["data"]] == [sorted(users[:2])]


def test_health_readiness_and_metrics(tmp_path: Path):
    with api_client(make_settings(tmp_path), dispatcher=RecordingDispatcher()) as client:
        assert client.get("/healthz").json() == {"status": "ok"}
        ready = client.get("/readyz")
        assert ready.status_code == 200 and ready.json()["checks"] == {"database": "ok", "store": "ok"}
        onboard(client, "eve", samples=SAMPLES[:2])
        metrics = client.get("/metrics").text
        assert 'steer_jobs{status="queued"} 1.0' in metrics and "steer_queue_depth 1.0" in metrics
        assert "steer_training_step_seconds_bucket" in metrics
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    broken = make_settings(tmp_path / "b", data_dir=blocker / "steer", database_url=f"sqlite:///{tmp_path / 'b.db'}")
    with api_client(broken, dispatcher=RecordingDispatcher()) as client:
        ready = client.get("/readyz")
        assert ready.status_code == 503 and ready.json()["checks"]["store"].startswith("unavailable")


def test_auto_prefix_len_searches_the_configured_candidates(tmp_path: Path):
    settings = make_settings(tmp_path, train_prefix_len_default=None, train_prefix_len_candidates=(2, 3))
    with api_client(settings, base=tiny_base_model(), dispatcher=RecordingDispatcher()) as client:
        ctx = client.app.state.ctx
        searched = onboard(client, "sam")
        fixed = client.post(
            "/v1/fine_tuning/jobs",
            headers=ADMIN,
            json={"user": searched["user"]["id"], "hyperparameters": {"prefix_len": 3}},
        ).json()
        assert run_training_job(searched["job"]["id"], ctx) == "succeeded"
        assert run_training_job(fixed["id"], ctx) == "succeeded"
        with ctx.session_factory() as session:
            auto, explicit = session.execute(select(PrefixVersion).order_by(PrefixVersion.version)).scalars().all()
        assert set(auto.metrics["prefix_len_search"]) == {"2", "3"}
        assert auto.prefix_len == int(min(auto.metrics["prefix_len_search"], key=auto.metrics["prefix_len_search"].get))
        assert explicit.prefix_len == 3 and "prefix_len_search" not in explicit.metrics


def _events(ctx, job_id: str) -> list[tuple[str, str]]:
    with ctx.session_factory() as session:
        rows = session.execute(select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.id)).scalars()
        return [(row.level, row.message) for row in rows]


def test_a_retrained_version_worse_than_the_active_one_is_a_candidate_until_an_admin_activates_it(tmp_path: Path):
    with api_client(make_settings(tmp_path), base=tiny_base_model(), dispatcher=RecordingDispatcher()) as client:
        ctx = client.app.state.ctx
        # Near-repeated lines: even the tiny random model learns them (v1's validation loss drops).
        lines = [f"The same words, again and again, line {i}." for i in range(12)]
        body = onboard(client, "vera", samples=lines, hyperparameters={"max_steps": 30, "learning_rate": 0.05})
        user_id = body["user"]["id"]
        assert run_training_job(body["job"]["id"], ctx) == "succeeded"  # the first version: activated
        # A cold start (another prefix shape: no warm start) that barely trains: worse than v1.
        retrain = client.post(
            "/v1/fine_tuning/jobs",
            headers=ADMIN,
            json={"user": user_id, "hyperparameters": {"prefix_len": 3, "max_steps": 1, "learning_rate": 1e-6}},
        ).json()
        assert run_training_job(retrain["id"], ctx) == "succeeded"
        job = client.get(f"/v1/fine_tuning/jobs/{retrain['id']}", headers=ADMIN).json()
        entry = job["result"]["users"][user_id]
        assert entry["status"] == "candidate" and entry["version"] == 2 and "worse" in entry["reason"], entry
        metrics = entry["metrics"]
        # Both losses on the same validation rows, recorded with the version.
        assert metrics["compared_with_version"] == 1 and metrics["val_loss"] > metrics["active_val_loss"], metrics
        levels = dict((message, level) for level, message in _events(ctx, retrain["id"]))
        candidate_event = next(m for m in levels if "as a candidate, not activated" in m)
        assert levels[candidate_event] == "warning"
        assert any("kept as candidates" in m for m in levels)
        versions = client.get(f"/v1/users/{user_id}/prefixes", headers=ADMIN).json()["data"]
        assert [(v["version"], v["status"]) for v in versions] == [(1, "active"), (2, "candidate")]
        assert client.get(f"/v1/users/{user_id}", headers=ADMIN).json()["fine_tuned_model"].endswith(":v1")
        with ctx.session_factory() as session:
            first = session.execute(select(PrefixVersion).where(PrefixVersion.version == 1)).scalar_one()
        assert first.metrics["compared_with_version"] is None and first.metrics["active_val_loss"] is None

        # An admin may still choose the candidate.
        chosen = client.post(f"/v1/users/{user_id}/prefixes/2/activate", headers=ADMIN)
        assert chosen.status_code == 200 and chosen.json()["status"] == "active"
        versions = client.get(f"/v1/users/{user_id}/prefixes", headers=ADMIN).json()["data"]
        assert [(v["version"], v["status"]) for v in versions] == [(1, "retired"), (2, "active")]


class _ActiveVersionUnreadable:
    """The store during an outage that hits the reads of the active version and is over before the
    job publishes (S3 down for 20 s): those reads fail as unreachable, everything else works."""

    def __init__(self, store, keys: set[str]) -> None:
        self.store, self.keys = store, keys

    def get(self, key: str, expected_sha256: str | None = None) -> bytes:
        if key in self.keys:
            raise BlobStoreUnavailable("the store is unreachable")
        return self.store.get(key, expected_sha256=expected_sha256)

    def __getattr__(self, name: str):
        return getattr(self.store, name)


def test_a_store_outage_while_reading_the_active_version_retries_the_job_instead_of_a_cold_start(tmp_path: Path):
    with api_client(make_settings(tmp_path), base=tiny_base_model(), dispatcher=RecordingDispatcher()) as client:
        ctx = client.app.state.ctx
        body = onboard(client, "wes")
        user_id = body["user"]["id"]
        assert run_training_job(body["job"]["id"], ctx) == "succeeded"
        with ctx.session_factory() as session:
            v1 = active_prefix(session, user_id)
        retrain = client.post("/v1/fine_tuning/jobs", headers=ADMIN, json={"user": user_id}).json()
        store = ctx.store
        ctx.store = _ActiveVersionUnreadable(store, {v1.blob_key, v1.state_blob_key})
        try:
            with pytest.raises(TransientJobError):
                run_training_job(retrain["id"], ctx, final_attempt=False)
        finally:
            ctx.store = store
        with ctx.session_factory() as session:
            assert session.get(Job, retrain["id"]).status == "queued"  # back in the queue, for a retry
            assert [v.version for v in session.execute(select(PrefixVersion)).scalars()] == [1]
        assert not any("starting fresh" in message for _, message in _events(ctx, retrain["id"]))

        # The store is back: the retry warm-starts from v1 and publishes v2.
        assert run_training_job(retrain["id"], ctx) == "succeeded"
        messages = [message for _, message in _events(ctx, retrain["id"])]
        assert not any("starting fresh" in m for m in messages)
        assert any(m.startswith("Published and activated") for m in messages)

        # A corrupt training state (not an outage) still falls back to a fresh start, with a warning.
        with ctx.session_factory() as session:
            v2 = active_prefix(session, user_id)
        state_path = ctx.store.root_dir / v2.state_blob_key
        data = bytearray(state_path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        state_path.write_bytes(bytes(data))
        again = client.post("/v1/fine_tuning/jobs", headers=ADMIN, json={"user": user_id}).json()
        assert run_training_job(again["id"], ctx) == "succeeded"
        assert any(
            level == "warning" and "cannot warm-start from v2" in message and "starting fresh" in message
            for level, message in _events(ctx, again["id"])
        )
