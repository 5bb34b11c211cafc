"""Shared fixtures: real Postgres, Redis and S3 (SeaweedFS) for integration tests.

Each fixture skips its tests when the service is missing, unless STEER_TEST_REQUIRE_SERVICES=1
(what `scripts/test.sh` sets): then a missing service is an error, so CI cannot go green by
quietly skipping the integration tests.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator

import pytest

from tests.support import cpu_profile
from tests.support.seaweed import SeaweedServer

POSTGRES_HOST = "127.0.0.1"
POSTGRES_PORT = 5432
POSTGRES_USERS = ("postgres", "root")  # trust auth on the test machine; first that works wins
REDIS_HOST = "127.0.0.1"
REDIS_PORT = 6379
# A dedicated database number, flushed at the start of the session; each lane has its own.
REDIS_TEST_DB = int(os.environ.get("STEER_TEST_REDIS_DB", "5"))
SEAWEED_START_ATTEMPTS = 3


# The fast lane (`bash scripts/test.sh --fast`, or `pytest -m fast`): the engine's equivalence and
# unit tests and the API's contract tests on the tiny model, for the edit-test loop (measured in
# docs/RELIABILITY.md; target <= 3 minutes on 2 cores). The full suite stays what CI runs.
FAST_LANE = {
    "test_import_graph",
    "test_config",
    "test_docs",
    "test_engine_data",
    "test_engine_sampling",
    "test_engine_scheduler",
    "test_engine_generation",
    "test_engine_prefix",
    "test_engine_batch_cache",
    "test_engine_style_strength",
    "test_engine_lora",
    "test_engine_artifacts",
    "test_engine_preservation",
    "test_engine_dpo",
    "test_api_hardening",
    "test_bad_input",
    "test_api_input",
    "test_api_auth",
    "test_isolation",
    "test_evaluation_tasks",
    "test_error_disclosure",
    "test_lanes",
}


# The compute lane (`-m compute`): the tests that keep both cores busy with the model's forward and
# backward passes (engine, evaluation, benchmarks, the default model end to end). The rest, the
# service lane, mostly waits: on HTTP, worker processes, leases expiring, services restarting
# (about one core busy on average, measured per test with STEER_TEST_PROFILE: docs/RELIABILITY.md).
# `bash scripts/test.sh` runs the two lanes at once, as two pytest sessions; together they are the
# whole suite.
COMPUTE_LANE = {
    "test_bench",
    "test_bench_onboarding",
    "test_completion_event_loop",
    "test_e2e_voice_task",
    "test_engine_artifacts",
    "test_engine_batch_cache",
    "test_engine_data",
    "test_engine_dpo",
    "test_engine_families",
    "test_engine_generation",
    "test_engine_lora",
    "test_engine_memory",
    "test_engine_methods",
    "test_engine_precision",
    "test_engine_prefix",
    "test_engine_preservation",
    "test_engine_sampling",
    "test_engine_scheduler",
    "test_engine_style_strength",
    "test_engine_training",
    "test_evaluation",
    "test_evaluation_controls",
    "test_evaluation_generations",
    "test_evaluation_tasks",
    "test_gpu_check",
    "test_load_short",
}
"""Not here, to balance the lanes: test_engine_seq2seq and test_bench_cache (toy models and blob
stores, about one core busy)."""


def pytest_configure(config):
    cpu_profile.register(config)  # STEER_TEST_PROFILE=<file>: wall time and busy cores per test


def pytest_collection_modifyitems(config, items):
    for item in items:
        module = item.module.__name__.rsplit(".", 1)[-1]
        if module in COMPUTE_LANE:
            item.add_marker(pytest.mark.compute)
        if module in FAST_LANE and not item.get_closest_marker("slow") and not item.get_closest_marker("integration"):
            item.add_marker(pytest.mark.fast)


def _services_required() -> bool:
    return os.environ.get("STEER_TEST_REQUIRE_SERVICES", "") not in ("", "0", "false")


def _unavailable(message: str) -> None:
    if _services_required():
        pytest.fail(f"{message} (STEER_TEST_REQUIRE_SERVICES is set)", pytrace=False)
    pytest.skip(message)


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """URL of a fresh, uniquely named Postgres database, dropped at the end of the session."""
    import psycopg2

    if not _port_open(POSTGRES_HOST, POSTGRES_PORT):
        _unavailable(f"Postgres is not answering on {POSTGRES_HOST}:{POSTGRES_PORT}")
    admin = None
    user = None
    errors = []
    for candidate in POSTGRES_USERS:
        try:
            admin = psycopg2.connect(host=POSTGRES_HOST, port=POSTGRES_PORT, user=candidate, dbname="postgres")
            user = candidate
            break
        except psycopg2.OperationalError as exc:
            errors.append(f"{candidate}: {exc}".strip())
    if admin is None or user is None:
        _unavailable("cannot connect to Postgres: " + "; ".join(errors))
    assert admin is not None and user is not None
    admin.autocommit = True  # CREATE/DROP DATABASE cannot run inside a transaction
    name = f"steer_test_{uuid.uuid4().hex[:12]}"
    with admin.cursor() as cursor:
        cursor.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql+psycopg2://{user}@{POSTGRES_HOST}:{POSTGRES_PORT}/{name}"
    finally:
        with admin.cursor() as cursor:
            # FORCE (Postgres 13+) ends connections a test forgot to close.
            cursor.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


@pytest.fixture(scope="session")
def redis_url() -> str:
    """URL of a dedicated Redis database number, emptied at the start of the session."""
    import redis

    if not _port_open(REDIS_HOST, REDIS_PORT):
        _unavailable(f"Redis is not answering on {REDIS_HOST}:{REDIS_PORT}")
    url = f"redis://{REDIS_HOST}:{REDIS_PORT}/{REDIS_TEST_DB}"
    client = redis.Redis.from_url(url)
    try:
        client.flushdb()
    finally:
        client.close()
    return url


@pytest.fixture(scope="session")
def s3_server() -> Iterator[SeaweedServer]:
    """A running SeaweedFS S3 server with one random identity (see tests/support/seaweed.py).

    Use `.endpoint`, `.access_key`, `.secret_key`, `.settings_env(bucket)` or
    `.minio_client()`. Tests that stop/start it must leave it running.
    """
    last_error: Exception | None = None
    for _attempt in range(SEAWEED_START_ATTEMPTS):
        server = SeaweedServer()
        try:
            server.start()
        except FileNotFoundError as exc:
            server.close()
            _unavailable(str(exc))
        except (RuntimeError, TimeoutError) as exc:
            # Most likely another process grabbed one of the ports we picked; pick again.
            server.close()
            last_error = exc
            continue
        try:
            yield server
        finally:
            server.close()
        return
    pytest.fail(f"could not start SeaweedFS: {last_error}", pytrace=False)


@pytest.fixture
def fresh_postgres_database(postgres_url: str) -> Iterator[str]:
    """A brand-new database on the test server, for tests that must start from nothing."""
    from sqlalchemy import text
    from sqlalchemy.engine import make_url

    from core.db import make_engine

    name = f"steer_fresh_{uuid.uuid4().hex[:12]}"
    server = make_engine(
        make_url(postgres_url).set(database="postgres").render_as_string(hide_password=False),
        isolation_level="AUTOCOMMIT",
    )
    try:
        with server.connect() as connection:
            connection.execute(text(f'CREATE DATABASE "{name}"'))
        yield make_url(postgres_url).set(database=name).render_as_string(hide_password=False)
        with server.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        server.dispose()
