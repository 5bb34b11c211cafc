"""Per-user quotas: a user key cannot crowd out other users — its active jobs and steps per job are
capped, the training executor takes jobs fairly across users, and completions are rate limited per
minute (requests and tokens) with OpenAI's 429 + Retry-After + `x-ratelimit-*` headers."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import pytest
import redis

from core.db import Job
from core.service.executor import EmbeddedExecutor
from core.service.quotas import RateLimited, RateLimiter
from tests.support.api import (
    ADMIN,
    RecordingDispatcher,
    api_client,
    bearer,
    make_settings,
    onboard,
    tiny_base_model,
    wait_for_job,
)


def test_a_flooding_user_is_capped_and_another_users_onboarding_runs_next(tmp_path: Path):
    settings = make_settings(tmp_path, user_max_active_jobs=2, user_max_steps_per_job=50)
    with api_client(settings, base=tiny_base_model(), dispatcher=RecordingDispatcher()) as client:
        ctx = client.app.state.ctx
        alice = onboard(client, "alice")  # admin-made: not counted against alice's own key
        alice_key = bearer(alice["api_key"])
        with ctx.session_factory() as session:  # as if alice's onboarding had finished
            session.get(Job, alice["job"]["id"]).status = "succeeded"
            session.commit()

        too_long = client.post("/v1/fine_tuning/jobs", headers=alice_key, json={"hyperparameters": {"max_steps": 51}})
        assert too_long.status_code == 400 and too_long.json()["error"]["param"] == "hyperparameters.max_steps"
        auto = {"hyperparameters": {"max_steps": 17, "method": "auto"}}  # auto trains three methods: 51 steps
        too_long_auto = client.post("/v1/fine_tuning/jobs", headers=alice_key, json=auto)
        assert too_long_auto.status_code == 400 and "with method auto" in too_long_auto.json()["error"]["message"]
        flood = [client.post("/v1/fine_tuning/jobs", headers=alice_key, json={}) for _ in range(3)]
        assert [r.status_code for r in flood] == [201, 201, 429]
        refused = flood[2]
        assert refused.json()["error"]["code"] == "rate_limit_exceeded" and int(refused.headers["retry-after"]) > 0
        assert client.get("/v1/fine_tuning/jobs", headers=alice_key).json()["data"][0]["id"] == flood[1].json()["id"]
        # the admin is not limited
        by_admin = client.post("/v1/fine_tuning/jobs", headers=ADMIN, json={"user": alice["user"]["id"]})
        assert by_admin.status_code == 201

        bob = onboard(client, "bob")
        executor = EmbeddedExecutor(ctx)
        executor.start()
        try:
            jobs = [flood[0].json()["id"], flood[1].json()["id"], by_admin.json()["id"], bob["job"]["id"]]
            assert all(wait_for_job(client, job_id)["status"] == "succeeded" for job_id in jobs)
        finally:
            executor.stop()
        with ctx.session_factory() as session:
            started = sorted((session.get(Job, job_id) for job_id in jobs), key=lambda job: job.started_at)
        # alice's oldest job first (nobody had run yet), then bob's onboarding before alice's others
        assert [job.id for job in started][:2] == [jobs[0], bob["job"]["id"]]


def test_completion_requests_and_tokens_per_minute_are_limited_per_key(tmp_path: Path):
    settings = make_settings(tmp_path, user_requests_per_minute=3, user_tokens_per_minute=1_000)
    with api_client(settings, base=tiny_base_model()) as client:
        alice = onboard(client, "alice")
        bob = onboard(client, "bob")
        body = {"model": "tiny-llama-random", "prompt": "Hello", "max_tokens": 2}
        answers = [client.post("/v1/completions", headers=bearer(alice["api_key"]), json=body) for _ in range(4)]
        assert [a.status_code for a in answers] == [200, 200, 200, 429]
        assert answers[0].headers["x-ratelimit-limit-requests"] == "3"
        assert [a.headers["x-ratelimit-remaining-requests"] for a in answers] == ["2", "1", "0", "0"]
        assert answers[0].headers["x-ratelimit-reset-requests"].endswith("s")
        refused = answers[3]
        assert refused.json()["error"]["type"] == "rate_limit_error" and int(refused.headers["retry-after"]) >= 1
        # another key has its own quota; the admin has none
        assert client.post("/v1/completions", headers=bearer(bob["api_key"]), json=body).status_code == 200
        assert client.post("/v1/completions", headers=ADMIN, json=body).status_code == 200
        # a request asking for more tokens than a minute allows is refused and uses nothing
        big = {**body, "max_tokens": 100, "n": 16}
        assert client.post("/v1/completions", headers=bearer(bob["api_key"]), json=big).status_code == 429
        answer = client.post("/v1/completions", headers=bearer(bob["api_key"]), json=body)
        assert answer.status_code == 200 and answer.headers["x-ratelimit-remaining-requests"] == "1"


def test_the_rate_limiter_counts_a_window_and_refused_requests_use_nothing():
    limiter = RateLimiter(requests_per_minute=2, tokens_per_minute=100)
    assert limiter.admit("k", 60)["x-ratelimit-remaining-tokens"] == "40"
    with pytest.raises(RateLimited) as over_tokens:
        limiter.admit("k", 41)
    assert "tokens" in str(over_tokens.value) and over_tokens.value.headers["x-ratelimit-remaining-tokens"] == "40"
    assert limiter.admit("k", 40)["x-ratelimit-remaining-requests"] == "0"
    with pytest.raises(RateLimited, match="requests"):
        limiter.admit("k", 0)
    assert limiter.admit("other", 1)["x-ratelimit-remaining-requests"] == "1"
    unlimited = RateLimiter(0, 0)
    assert all(unlimited.admit("k", 10**9) == {} for _ in range(5))


@pytest.mark.integration
def test_api_processes_share_one_quota_through_redis(redis_url: str):
    """Distributed mode: two API processes (two limiters on one Redis) count the same window."""
    key = f"test-{uuid.uuid4().hex}"
    first = RateLimiter(3, 0, redis.Redis.from_url(redis_url))
    second = RateLimiter(3, 0, redis.Redis.from_url(redis_url))
    if time.time() % 60 > 58:  # do not straddle a window boundary
        time.sleep(3)
    first.admit(key, 1)
    second.admit(key, 1)
    assert first.admit(key, 1)["x-ratelimit-remaining-requests"] == "0"
    with pytest.raises(RateLimited):
        second.admit(key, 1)
