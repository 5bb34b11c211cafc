"""OpenAI's fine-tuning API, driven with the official `openai` client, unchanged, over HTTP.

Files (upload, list, retrieve, content, delete), `fine_tuning.jobs.create` from a training file
(a user key trains itself; the admin key names the user by `suffix`), checkpoints (the prefix
versions a job published), `models.retrieve` / `models.delete` (retire a version), the job list's
`status` filter, and an admin batch job that each of its users sees in their own list, narrowed to
their part. The same scenario runs embedded (in-process training) and distributed (Postgres,
Redis, a real Celery worker, S3).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from openai import OpenAI
from sqlalchemy import func, select

from api.app import create_app
from core.db.migrate import upgrade_to_head
from core.db.models import File
from core.service.context import build_context
from tests.support.api import (
    ADMIN,
    ADMIN_KEY,
    SAMPLES,
    RecordingDispatcher,
    api_client,
    bearer,
    make_settings,
    onboard,
    tiny_base_model,
)
from tests.support.inference import ServerThread
from tests.support.processes import distributed_env as distributed_env_for
from tests.support.processes import end, settings_from_env, spawn_train_worker

JOB_TIMEOUT_S = 240
SYSTEM = "You are Ann. Write as Ann writes."
ASKED = "Write me a note about the harbour."
WRITTEN = [
    "The harbour smelled of tar and oranges this morning; I stayed until the ferry left.",
    "Gulls argued over a crust while the fishermen pretended not to notice them at all.",
]
TRAINING_FILE = (
    "\n".join(
        [
            json.dumps(
                {
                    "messages": [
                        {"role": "system", "content": SYSTEM},
                        {"role": "user", "content": ASKED},
                        {"role": "assistant", "content": WRITTEN[0]},
                    ]
                }
            ),
            json.dumps({"text": WRITTEN[1]}),
        ]
    )
    + "\n"
).encode()


class Service:
    """A running Steer on a loopback port: the admin's HTTP client and `openai` clients per key."""

    def __init__(self, base_url: str, worker_log: Path | None = None) -> None:
        self.base_url, self.worker_log = base_url, worker_log
        self.http = httpx.Client(base_url=base_url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=60)

    def client(self, key: str = ADMIN_KEY) -> OpenAI:
        return OpenAI(base_url=self.base_url, api_key=key, max_retries=0)

    def onboard(self, external_id: str) -> tuple[str, str, str]:
        """(user id, key, onboarding job id)."""
        response = self.http.post("/onboarding", json={"external_id": external_id, "samples": SAMPLES})
        assert response.status_code == 201, response.text
        body = response.json()
        return body["user"]["id"], body["api_key"], body["job"]["id"]

    def wait(self, job_id: str) -> dict:
        deadline = time.monotonic() + JOB_TIMEOUT_S
        while time.monotonic() < deadline:
            job = self.http.get(f"/fine_tuning/jobs/{job_id}").json()
            if job["status"] in ("succeeded", "failed", "cancelled"):
                assert job["status"] == "succeeded", (job, self._log())
                return job
            time.sleep(0.3)
        raise AssertionError(f"job {job_id} did not finish; {self._log()}")

    def statuses(self, user_id: str, until=lambda found: True) -> dict[int, str]:
        """The user's prefix versions' statuses, once `until` holds (a write may land just after its answer)."""
        deadline = time.monotonic() + 10
        while True:
            rows = self.http.get(f"/users/{user_id}/prefixes").json()["data"]
            found = {row["version"]: row["status"] for row in rows}
            if until(found) or time.monotonic() > deadline:
                return found
            time.sleep(0.1)

    def _log(self) -> str:
        return self.worker_log.read_text()[-4000:] if self.worker_log else ""


def drive_every_call(service: Service) -> None:
    """The scenario, on whichever mode `service` runs (other tests may share its database)."""
    admin = service.client()
    base = admin.models.list().data[0].id
    tag = uuid.uuid4().hex[:6]
    ann_name, ben_name = f"ann-{tag}", f"ben-{tag}"
    ann_id, ann_key, ann_job = service.onboard(ann_name)
    ben_id, ben_key, ben_job = service.onboard(ben_name)
    service.wait(ann_job)
    service.wait(ben_job)
    ann, ben = service.client(ann_key), service.client(ben_key)

    # Files: uploaded and checked, listed, read back byte for byte; another user's are 404.
    uploaded = ann.files.create(file=("ann.jsonl", TRAINING_FILE), purpose="fine-tune")
    assert uploaded.id.startswith("file-") and uploaded.bytes == len(TRAINING_FILE)
    assert (uploaded.filename, uploaded.purpose, uploaded.status) == ("ann.jsonl", "fine-tune", "processed")
    assert [f.id for f in ann.files.list()] == [uploaded.id]
    assert ann.files.retrieve(uploaded.id).bytes == len(TRAINING_FILE)
    assert ann.files.content(uploaded.id).content == TRAINING_FILE
    with pytest.raises(openai.NotFoundError):
        ben.files.retrieve(uploaded.id)
    with pytest.raises(openai.NotFoundError):
        ben.files.content(uploaded.id)
    assert list(ben.files.list()) == []
    # A bad line is refused at upload, naming the file, and nothing is stored.
    bad = TRAINING_FILE + b'{"messages": [{"role": "user", "content": "no answer"}]}\n'
    with pytest.raises(openai.BadRequestError) as refused:
        ann.files.create(file=("bad.jsonl", bad), purpose="fine-tune")
    assert refused.value.body["param"] == "file" and "line 3" in refused.value.body["message"]
    with pytest.raises(openai.BadRequestError) as refused:
        ann.files.create(file=("ann.jsonl", TRAINING_FILE), purpose="assistants")
    assert refused.value.body["param"] == "purpose"
    assert [f.id for f in ann.files.list()] == [uploaded.id]

    # A user key trains itself from its file: the assistant turns join its samples, not the prompts.
    job = ann.fine_tuning.jobs.create(
        model=f"user:{ann_name}",
        training_file=uploaded.id,
        validation_file=uploaded.id,
        hyperparameters={"n_epochs": 1},
        seed=7,
    )
    assert job.status == "queued" and job.user == ann_id and job.to_dict()["hyperparameters"]["seed"] == 7
    done = service.wait(job.id)
    version_2 = f"ft:{base}:{ann_name}:v2"
    assert ann.fine_tuning.jobs.retrieve(job.id).fine_tuned_model == done["fine_tuned_model"] == version_2
    texts = [s["text"] for s in service.http.get(f"/users/{ann_id}/samples", params={"limit": 100}).json()["data"]]
    assert set(WRITTEN) <= set(texts) and SYSTEM not in texts and ASKED not in texts
    # Naming another user's file, or another user, is 404 for a user key; nothing is queued.
    with pytest.raises(openai.NotFoundError):
        ben.fine_tuning.jobs.create(model=base, training_file=uploaded.id)
    with pytest.raises(openai.NotFoundError):
        ben.fine_tuning.jobs.create(model=f"user:{ann_name}", training_file=uploaded.id)
    with pytest.raises(openai.BadRequestError) as refused:
        admin.fine_tuning.jobs.create(model=base, training_file=uploaded.id)
    assert refused.value.body["param"] == "user"

    # Checkpoints: the prefix versions the job published.
    (checkpoint,) = ann.fine_tuning.jobs.checkpoints.list(job.id).data
    assert checkpoint.fine_tuned_model_checkpoint == version_2 and checkpoint.fine_tuning_job_id == job.id
    assert checkpoint.step_number > 0 and checkpoint.metrics.step == checkpoint.step_number
    assert checkpoint.metrics.train_loss > 0
    with pytest.raises(openai.NotFoundError):
        ben.fine_tuning.jobs.checkpoints.list(job.id)

    # Models: retrieve what the key may use; another user's is 404 like an unknown one.
    assert ann.models.retrieve(f"ft:{base}:{ann_name}:v2").owned_by == ann_name
    assert ann.models.retrieve(f"user:{ann_name}").id == f"user:{ann_name}"
    assert ann.models.retrieve(base).id == base
    for model in (f"user:{ann_name}", f"ft:{base}:{ann_name}:v2", "no-such-model"):
        with pytest.raises(openai.NotFoundError):
            ben.models.retrieve(model)

    # The admin key trains the user named by `suffix`, from an admin upload no user sees.
    admin_file = admin.files.create(file=("ben.jsonl", TRAINING_FILE), purpose="fine-tune")
    with pytest.raises(openai.NotFoundError):
        ben.files.retrieve(admin_file.id)
    ben_retrain = admin.fine_tuning.jobs.create(model=base, training_file=admin_file.id, suffix=ben_name)
    assert ben_retrain.user == ben_id
    assert service.wait(ben_retrain.id)["fine_tuned_model"] == f"ft:{base}:{ben_name}:v2"

    # An admin batch job: per-user results; each user sees it in its list, only its own part.
    retrain = service.http.post("/admin/retrain", json={"user_ids": [ann_id, ben_id]})
    assert retrain.status_code == 201, retrain.text
    (batch_id,) = [j["id"] for j in retrain.json()["data"]]
    batch = service.wait(batch_id)
    assert set(batch["result"]["users"]) == {ann_id, ben_id}
    assert batch["result"]["users"][ben_id]["model"] == f"ft:{base}:{ben_name}:v3"
    mine = ann.fine_tuning.jobs.retrieve(batch_id)
    assert mine.fine_tuned_model == f"ft:{base}:{ann_name}:v3"
    assert mine.to_dict()["user_ids"] == [ann_id] and set(mine.to_dict()["result"]["users"]) == {ann_id}
    assert batch_id in [j.id for j in ann.fine_tuning.jobs.list()]
    assert batch_id in [j.id for j in ben.fine_tuning.jobs.list()]
    assert [c.fine_tuned_model_checkpoint for c in ann.fine_tuning.jobs.checkpoints.list(batch_id)] == [
        f"ft:{base}:{ann_name}:v3"
    ]
    events = ann.fine_tuning.jobs.list_events(batch_id, limit=100).data
    assert not any(ben_name in e.message or ben_id in e.message for e in events)

    # Job list filters: status and user (extra_query: the client has no parameter for them).
    succeeded = admin.fine_tuning.jobs.list(extra_query={"status": "succeeded", "user": ann_id}, limit=100).data
    assert {j.status for j in succeeded} == {"succeeded"} and batch_id in [j.id for j in succeeded]
    own = ann.fine_tuning.jobs.list(extra_query={"status": "succeeded"}, limit=100).data
    assert [j.id for j in own] == [j.id for j in succeeded]
    assert admin.fine_tuning.jobs.list(extra_query={"status": "queued", "user": ann_id}).data == []
    bens = admin.fine_tuning.jobs.list(extra_query={"user": ben_id}, limit=100).data
    assert {j.id for j in bens} == {ben_job, ben_retrain.id, batch_id}
    with pytest.raises(openai.BadRequestError) as refused:
        admin.fine_tuning.jobs.list(extra_query={"status": "done"})
    assert refused.value.body["param"] == "status"

    # models.delete retires a version: the previous one is active again, v3 stays for rollback.
    # (A job may publish a version as a candidate when it scores worse: make v3 the active one.)
    assert service.http.post(f"/users/{ann_id}/prefixes/3/activate").status_code == 200
    before = service.statuses(ann_id, until=lambda found: found[3] == "active")
    fallback = max(v for v, status in before.items() if status == "retired")
    with pytest.raises(openai.NotFoundError):
        ben.models.delete(f"ft:{base}:{ann_name}:v3")
    with pytest.raises(openai.BadRequestError):
        ann.models.delete(f"user:{ann_name}")
    deleted = ann.models.delete(f"ft:{base}:{ann_name}:v3")
    assert deleted.deleted and deleted.id == f"ft:{base}:{ann_name}:v3"
    after = service.statuses(ann_id)
    assert after[3] == "retired" and after[fallback] == "active"
    assert [v for v, status in after.items() if status == "active"] == [fallback]
    assert ann.models.retrieve(f"ft:{base}:{ann_name}:v3").id == f"ft:{base}:{ann_name}:v3"  # kept for rollback

    # Files are deleted on request, and with their owner.
    assert ann.files.delete(uploaded.id).deleted
    with pytest.raises(openai.NotFoundError):
        ann.files.retrieve(uploaded.id)
    kept = ann.files.create(file=("again.jsonl", TRAINING_FILE), purpose="fine-tune")
    assert service.http.delete(f"/users/{ann_id}").status_code == 200
    listed = [f.id for f in admin.files.list(limit=100)]
    assert admin_file.id in listed and kept.id not in listed


def test_openai_client_fine_tunes_from_files_embedded(tmp_path):
    ctx = build_context(make_settings(tmp_path), base_model=tiny_base_model())
    try:
        with ServerThread(create_app(context=ctx)) as server:
            drive_every_call(Service(server.base_url))
        with ctx.session_factory() as session:
            owned = select(func.count()).select_from(File).where(File.user_id.is_not(None))
            assert session.execute(owned).scalar() == 0
    finally:
        ctx.close()


@pytest.fixture
def distributed(postgres_url: str, redis_url: str, s3_server, tmp_path: Path) -> Iterator[tuple[dict, Path]]:
    upgrade_to_head(postgres_url)
    env = distributed_env_for(
        postgres_url,
        redis_url,
        s3_server,
        "openai-ft",
        STEER_TRAIN_MAX_STEPS_DEFAULT="2",
        STEER_TRAIN_BATCH_SIZE_DEFAULT="2",
        STEER_TRAIN_PREFIX_LEN_DEFAULT="2",
        STEER_TRAIN_MAX_SEQ_LEN="64",
    )
    log_path = tmp_path / "worker.log"
    process = spawn_train_worker(env, log_path)
    try:
        yield env, log_path
    finally:
        end(process)


@pytest.mark.integration
def test_openai_client_fine_tunes_from_files_distributed(distributed):
    env, worker_log = distributed
    settings = settings_from_env(env)
    assert settings.mode == "distributed"
    ctx = build_context(settings, base_model=tiny_base_model())
    try:
        with ServerThread(create_app(context=ctx)) as server:
            drive_every_call(Service(server.base_url, worker_log))
    finally:
        ctx.close()


def test_a_user_sees_its_part_of_a_batch_job_and_only_the_admin_cancels_it(tmp_path):
    with api_client(make_settings(tmp_path), dispatcher=RecordingDispatcher()) as client:
        ann, ben = onboard(client, "ann"), onboard(client, "ben")
        ids = [ann["user"]["id"], ben["user"]["id"]]
        retrain = client.post("/v1/admin/retrain", headers=ADMIN, json={"user_ids": ids})
        (batch,) = retrain.json()["data"]
        as_ann = client.get(f"/v1/fine_tuning/jobs/{batch['id']}", headers=bearer(ann["api_key"])).json()
        assert as_ann["user_ids"] == [ids[0]] and as_ann["user"] == ids[0]
        queued = client.get("/v1/fine_tuning/jobs?status=queued", headers=bearer(ben["api_key"])).json()["data"]
        assert [j["id"] for j in queued] == [batch["id"], ben["job"]["id"]]
        assert client.get("/v1/fine_tuning/jobs?status=succeeded", headers=ADMIN).json()["data"] == []
        refused = client.post(f"/v1/fine_tuning/jobs/{batch['id']}/cancel", headers=bearer(ann["api_key"]))
        assert refused.status_code == 403
        assert client.get(f"/v1/fine_tuning/jobs/{batch['id']}", headers=ADMIN).json()["status"] == "queued"
        cancelled = client.post(f"/v1/fine_tuning/jobs/{batch['id']}/cancel", headers=ADMIN)
        assert cancelled.json()["status"] == "cancelled"


def test_a_job_request_names_one_user_and_bad_files_change_nothing(tmp_path):
    with api_client(make_settings(tmp_path), dispatcher=RecordingDispatcher()) as client:
        ann, ben = onboard(client, "ann"), onboard(client, "ben")
        jobs_before = client.get("/v1/fine_tuning/jobs", headers=ADMIN).json()["data"]
        body = {"suffix": "ann", "user": ben["user"]["id"]}
        refused = client.post("/v1/fine_tuning/jobs", headers=ADMIN, json=body)
        assert refused.status_code == 400 and refused.json()["error"]["param"] == "suffix"
        missing = client.post("/v1/fine_tuning/jobs", headers=ADMIN, json={"suffix": "ann", "training_file": "file-x"})
        assert missing.status_code == 404
        other = client.post("/v1/fine_tuning/jobs", headers=bearer(ann["api_key"]), json={"suffix": "ben"})
        assert other.status_code == 404
        assert client.get("/v1/fine_tuning/jobs", headers=ADMIN).json()["data"] == jobs_before
        samples = client.get(f"/v1/users/{ann['user']['id']}/samples", headers=ADMIN).json()["data"]
        assert len(samples) == len(SAMPLES)
