"""Operators see the workers: heartbeats, readiness by kind, one /metrics for every process.

A private Redis and Postgres and the shared SeaweedFS; the API (this process, distributed mode) with
a real `python -m workers.infer` process and a real Celery training worker on the tiny model.

* `GET /v1/admin/workers` lists both, each with its host, pid (the process that serves or trains),
  start, last heartbeat, and what it works on: a training job's id while it trains it.
* `/readyz` reports `inference_workers` and `training_workers` separately and stays ready without them.
* The API's `/metrics` carries each worker's metrics with a `worker` label, one TYPE per family.
* A worker stopped leaves the list (and readiness counts) at once.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from core.db.migrate import upgrade_to_head
from core.service.context import build_context
from tests.support.api import ADMIN_KEY, tiny_base_model
from tests.support.inference import ServerThread, build_app
from tests.support.processes import (
    distributed_env,
    end,
    settings_from_env,
    spawn,
    spawn_train_worker,
    tail,
)
from tests.support.services import PrivatePostgres, PrivateRedis

pytestmark = pytest.mark.integration
WORKER_TIMEOUT_S = 2
WORKER_START_S = 180  # importing torch and loading the model on a busy two-core machine
SAMPLES = [f"Sample number {i}: the quick brown fox writes another careful note today." for i in range(8)]


def wait_until(condition: Callable[[], Any], what: str, timeout_s: float = WORKER_START_S) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"never {what}"
        time.sleep(0.3)


@pytest.fixture(scope="module")
def deployment(s3_server, tmp_path_factory) -> Iterator[dict[str, Any]]:
    pg, rd = PrivatePostgres(), PrivateRedis()
    ctx = None
    procs: dict[str, Any] = {}
    logs = tmp_path_factory.mktemp("visibility")
    try:
        pg.start()
        rd.start()
        upgrade_to_head(pg.url)
        env = distributed_env(
            pg.url, rd.url, s3_server, "visibility", STEER_INFER_WORKER_TIMEOUT_S=str(WORKER_TIMEOUT_S)
        )
        ctx = build_context(settings_from_env(env), base_model=tiny_base_model())
        procs["infer_log"], procs["train_log"] = logs / "infer.log", logs / "train.log"
        procs["infer"] = spawn(["-m", "workers.infer"], env, procs["infer_log"])
        procs["train"] = spawn_train_worker(env, procs["train_log"])
        with ServerThread(build_app(ctx)) as server:
            http = httpx.Client(
                base_url=server.base_url.removesuffix("/v1"),
                headers={"Authorization": f"Bearer {ADMIN_KEY}"},
                timeout=30,
            )
            yield {**procs, "http": http}
    finally:
        for name in ("infer", "train"):
            if name in procs:
                end(procs[name])
        if ctx is not None:
            ctx.close()
        rd.close()
        pg.close()


def workers_of(http: httpx.Client, kind: str) -> list[dict]:
    answer = http.get("/v1/admin/workers")
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["object"] == "list" and body["has_more"] is False
    return [w for w in body["data"] if w["kind"] == kind]


def test_workers_report_heartbeats_capacity_and_metrics_to_the_api(deployment):
    http = deployment["http"]
    infer = wait_until(lambda: workers_of(http, "inference"), "an inference worker listed")
    train = wait_until(lambda: workers_of(http, "training"), "a training worker listed")
    assert len(infer) == len(train) == 1
    (infer,), (train,) = infer, train
    # The pids are the processes that serve and train: the inference process, the Celery pool child.
    assert infer["pid"] == deployment["infer"].pid
    assert psutil.Process(train["pid"]).ppid() == deployment["train"].pid
    for worker in (infer, train):
        assert worker["host"] == os.uname().nodename
        assert worker["id"] == f"{worker['host']}-{worker['pid']}"
        assert worker["started_at"] <= worker["last_seen"]

    ready = http.get("/readyz")
    assert ready.status_code == 200, ready.text
    assert (ready.json()["inference_workers"], ready.json()["training_workers"]) == (1, 1)

    # A long job: its id is the training worker's `current` while it trains, then it is cancelled.
    onboarded = http.post("/v1/onboarding", json={"external_id": "visible", "samples": SAMPLES})
    assert onboarded.status_code == 201, onboarded.text
    wait_until(
        lambda: (
            http.get(f"/v1/fine_tuning/jobs/{onboarded.json()['job']['id']}").json()["status"]
            in ("succeeded", "failed")
        ),
        "the onboarding job finished",
    )
    job = http.post(
        "/v1/fine_tuning/jobs",
        json={"user": onboarded.json()["user"]["id"], "hyperparameters": {"max_steps": 2000}},
    )
    assert job.status_code == 201, job.text
    job_id = job.json()["id"]
    wait_until(lambda: workers_of(http, "training")[0]["current"] == job_id, "the job shown as current")
    http.post(f"/v1/fine_tuning/jobs/{job_id}/cancel")

    # Every worker's metrics in the API's exposition, labelled, one TYPE line per family.
    def exposition() -> str:
        text = http.get("/metrics").text
        steps = f'steer_training_step_seconds_count{{worker="{train["id"]}"}}'
        return text if steps in text and f'worker="{infer["id"]}"' in text else ""

    text = wait_until(exposition, "both workers' metrics in /metrics")
    assert f'steer_inference_queue_depth{{worker="{infer["id"]}"}}' in text
    types = [line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")]
    assert len(types) == len(set(types)), "a metric family declared twice"
    assert {f.name for f in text_string_to_metric_families(text)} >= {"steer_training_step_seconds"}  # parses

    # A stopped worker leaves the list and the capacity at once (a killed one after its timeout).
    os.killpg(deployment["infer"].pid, signal.SIGTERM)
    deployment["infer"].wait(30)
    wait_until(lambda: not workers_of(http, "inference"), "the stopped worker gone", timeout_s=30)
    assert http.get("/readyz").json()["inference_workers"] == 0
    assert http.get("/readyz").status_code == 200
    assert workers_of(http, "training"), tail(deployment["train_log"])
