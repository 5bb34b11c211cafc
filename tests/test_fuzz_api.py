"""Property-based fuzzing of every endpoint from the app's own OpenAPI schema (schemathesis).

For each operation, with the admin key, a user's key and an invalid key, schemathesis generates
valid and invalid requests; every answer must be a non-5xx status the schema declares, with a body
that matches the declared schema: success bodies (`api/responses.py`, and each server-sent event
of a streamed completion) as much as errors. Generated path ids are sometimes swapped for real ones
(so the fuzzer reaches existing users, samples and jobs) and generated completions are kept short
(so generation does not dominate the run).

Generation alone reaches a success of only some operations, so each operation is also called once
with a known-good request and its success checked the same way; and the published document itself
must give every success answer of every operation a schema (an untyped route fails here).
"""

from __future__ import annotations

import json
import os
import tempfile
import traceback
from pathlib import Path
from typing import Any, get_args

import pytest
import schemathesis
from hypothesis import HealthCheck, given, reject, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import FailureGroup
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from sqlalchemy import select

from api import responses
from core.db import Sample
from core.db.models import JOB_KINDS, JOB_STATUSES, PREFIX_STATUSES
from tests.support.api import ADMIN_KEY, SAMPLES, RecordingDispatcher, api_client, bearer, make_settings, onboard
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


def _published_schema() -> dict:
    # From a throwaway app: the schema does not depend on the data.
    with tempfile.TemporaryDirectory() as tmp:
        with api_client(make_settings(Path(tmp)), dispatcher=RecordingDispatcher()) as client:
            return client.get("/openapi.json").json()


SPEC = _published_schema()
OPERATIONS = [(method.upper(), path) for path, ops in SPEC["paths"].items() for method in ops]


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
        if case.body.get("max_tokens") is None and case.body.get("max_completion_tokens") is None:
            case.body["max_tokens"] = 4  # not the default 256 (a streamed one ran into the deadline)
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


# -- every success answer is typed -----------------------------------------------------------------

# Media types a success may have besides JSON, and where.
EVENT_STREAM_OPERATIONS = {("POST", "/v1/chat/completions"), ("POST", "/v1/completions")}
PLAIN_TEXT_OPERATIONS = {("GET", "/metrics"), ("GET", "/v1/files/{file_id}/content")}


def _refs(node: Any):
    if isinstance(node, dict):
        if isinstance(node.get("$ref"), str):
            yield node["$ref"]
        for value in node.values():
            yield from _refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from _refs(value)


def test_the_schema_types_every_success_answer():
    components = SPEC.get("components", {}).get("schemas", {})
    untyped = []
    for method, path in OPERATIONS:
        operation = SPEC["paths"][path][method.lower()]
        successes = {status: r for status, r in operation["responses"].items() if status.startswith("2")}
        if not successes:
            untyped.append(f"{method} {path}: no 2xx response declared")
        for status, response in successes.items():
            content = response.get("content") or {}
            if not content:
                untyped.append(f"{method} {path} {status}: no content")
            for media_type, media in content.items():
                schema = media.get("schema") or {}
                where = f"{method} {path} {status} {media_type}"
                if media_type == "application/json":
                    if "$ref" not in schema or schema["$ref"].removeprefix("#/components/schemas/") not in components:
                        untyped.append(f"{where}: not a named model ({schema})")
                elif media_type == "text/event-stream" and (method, path) in EVENT_STREAM_OPERATIONS:
                    if "data" not in schema.get("properties", {}):
                        untyped.append(f"{where}: the events' data is not described ({schema})")
                elif media_type == "text/plain" and (method, path) in PLAIN_TEXT_OPERATIONS:
                    if schema.get("type") != "string":
                        untyped.append(f"{where}: not a string")
                else:
                    untyped.append(f"{where}: unexpected media type")
    assert not untyped, "\n".join(untyped)
    dangling = {ref for ref in _refs(SPEC) if ref.removeprefix("#/components/schemas/") not in components}
    assert not dangling


def test_response_enumerations_match_the_database():
    assert get_args(responses.JobKind) == JOB_KINDS
    assert get_args(responses.JobStatus) == JOB_STATUSES
    assert get_args(responses.PrefixStatus) == PREFIX_STATUSES


@pytest.fixture(scope="module")
def fresh(tmp_path_factory):
    """An app of its own (the fuzzer's world is left in any state), with its schemathesis schema."""
    # Feedback on: its route's success needs a stored completion.
    app_settings = make_settings(tmp_path_factory.mktemp("typed"), request_timeout_s=60, feedback_enabled=True)
    with api_client(app_settings, dispatcher=RecordingDispatcher()) as client:
        yield client, schemathesis.openapi.from_dict(client.get("/openapi.json").json())


class Calls:
    """Sends one request as a schemathesis case and runs the fuzzer's checks on the answer."""

    def __init__(self, client, schema):
        self.client, self.schema, self.called = client, schema, set()

    def case(self, method: str, path: str, path_parameters=None, query=None, body=None, media_type="application/json"):
        extra: dict[str, Any] = {} if body is None else {"body": body, "media_type": media_type}
        return self.schema[path][method].Case(path_parameters=path_parameters or {}, query=query or {}, **extra)

    def send(self, case, key: str):
        kwargs = case.as_transport_kwargs(base_url="http://testserver", headers={"Authorization": f"Bearer {key}"})
        kwargs.pop("base_url", None)
        return self.client.request(**kwargs)

    def __call__(self, method: str, path: str, status: int, key: str = ADMIN_KEY, **parts):
        case = self.case(method, path, **parts)
        response = self.send(case, key)
        assert response.status_code == status, f"{method} {path}: {response.status_code} {response.text}"
        case.validate_response(response, checks=CHECKS)
        self.called.add((method, path))
        return response


def _events(response) -> list[str]:
    assert response.headers["content-type"].startswith("text/event-stream")
    return [line.removeprefix("data: ") for line in response.text.split("\n\n") if line]


def test_every_operation_answers_a_success_that_matches_its_schema(fresh):
    client, schema = fresh
    call = Calls(client, schema)
    for path in ("/healthz", "/readyz", "/metrics"):
        call("GET", path, 200)
    body = call("POST", "/v1/onboarding", 201, body={"external_id": "typed-user", "samples": SAMPLES}).json()
    user_id, key, job_id = body["user"]["id"], body["api_key"], body["job"]["id"]
    ctx = client.app.state.ctx
    base = ctx.base_model()
    version = publish_random_prefix(ctx, base, TestUser("typed-user", user_id, key), seed=2, prefix_len=2)
    user = {"user_id": user_id}

    call("GET", "/v1/users", 200, query={"external_id": "typed-user"})
    call("GET", "/v1/users/{user_id}", 200, key=key, path_parameters=user)
    spare = call("POST", "/v1/users/{user_id}/api_keys", 201, path_parameters=user).json()["key"]
    listed = call("GET", "/v1/users/{user_id}/api_keys", 200, key=key, path_parameters=user).json()["data"]
    spare_id = next(k["id"] for k in listed if spare.startswith(k["prefix"]))
    key_path = {**user, "key_id": spare_id}
    rotated = call("POST", "/v1/users/{user_id}/api_keys/{key_id}/rotate", 201, key=spare, path_parameters=key_path)
    revoke = {**user, "key_id": rotated.json()["api_key"]["id"]}
    call("DELETE", "/v1/users/{user_id}/api_keys/{key_id}", 200, key=rotated.json()["key"], path_parameters=revoke)
    call("GET", "/v1/users/{user_id}/prefixes", 200, key=key, path_parameters=user)
    call("POST", "/v1/users/{user_id}/prefixes/{version}/activate", 200, path_parameters={**user, "version": version})
    call("GET", "/v1/users/{user_id}/samples", 200, key=key, path_parameters=user, query={"limit": 2})
    added = call(
        "POST",
        "/v1/users/{user_id}/samples",
        201,
        key=key,
        path_parameters=user,
        body={"samples": ["One more sample, written for the schema test.", SAMPLES[0]]},
    ).json()
    assert added["duplicates"] == 1
    sample = {**user, "sample_id": added["data"][0]["id"]}
    call("DELETE", "/v1/users/{user_id}/samples/{sample_id}", 200, key=key, path_parameters=sample)

    call("GET", "/v1/fine_tuning/jobs", 200, key=key)
    call("GET", "/v1/fine_tuning/jobs/{job_id}", 200, path_parameters={"job_id": job_id})
    call("GET", "/v1/fine_tuning/jobs/{job_id}/events", 200, path_parameters={"job_id": job_id})
    retrain = call("POST", "/v1/fine_tuning/jobs", 201, key=key, body={"hyperparameters": {"n_epochs": 1}}).json()
    cancelled = call(
        "POST", "/v1/fine_tuning/jobs/{job_id}/cancel", 200, key=key, path_parameters={"job_id": retrain["id"]}
    )
    assert cancelled.json()["status"] == "cancelled"
    call("POST", "/v1/admin/retrain", 201, body={"user_ids": [user_id]})
    call("GET", "/v1/admin/workers", 200)
    call("POST", "/v1/onboarding", 201, body={"external_id": "typed-peer", "samples": SAMPLES[::-1]})  # 2 users
    population = call("POST", "/v1/admin/population", 201, body={"samples_per_user": 2}).json()
    assert (population["users"], population["control"]["model"]) == (2, "control:population")

    models = {m["id"] for m in call("GET", "/v1/models", 200, key=key).json()["data"]}
    assert {base.model_id, "user:typed-user"} <= models
    messages = [{"role": "user", "content": "Say hello."}]
    for model in (base.model_id, "user:typed-user"):
        chat = {"model": model, "messages": messages, "max_tokens": 3, "n": 2}
        answered = call("POST", "/v1/chat/completions", 200, key=key, body=chat).json()
        assert answered["object"] == "chat.completion"
        if model == "user:typed-user":
            edit = {"kind": "edited", "final_text": "Hello there, from the typed user.", "choice_index": 1}
            feedback = {"completion_id": answered["id"]}
            recorded = call(
                "POST",
                "/v1/chat/completions/{completion_id}/feedback",
                201,
                key=key,
                path_parameters=feedback,
                body=edit,
            )
            assert (recorded.json()["samples_added"], recorded.json()["pairs_added"]) == (1, 1)
        stream = {**chat, "stream": True, "stream_options": {"include_usage": True}}
        events = _events(call("POST", "/v1/chat/completions", 200, key=key, body=stream))
        assert events[-1] == "[DONE]" and json.loads(events[-2])["usage"]["completion_tokens"] > 0
        text = {"model": model, "prompt": "Once upon a time", "max_tokens": 3}
        assert call("POST", "/v1/completions", 200, key=key, body=text).json()["object"] == "text_completion"
        events = _events(call("POST", "/v1/completions", 200, key=key, body={**text, "stream": True}))
        assert events[-1] == "[DONE]" and len(events) > 2

    created = call("POST", "/v1/controls", 201, body={"name": "brief", "samples": ["Short.", "Noted."]}).json()
    control = TestUser("control:brief", created["control"]["id"], "")
    control_version = publish_random_prefix(ctx, base, control, seed=3, prefix_len=2)
    name = {"name": "brief"}
    assert [c["name"] for c in call("GET", "/v1/controls", 200, key=key).json()["data"]] == ["brief", "population"]
    assert call("GET", "/v1/controls/{name}", 200, key=key, path_parameters=name).json()["active_version"] == 1
    call("GET", "/v1/controls/{name}/versions", 200, key=key, path_parameters=name)
    call("POST", "/v1/controls/{name}/retrain", 201, path_parameters=name, body={"hyperparameters": {"max_steps": 1}})
    call(
        "POST",
        "/v1/controls/{name}/versions/{version}/activate",
        200,
        path_parameters={**name, "version": control_version},
    )
    text = {"model": "user:typed-user+brief", "prompt": "Once upon a time", "max_tokens": 3}
    assert call("POST", "/v1/completions", 200, key=key, body=text).json()["object"] == "text_completion"
    call("DELETE", "/v1/controls/{name}", 200, path_parameters=name)

    # A file part: sent by the test client itself (schemathesis would send the tuple as a field).
    line = b'{"text": "A line of the user\'s own writing."}\n'
    form = {"files": {"file": ("typed.jsonl", line)}, "data": {"purpose": "fine-tune"}}
    sent = client.post("/v1/files", headers=bearer(key), **form)
    assert sent.status_code == 200, sent.text
    call.case("POST", "/v1/files", body={"purpose": "fine-tune"}, media_type="multipart/form-data").validate_response(
        sent, checks=CHECKS
    )
    call.called.add(("POST", "/v1/files"))
    uploaded = sent.json()
    file = {"file_id": uploaded["id"]}
    call("GET", "/v1/files", 200, key=key)
    call("GET", "/v1/files/{file_id}", 200, key=key, path_parameters=file)
    assert "own writing" in call("GET", "/v1/files/{file_id}/content", 200, key=key, path_parameters=file).text
    call("DELETE", "/v1/files/{file_id}", 200, key=key, path_parameters=file)
    call("GET", "/v1/fine_tuning/jobs/{job_id}/checkpoints", 200, key=key, path_parameters={"job_id": job_id})
    version_id = f"ft:{base.model_id}:typed-user:v{version}"
    call("GET", "/v1/models/{model}", 200, key=key, path_parameters={"model": version_id})
    assert call("DELETE", "/v1/models/{model}", 200, key=key, path_parameters={"model": version_id}).json()["deleted"]

    call("DELETE", "/v1/users/{user_id}", 200, path_parameters=user)
    assert not set(OPERATIONS) - call.called, "operations without a success example here"


def _tampered(response, content: str):
    headers = {k: v for k, v in response.headers.items() if k.lower() != "content-length"}
    tampered = type(response)(response.status_code, headers=headers, content=content.encode(), request=response.request)
    tampered.elapsed = response.elapsed
    return tampered


def _assert_schema_violation(case, response) -> None:
    with pytest.raises(FailureGroup) as failed:
        case.validate_response(response, checks=CHECKS)
    titles = [failure.title for failure in failed.value.exceptions]
    assert any("violates" in title and "schema" in title for title in titles), titles


def test_the_checks_reject_a_success_body_off_its_schema(fresh):
    """The success schemas are not vacuous: a body one field off, or one event off, fails."""
    client, schema = fresh
    call = Calls(client, schema)
    user_id = call("POST", "/v1/onboarding", 201, body={"external_id": "tampered", "samples": SAMPLES}).json()["user"][
        "id"
    ]
    case = call.case("GET", "/v1/users/{user_id}", path_parameters={"user_id": user_id})
    response = call.send(case, ADMIN_KEY)
    case.validate_response(response, checks=CHECKS)
    good = response.json()
    for bad in (
        {**good, "surprise": 1},
        {k: v for k, v in good.items() if k != "fine_tuned_model"},
        {**good, "object": "users"},
        {**good, "created_at": "yesterday"},
    ):
        _assert_schema_violation(case, _tampered(response, json.dumps(bad)))

    body = {
        "model": client.app.state.ctx.base_model().model_id,
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 2,
        "stream": True,
    }
    case = call.case("POST", "/v1/chat/completions", body=body)
    response = call.send(case, ADMIN_KEY)
    case.validate_response(response, checks=CHECKS)
    first = json.loads(_events(response)[0])
    for bad in ({**first, "object": "chat.completion"}, {**first, "choices": [{"index": 0}]}):
        stream = response.text.replace(json.dumps(first, separators=(",", ":")), json.dumps(bad), 1)
        _assert_schema_violation(case, _tampered(response, stream))
