"""Distributed inference survives a Redis restart without restarting any process.

A private Redis (in memory only: it comes back EMPTY, without the request stream, its consumer
group or any reply stream), a private Postgres and SeaweedFS; one `python -m workers.infer`
subprocess on the tiny model; the API in distributed mode on a loopback port, called with the
official openai client. A greedy completion for `user:<id>` works; while Redis is down the same
call fails quickly with a 503 (no hang, no 500); once Redis is back the call works again within a
bounded wait and returns exactly the same text, served by the same worker process.
"""

from __future__ import annotations

import socket
import time

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
REQUEST_TIMEOUT_S = 15  # each job's deadline
WORKER_START_S = 120  # importing torch and loading the model on a busy two-core machine
FAST_S = 10.0  # the outage must be reported within this
RECOVER_S = 30.0  # after Redis is back, completions must work again within this
GREEDY = {"prompt": "Tell me", "max_tokens": 6, "temperature": 0}


def _consumers(client: redis.Redis) -> list[str]:
    """Names of the consumers of the request group ([] while the stream or group does not exist)."""
    try:
        return [c["name"].decode() for c in client.xinfo_consumers(REQUESTS_STREAM, GROUP)]
    except redis.ResponseError:
        return []


def test_inference_worker_and_api_survive_a_redis_restart(s3_server, tmp_path):
    pg, rd = PrivatePostgres(), PrivateRedis()
    ctx = worker = late = probe = None
    log_path, late_log = tmp_path / "infer.log", tmp_path / "infer-late.log"
    try:
        pg.start()
        rd.start()
        upgrade_to_head(pg.url)
        env = distributed_env(
            pg.url, rd.url, s3_server, "redis-restart", STEER_REQUEST_TIMEOUT_S=str(REQUEST_TIMEOUT_S)
        )
        settings = settings_from_env(env)
        assert settings.mode == "distributed"
        ctx = build_context(settings, base_model=tiny_base_model())
        user = create_user(ctx, "redis-restart-user")
        publish_random_prefix(ctx, ctx.base_model(), user, seed=5)
        worker = spawn(["-m", "workers.infer"], env, log_path)
        probe = redis.Redis.from_url(rd.url)

        # The worker logs this once its model is loaded and its engine runs. (Redis 7.0 lists a
        # consumer only once it has been delivered an entry, so the group cannot tell us yet.)
        wait_for_log(worker, log_path, "consuming " + REQUESTS_STREAM, WORKER_START_S)
        consumer = f"{socket.gethostname()}-{worker.pid}"  # the name `workers.infer` gives itself

        with ServerThread(build_app(ctx)) as server:
            client = openai.OpenAI(base_url=server.base_url, api_key=user.key, max_retries=0, timeout=30)
            model = f"user:{user.external_id}"
            before = client.completions.create(model=model, **GREEDY)
            text = before.choices[0].text
            assert text and before.choices[0].finish_reason == "length", before
            assert _consumers(probe) == [consumer], _consumers(probe)

            rd.stop()
            started = time.monotonic()
            with pytest.raises(openai.APIStatusError) as info:
                client.completions.create(model=model, **GREEDY)
            took = time.monotonic() - started
            assert info.value.status_code == 503, (info.value.status_code, info.value.message)
            assert "unavailable" in info.value.message, info.value.message
            assert took < FAST_S, f"the outage took {took:.1f} s to report"
            # A second worker starting during the outage waits for Redis instead of exiting.
            late = spawn(["-m", "workers.infer"], env, late_log)
            time.sleep(2)  # let the worker notice the outage and go through a few retries

            rd.start()  # on the same port, empty: no stream, no group, no reply streams
            restarted = time.monotonic()
            refusals: list[str] = []
            while True:
                try:
                    after = client.completions.create(model=model, **GREEDY)
                    break
                except openai.APIStatusError as exc:
                    # Only a clean 503 may be seen while the worker has not recreated the group yet.
                    assert exc.status_code == 503, (exc.status_code, exc.message, tail(log_path))
                    refusals.append(exc.message)
                assert time.monotonic() - restarted < RECOVER_S, (
                    f"no completion {RECOVER_S:.0f} s after Redis came back; last refusals {refusals[-3:]}:\n"
                    f"{tail(log_path)}"
                )
                time.sleep(0.5)
            recovered = time.monotonic() - restarted

            assert after.choices[0].text == text, (after.choices[0].text, text)
            assert after.choices[0].finish_reason == "length"
            # Same worker process, never restarted, now consuming from the recreated group.
            assert worker.poll() is None, f"the worker exited with {worker.returncode}:\n{tail(log_path)}"
            wait_for_log(late, late_log, "consuming " + REQUESTS_STREAM, WORKER_START_S)
            # Either worker may take the first requests after the restart; the first one must also
            # come back to the recreated group (Redis lists a consumer once it was delivered an entry).
            deadline = time.monotonic() + RECOVER_S
            while consumer not in _consumers(probe):
                assert time.monotonic() < deadline, (_consumers(probe), tail(log_path))
                assert client.completions.create(model=model, **GREEDY).choices[0].text == text
            print(
                f"\nRedis outage: 503 after {took:.2f} s; after the restart the same worker "
                f"(pid {worker.pid}) answered again in {recovered:.1f} s ({len(refusals)} 503s meanwhile), "
                f"same greedy text {text!r}"
            )
    finally:
        if probe is not None:
            probe.close()
        for process in (worker, late):
            if process is not None:
                end(process)
        if ctx is not None:
            ctx.close()
        rd.close()
        pg.close()
