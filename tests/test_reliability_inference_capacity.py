"""Distributed inference with no live worker: fail fast, never hang, forget the dead.

A private Redis, Postgres and SeaweedFS; the API in distributed mode on a loopback port with the
production request deadline (120 s), called with the official openai client; `python -m
workers.infer` processes on the tiny model, which announce themselves with a heartbeat.

* With no worker running, `/readyz` reports `inference_workers: 0` and a completion (plain or
  streamed) answers 503 `inference_unavailable` within 2 s (before: it waited 121 s for a 504).
* The only worker SIGKILLed mid-stream: the stream ends with a clean error event within seconds
  (before: the client hung until the deadline, or until a new worker happened to start); the
  next completion answers 503 at once.
* A worker started later deletes the dead worker's consumer from the Redis group (before: dead
  consumers stayed forever).
"""

from __future__ import annotations

import signal
import socket
import time
from collections.abc import Iterator

import httpx
import openai
import pytest
import redis

from core.db.migrate import upgrade_to_head
from core.inference.redis_transport import GROUP, REQUESTS_STREAM
from core.service.context import build_context
from tests.support.api import tiny_base_model
from tests.support.inference import ServerThread, build_app, create_user, publish_random_prefix
from tests.support.processes import distributed_env, end, settings_from_env, spawn, tail, wait_for_log
from tests.support.services import PrivatePostgres, PrivateRedis

pytestmark = pytest.mark.integration
REQUEST_TIMEOUT_S = 120  # production's deadline: nothing here may wait for it
CLIENT_TIMEOUT_S = 30  # a hang shows as the client's read timeout, long before the deadline
CLAIM_IDLE_S = 1
WORKER_TIMEOUT_S = 2
REFUSE_S = 2.5  # "no worker" must be answered within this (the API waits 1.5 s for one to start)
STREAM_END_S = 15.0  # a dead worker's stream must end within this of the kill
WORKER_START_S = 120  # importing torch and loading the model on a busy two-core machine
GREEDY = {"prompt": "Tell me", "max_tokens": 4, "temperature": 0}


class Deployment:
    def __init__(self, env: dict[str, str], ctx, server: ServerThread, user, probe: redis.Redis):
        self.env, self.ctx, self.server, self.user, self.probe = env, ctx, server, user, probe
        self.model = f"user:{user.external_id}"
        self.client = openai.OpenAI(base_url=server.base_url, api_key=user.key, max_retries=0, timeout=CLIENT_TIMEOUT_S)
        self.http = httpx.Client(base_url=server.base_url.removesuffix("/v1"), timeout=10)

    def inference_workers(self) -> int | None:
        ready = self.http.get("/readyz")
        assert ready.status_code == 200, ready.text  # inference capacity never decides readiness
        return ready.json()["inference_workers"]

    def consumers(self) -> list[str]:
        return sorted(c["name"].decode() for c in self.probe.xinfo_consumers(REQUESTS_STREAM, GROUP))

    def assert_refused_at_once(self) -> float:
        """Plain and streamed completions answer 503 inference_unavailable quickly; the slower."""
        slowest = 0.0
        for stream in (False, True):
            started = time.monotonic()
            with pytest.raises(openai.APIStatusError) as info:
                self.client.completions.create(model=self.model, stream=stream, **GREEDY)
            took = time.monotonic() - started
            assert info.value.status_code == 503, (info.value.status_code, info.value.message)
            assert info.value.code == "inference_unavailable", info.value.body
            assert "no inference worker" in info.value.message, info.value.message
            assert took < REFUSE_S, f"the refusal took {took:.1f} s"
            slowest = max(slowest, took)
        return slowest


@pytest.fixture(scope="module")
def deployment(s3_server) -> Iterator[Deployment]:
    pg, rd = PrivatePostgres(), PrivateRedis()
    ctx = probe = None
    try:
        pg.start()
        rd.start()
        upgrade_to_head(pg.url)
        env = distributed_env(
            pg.url,
            rd.url,
            s3_server,
            "capacity",
            STEER_REQUEST_TIMEOUT_S=str(REQUEST_TIMEOUT_S),
            STEER_INFER_CLAIM_IDLE_S=str(CLAIM_IDLE_S),
            STEER_INFER_WORKER_TIMEOUT_S=str(WORKER_TIMEOUT_S),
        )
        ctx = build_context(settings_from_env(env), base_model=tiny_base_model())
        user = create_user(ctx, "capacity-user")
        publish_random_prefix(ctx, ctx.base_model(), user, seed=7)
        probe = redis.Redis.from_url(rd.url)
        with ServerThread(build_app(ctx)) as server:
            yield Deployment(env, ctx, server, user, probe)
    finally:
        if probe is not None:
            probe.close()
        if ctx is not None:
            ctx.close()
        rd.close()
        pg.close()


def test_with_no_inference_worker_readiness_says_so_and_completions_answer_503_at_once(deployment):
    took = deployment.assert_refused_at_once()
    assert deployment.inference_workers() == 0
    print(f"\nno inference worker: 503 inference_unavailable in {took * 1000:.0f} ms (deadline {REQUEST_TIMEOUT_S} s)")


def test_the_only_worker_killed_mid_stream_ends_the_stream_cleanly_and_a_new_worker_forgets_it(deployment, tmp_path):
    log_path = tmp_path / "infer.log"
    worker = spawn(["-m", "workers.infer"], deployment.env, log_path)
    second = None
    try:
        wait_for_log(worker, log_path, "consuming " + REQUESTS_STREAM, WORKER_START_S)
        assert deployment.inference_workers() == 1
        first = deployment.client.completions.create(model=deployment.model, **GREEDY)
        assert first.choices[0].text, first

        stream = deployment.client.completions.create(
            model=deployment.model, prompt="Tell me", max_tokens=2000, temperature=0, stream=True
        )
        chunks = iter(stream)
        next(chunks), next(chunks)
        worker.send_signal(signal.SIGKILL)
        worker.wait(10)
        killed = time.monotonic()
        with pytest.raises(openai.APIError) as info:
            for _ in chunks:
                pass
        ended = time.monotonic() - killed
        assert not isinstance(info.value, openai.APITimeoutError), f"the stream hung for {ended:.0f} s"
        assert "stopped" in info.value.message, info.value.message
        assert ended < STREAM_END_S, ended

        # Its heartbeat expires: readiness reports no capacity, completions are refused at once.
        deadline = time.monotonic() + WORKER_TIMEOUT_S + 5
        while deployment.inference_workers() != 0:
            assert time.monotonic() < deadline, "the killed worker still counts as live"
            time.sleep(0.2)
        refused = deployment.assert_refused_at_once()

        # A new worker removes the dead worker's consumer (idle, nothing pending) from the group.
        dead = f"{socket.gethostname()}-{worker.pid}"
        assert dead in deployment.consumers(), deployment.consumers()
        second_log = tmp_path / "infer2.log"
        second = spawn(["-m", "workers.infer"], deployment.env, second_log)
        wait_for_log(second, second_log, "consuming " + REQUESTS_STREAM, WORKER_START_S)
        again = deployment.client.completions.create(model=deployment.model, **GREEDY)
        assert again.choices[0].text == first.choices[0].text
        alive = f"{socket.gethostname()}-{second.pid}"
        deadline = time.monotonic() + 10 * CLAIM_IDLE_S + 5
        while deployment.consumers() != [alive]:
            assert time.monotonic() < deadline, (deployment.consumers(), tail(second_log))
            time.sleep(0.2)
        print(
            f"\nonly worker killed mid-stream: clean error event {ended:.1f} s after the kill "
            f"(deadline {REQUEST_TIMEOUT_S} s); then 503 within {refused * 1000:.0f} ms; the dead consumer "
            "was removed by the next worker"
        )
    finally:
        for process in (worker, second):
            if process is not None:
                end(process)
