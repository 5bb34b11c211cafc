"""What the service must not tell: a dependency's error text (S3 endpoints, broker addresses) in
an answer, and a key sent in a query string in the access log.
"""

from __future__ import annotations

import logging
import secrets
import time
from pathlib import Path

import httpx

from api.errors import public_message
from core.inference.errors import InferenceFailed, InferenceUnavailable
from tests.support.api import ADMIN, ADMIN_KEY, RecordingDispatcher, api_client, bearer, make_settings, onboard
from tests.support.inference import free_port
from tests.support.models import model_cache_dir
from tests.support.processes import spawn, wait_for_log


def test_a_store_error_reaches_the_log_but_not_the_client(tmp_path: Path, caplog):
    # A real S3 client pointed at a port where nothing listens: the store's own error names it.
    port = free_port()
    endpoint = f"127.0.0.1:{port}"
    settings = make_settings(
        tmp_path, s3_endpoint=endpoint, s3_access_key="internal-access", s3_secret_key="internal-secret"
    )
    with api_client(settings, dispatcher=RecordingDispatcher()) as client:
        body = onboard(client, "store-down")
        with caplog.at_level(logging.WARNING, logger="api.errors"):
            answer = client.delete(f"/v1/users/{body['user']['id']}", headers=bearer(body["api_key"]))
    assert answer.status_code == 503, answer.text
    error = answer.json()["error"]
    assert error["code"] == "store_unavailable" and "retry later" in error["message"]
    for secret in (str(port), "127.0.0.1", "S3", "internal", "bucket"):
        assert secret not in answer.text, (secret, answer.text)
    assert endpoint in caplog.text  # the operator still gets the detail


def test_a_workers_failure_text_is_replaced_by_the_services_own_words():
    # What a worker sends back when the object store fails under it (core/inference/redis_transport.py).
    leaked = "the request could not start: S3 error at minio.internal:9000: AccessDenied: <Error><Key>users/"
    redis_down = "the inference queue is unavailable, retry later (Error 111 connecting to 10.0.0.7)"
    for exc, code in (
        (InferenceFailed(leaked), "inference_failed"),
        (InferenceUnavailable(redis_down), "inference_unavailable"),
    ):
        message = public_message(exc, code)
        assert "minio" not in message and "10.0.0.7" not in message and "retry later" in message


def test_a_key_in_the_query_string_is_redacted_in_the_access_log(tmp_path: Path):
    """`steer serve` as an operator runs it; a client puts its key in `?api_key=`."""
    data_dir = tmp_path / "steer"
    data_dir.mkdir()
    (data_dir / "models").symlink_to(model_cache_dir(), target_is_directory=True)
    port = free_port()
    env = {
        "STEER_DATA_DIR": str(data_dir),
        "STEER_BASE_MODEL": "tiny",
        "STEER_DEVICE": "cpu",
        "STEER_ADMIN_KEY": ADMIN_KEY,
        "OMP_NUM_THREADS": "1",
    }
    log_path = tmp_path / "serve.log"
    server = spawn(["-m", "api.cli", "serve", "--host", "127.0.0.1", "--port", str(port)], env, log_path)
    try:
        wait_for_log(server, log_path, "Application startup complete", 120)
        user_key = "sk-steer-" + secrets.token_urlsafe(32)
        base = f"http://127.0.0.1:{port}"
        with httpx.Client(base_url=base, timeout=30) as http:
            assert http.get(f"/v1/users?api_key={user_key}&limit=5").status_code == 401
            assert http.get(f"/v1/users?limit=2&token={user_key[:20]}", headers=ADMIN).status_code == 200
            assert http.get(f"/v1/models?x={user_key}", headers=ADMIN).status_code == 200
            assert http.get(f"/v1/users/{user_key}", headers=ADMIN).status_code == 404
        deadline = time.monotonic() + 10
        while log_path.read_text().count("GET /v1/") < 4 and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        server.terminate()
        server.wait(30)
    log = log_path.read_text()
    access = [line for line in log.splitlines() if "GET /v1/" in line]
    assert len(access) == 4, log[-2000:]
    assert user_key not in log and user_key[9:29] not in log
    assert "api_key=REDACTED&limit=5" in access[0] and "token=REDACTED" in access[1]
    assert "x=REDACTED" in access[2] and "/v1/users/REDACTED" in access[3]
