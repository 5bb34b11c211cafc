"""Property-based fuzzing of every endpoint from the app's own OpenAPI schema (schemathesis).

For each operation, with the admin key, a user's key and an invalid key, schemathesis generates
valid and invalid requests; every answer must be a non-5xx status the schema declares, with a body
that matches the declared schema. Generated path ids are sometimes swapped for real ones (so the
fuzzer reaches existing users, samples and jobs) and generated completions are kept short (so
generation does not dominate the run).
"""

from __future__ import annotations

import os
import tempfile
import traceback
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, given, reject, settings, strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from sqlalchemy import select

from core.db import Sample
from tests.support.api import ADMIN_KEY, SAMPLES, RecordingDispatcher, api_client, make_settings, onboard
from tests.support.inference import TestUser, publish_random_prefix

MAX_EXAMPLES = int(os.environ.get("STEER_FUZZ_EXAMPLES", "12"))
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
STATUSES: dict = {}
KEYS = {"admin": ADMIN_KEY, "user": None, "invalid": "sk-steer-not-a-real-key"}
# Starlette's test client warns about per-request cookies, which schemathesis sets.
pytestmark = pytest.mark.filterwarnings("ignore:Setting per-request cookies:DeprecationWarning")
# Erasing the real user would leave the rest of the run with only 404s to look at.
KEEP_REAL_IDS_OUT_OF = {("DELETE", "/v1/users/{user_id}")}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fuzz")
    # A short request timeout: a generated request must never be able to hang the run.
    app_settings = make_settings(tmp, max_queue=64, request_timeout_s=20)
    with api_client(app_settings, dispatcher=RecordingDispatcher()) as client:
        body = onboard(client, "fuzz-user", SAMPLES)
        with client.app.state.ctx.session_factory() as session:
            sample_ids = session.execute(select(Sample.id)).scalars().all()
        base = client.app.state.ctx.base_model()
        user = TestUser("fuzz-user", body["user"]["id"], body["api_key"])
        version = publish_random_prefix(client.app.state.ctx, base, user, seed=1, prefix_len=2)
        ids = {
            "models": [base.model_id, "user:fuzz-user", f"ft:{base.model_id}:fuzz-user:v{version}"],
            "user_id": body["user"]["id"],
            "job_id": body["job"]["id"],
            "sample_id": sample_ids[0],
            "version": version,
        }
        KEYS["user"] = body["api_key"]
        schema = schemathesis.openapi.from_dict(client.get("/openapi.json").json())
        yield client, schema, ids


def _operations():
    # Collected from a throwaway app: the schema does not depend on the data.
    with tempfile.TemporaryDirectory() as tmp:
        with api_client(make_settings(Path(tmp)), dispatcher=RecordingDispatcher()) as client:
            spec = client.get("/openapi.json").json()
    return [(method.upper(), path) for path, ops in spec["paths"].items() for method in ops]


OPERATIONS = _operations()


def _raised_by_multipart_encoder(exc: BaseException) -> bool:
    frames = traceback.extract_tb(exc.__traceback__)
    return bool(frames) and "_multipart.py" in frames[-1].filename and "httpx" in frames[-1].filename


def _tame(case, ids: dict, use_real_ids: bool, model: int) -> None:
    """Point some cases at real resources; keep generation small."""
    if use_real_ids and (case.method.upper(), case.path) not in KEEP_REAL_IDS_OUT_OF:
        for name in list(case.path_parameters or {}):
            if name in ids:
                case.path_parameters[name] = ids[name]
    if case.path in ("/v1/chat/completions", "/v1/completions") and isinstance(case.body, dict):
        if use_real_ids:
            case.body["model"] = ids["models"][model]
        for name in ("max_tokens", "max_completion_tokens"):
            if isinstance(case.body.get(name), int) and not isinstance(case.body.get(name), bool):
                case.body[name] = max(1, min(case.body[name], 4))
        if isinstance(case.body.get("n"), int) and not isinstance(case.body.get("n"), bool):
            case.body["n"] = max(1, min(case.body["n"], 2))


@pytest.mark.parametrize("key_kind", list(KEYS))
@pytest.mark.parametrize(("method", "path"), OPERATIONS, ids=[f"{m} {p}" for m, p in OPERATIONS])
def test_no_server_error_and_no_schema_violation(world, method, path, key_kind):
    client, schema, ids = world
    operation = schema[path][method]
    modes = [schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE]
    strategy = st.one_of(*[operation.as_strategy(generation_mode=mode) for mode in modes])

    @settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
        derandomize=True,
    )
    @given(case=strategy, use_real_ids=st.booleans(), model=st.integers(0, 2))
    def run(case, use_real_ids, model):
        _tame(case, ids, use_real_ids, model)
        headers = {"Authorization": f"Bearer {KEYS[key_kind]}"}
        kwargs = case.as_transport_kwargs(base_url="http://testserver", headers=headers)
        kwargs.pop("base_url", None)
        try:
            response = client.request(**kwargs)
            response.request.read()  # multipart bodies are streamed; the checks want them in memory
        except (TypeError, AttributeError) as exc:
            # A generated multipart part (an int where a file goes) that the HTTP client cannot
            # encode never reaches the server; anything raised by the app itself still fails.
            if not _raised_by_multipart_encoder(exc):
                raise
            reject()
        STATUSES.setdefault((method, path, key_kind), []).append(response.status_code)
        case.validate_response(response, checks=CHECKS)

    run()


def teardown_module():
    if os.environ.get("STEER_FUZZ_REPORT"):
        from collections import Counter

        for key, codes in sorted(STATUSES.items()):
            print(key, dict(Counter(codes)))
