"""Dependency faults: Redis, Postgres and the S3 server go down under a running API and come back.

The API runs in distributed mode on a loopback port against private Redis and Postgres servers
(`tests/support/services.py`: the machine's shared ones are never stopped) and SeaweedFS. For each
dependency in turn: while it is down `/readyz` answers 503 naming it, calls that need it answer
503 with an OpenAI-style error quickly (no 500, no hang), calls that do not need it still work;
once it is back everything works again without restarting the API, and nothing written before is
lost.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import httpx
import pytest

from core.config import Settings
from core.db.migrate import upgrade_to_head
from core.service.context import build_context
from core.service.registry import active_prefix
from tests.support.api import ADMIN, ADMIN_KEY, SAMPLES, tiny_base_model
from tests.support.inference import ServerThread, build_app, create_user, publish_random_prefix
from tests.support.models import model_cache_dir
from tests.support.services import PrivatePostgres, PrivateRedis

pytestmark = pytest.mark.integration
FAST_S = 10.0  # an outage must be reported within this, never by a hanging request


class Service:
    def __init__(self, pg: PrivatePostgres, rd: PrivateRedis, s3, ctx, http: httpx.Client):
        self.pg, self.rd, self.s3, self.ctx, self.http = pg, rd, s3, ctx, http

    def call(self, method: str, path: str, **kwargs) -> httpx.Response:
        started = time.monotonic()
        response = self.http.request(method, path, headers=ADMIN, **kwargs)
        assert time.monotonic() - started < FAST_S, f"{method} {path} took {time.monotonic() - started:.1f} s"
        return response

    def ready(self) -> httpx.Response:
        return self.call("GET", "/readyz")

    def wait_ready(self, timeout_s: float = 30) -> None:
        deadline = time.monotonic() + timeout_s
        while (response := self.ready()).status_code != 200:
            assert time.monotonic() < deadline, response.text
            time.sleep(0.3)


@pytest.fixture(scope="module")
def service(s3_server) -> Iterator[Service]:
    pg, rd = PrivatePostgres(), PrivateRedis()
    ctx = None
    try:
        pg.start()
        rd.start()
        upgrade_to_head(pg.url)
        settings = Settings(  # type: ignore[call-arg]
            _env_file=None,
            database_url=pg.url,
            redis_url=rd.url,
            base_model="tiny",
            device="cpu",
            admin_key=ADMIN_KEY,
            data_dir=model_cache_dir().parent,
            request_timeout_s=5,
            **{
                k.removeprefix("STEER_").lower(): v
                for k, v in s3_server.settings_env(f"deps-{uuid.uuid4().hex[:8]}").items()
            },
        )
        ctx = build_context(settings, base_model=tiny_base_model())
        with (
            ServerThread(build_app(ctx)) as server,
            httpx.Client(base_url=server.base_url.removesuffix("/v1"), timeout=30) as http,
        ):
            yield Service(pg, rd, s3_server, ctx, http)
    finally:
        s3_server.start()  # the session's S3 server must be left running
        if ctx is not None:
            ctx.close()
        rd.close()
        pg.close()


def _onboard(service: Service, external_id: str) -> dict:
    response = service.call("POST", "/v1/onboarding", json={"external_id": external_id, "samples": SAMPLES})
    assert response.status_code == 201, response.text
    return response.json()


def _assert_unavailable(response: httpx.Response, code: str, words: str) -> None:
    assert response.status_code == 503, response.text
    error = response.json()["error"]
    assert error["type"] == "service_unavailable" and error["code"] == code, error
    assert words in error["message"], error


def _assert_not_ready(service: Service, check: str, words: str) -> None:
    response = service.ready()
    assert response.status_code == 503, response.text
    checks = response.json()["checks"]
    assert words in checks[check], checks
    assert all(value == "ok" for name, value in checks.items() if name != check), checks


def test_redis_outage_answers_503_and_recovers_without_restart(service):
    before = _onboard(service, "redis-before")
    service.rd.stop()
    try:
        _assert_not_ready(service, "broker", "unreachable")
        _assert_unavailable(
            service.call("POST", "/v1/onboarding", json={"external_id": "redis-during", "samples": SAMPLES}),
            "queue_unavailable",
            "broker is unavailable",
        )
        _assert_unavailable(
            service.call(
                "POST", "/v1/completions", json={"model": "tiny-llama-random", "prompt": "Hi", "max_tokens": 2}
            ),
            "inference_unavailable",
            "unavailable",
        )
        # What does not need Redis still works.
        assert service.call("GET", f"/v1/users/{before['user']['id']}").status_code == 200
    finally:
        service.rd.start()
    service.wait_ready()
    after = _onboard(service, "redis-after")
    assert after["job"]["status"] == "queued"
    samples = service.call("GET", f"/v1/users/{before['user']['id']}/samples").json()["data"]
    assert len(samples) == len(SAMPLES)


def test_postgres_outage_answers_503_and_recovers_without_restart(service):
    before = _onboard(service, "pg-before")
    service.pg.stop()
    try:
        _assert_not_ready(service, "database", "unreachable")
        _assert_unavailable(service.call("GET", "/v1/users"), "database_unavailable", "database is unavailable")
        _assert_unavailable(
            service.call("POST", "/v1/onboarding", json={"external_id": "pg-during", "samples": SAMPLES}),
            "database_unavailable",
            "database is unavailable",
        )
    finally:
        service.pg.start()
    service.wait_ready()
    users = service.call("GET", "/v1/users?limit=100").json()["data"]
    assert before["user"]["id"] in [u["id"] for u in users]
    assert "pg-during" not in [u["external_id"] for u in users]
    job = service.call("GET", f"/v1/fine_tuning/jobs/{before['job']['id']}").json()
    assert job["status"] == "queued"
    _onboard(service, "pg-after")


def test_s3_outage_answers_503_and_recovers_without_restart(service):
    kept = create_user(service.ctx, "s3-kept")
    doomed = create_user(service.ctx, "s3-doomed")
    base = service.ctx.base_model()
    publish_random_prefix(service.ctx, base, kept, seed=1)
    publish_random_prefix(service.ctx, base, doomed, seed=2)
    service.s3.stop()
    try:
        _assert_not_ready(service, "store", "unavailable")
        # Erasing a user needs the store: refused with 503, retried later.
        _assert_unavailable(service.call("DELETE", f"/v1/users/{doomed.user_id}"), "store_unavailable", "")
        # Training jobs can still be accepted (the workers write to S3, not the API).
        assert service.call("GET", f"/v1/users/{kept.user_id}/prefixes").status_code == 200
    finally:
        service.s3.start()
    service.wait_ready()
    assert service.call("DELETE", f"/v1/users/{doomed.user_id}").status_code == 200
    assert service.ctx.store.list(f"users/{doomed.user_id}/") == []
    with service.ctx.session_factory() as session:
        row = active_prefix(session, kept.user_id)
        assert service.ctx.store.get(row.blob_key, expected_sha256=row.sha256)  # intact after the outage
