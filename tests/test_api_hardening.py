"""What an outside probe of the newer surfaces found (issue 26), each as the guarantee it broke.

Model strings cost a bounded number of lookups whatever their length; cursors and version numbers
past 64 bits are 400s, not 500s; an empty `training_file` is refused; a streamed body over the cap
is a 413 on every route; every model id `/v1/models` lists can be retrieved; a user key's stored
files are bounded in count and bytes, and listing them reads no file's bytes; file names carry no
control characters (on PostgreSQL too); a refused model costs no rate quota; parameters this server
does not serve are refused by name; the console forbids framing and foreign scripts.
"""

from __future__ import annotations

import json
import re
from contextlib import contextmanager
from pathlib import Path

import hypothesis
import pytest
from hypothesis import strategies as st
from sqlalchemy import event, func, select

from core.db import Job
from core.db.migrate import upgrade_to_head
from core.db.models import File
from core.inference.catalog import resolve_model
from core.service.api_keys import Caller
from core.service.errors import InvalidInput
from tests.support.api import ADMIN, RecordingDispatcher, api_client, bearer, make_settings, onboard
from tests.support.inference import TestUser, publish_random_prefix

UPLOAD_LIMIT = 20_000
FILES_PER_USER = 3
FILE_BYTES_PER_USER = 3_000


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    settings = make_settings(
        tmp_path_factory.mktemp("hardening"),
        max_upload_bytes=UPLOAD_LIMIT,
        user_requests_per_minute=2,
    )
    with api_client(settings, dispatcher=RecordingDispatcher()) as client:
        body = onboard(client, "alice")
        ctx = client.app.state.ctx
        base = ctx.base_model()
        alice = TestUser("alice", body["user"]["id"], body["api_key"])
        version = publish_random_prefix(ctx, base, alice, seed=1, prefix_len=2)
        created = client.post("/v1/controls", headers=ADMIN, json={"name": "brief", "samples": ["Short.", "Brief."]})
        assert created.status_code == 201, created.text
        control_id = created.json()["control"]["id"]
        publish_random_prefix(ctx, base, TestUser("control:brief", control_id, ""), seed=2, prefix_len=2)
        yield client, alice, body["job"]["id"], version


@contextmanager
def counted_queries(client):
    """The SQL statements the app runs inside the block."""
    statements: list[str] = []

    def record(conn, cursor, statement, *args):
        statements.append(statement)

    engine = client.app.state.ctx.engine
    event.listen(engine, "before_cursor_execute", record)
    try:
        yield statements
    finally:
        event.remove(engine, "before_cursor_execute", record)


def _error(response, status: int) -> dict:
    assert response.status_code == status, (response.status_code, response.text[:300])
    error = response.json()["error"]
    assert error["message"]
    return error


# -- 1. the model-string grammar ----------------------------------------------------------------


@pytest.mark.parametrize("parts", [10, 500])
def test_a_long_control_chain_costs_a_bounded_number_of_lookups(world, parts):
    client, alice, _, _ = world
    body = {"model": "user:alice" + "+a" * parts, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    with counted_queries(client) as statements:
        error = _error(client.post("/v1/chat/completions", headers=bearer(alice.key), json=body), 400)
    assert error["param"] == "model" and "at most 4 controls" in error["message"]
    # authentication, then at most one lookup per cut that leaves <= 4 controls (a query per cut before)
    assert len(statements) <= 12, len(statements)


def test_the_model_parser_itself_is_bounded_whatever_the_chain_length(world):
    """Behind the length cap too: 30,000 parts resolve with as few lookups as ten."""
    client, alice, _, _ = world
    base = client.app.state.ctx.base_model().model_id
    counts = []
    for parts in (10, 30_000):
        with counted_queries(client) as statements, client.app.state.ctx.session_factory() as session:
            with pytest.raises(InvalidInput, match="at most 4 controls"):
                resolve_model(session, Caller(is_admin=False, user_id=alice.user_id), "user:alice" + "+a" * parts, base)
        counts.append(len(statements))
    assert counts[1] <= counts[0] <= 6, counts


def test_a_model_string_longer_than_any_model_id_is_refused_before_it_is_parsed(world):
    client, alice, _, _ = world
    body = {"model": "user:alice" + "+a" * 600, "messages": [{"role": "user", "content": "hi"}]}
    with counted_queries(client) as statements:
        error = _error(client.post("/v1/chat/completions", headers=bearer(alice.key), json=body), 400)
    assert error["param"] == "model"
    assert len(error["message"]) < 500  # the message does not mirror the string
    assert not any("prefix_versions" in s for s in statements)


def test_a_chain_within_the_bounds_still_composes(world):
    client, alice, _, _ = world
    body = {"model": "user:alice+brief", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    assert client.post("/v1/chat/completions", headers=ADMIN, json=body).status_code == 200


# -- 2, 3. integers past 64 bits ----------------------------------------------------------------


@pytest.mark.parametrize("cursor", ["ftevent-²", "ftevent-¹²", "ftevent-٣", f"ftevent-{2**63}", f"ftevent-{10**30}"])
def test_an_events_cursor_of_unicode_digits_or_past_64_bits_is_a_400(world, cursor):
    client, alice, job_id, _ = world
    error = _error(client.get(f"/v1/fine_tuning/jobs/{job_id}/events", params={"after": cursor}, headers=ADMIN), 400)
    assert error["param"] == "after"
    # the connection is still good for the next request
    assert client.get(f"/v1/fine_tuning/jobs/{job_id}/events", headers=bearer(alice.key)).status_code == 200


@pytest.mark.parametrize("number", [2**63, 2**64, 10**30, 0, -1])
def test_a_version_number_out_of_range_in_an_activate_route_is_a_400(world, number):
    client, alice, _, _ = world
    user_route = f"/v1/users/{alice.user_id}/prefixes/{number}/activate"
    assert _error(client.post(user_route, headers=bearer(alice.key)), 400)["param"] == "version"
    assert _error(client.post(f"/v1/controls/brief/versions/{number}/activate", headers=ADMIN), 400)["param"] == (
        "version"
    )


# -- 4. an empty training file ------------------------------------------------------------------


@pytest.mark.parametrize("field", ["training_file", "validation_file"])
def test_an_empty_file_id_is_a_400_and_creates_no_job(world, field):
    client, alice, _, _ = world
    with client.app.state.ctx.session_factory() as session:
        jobs = session.scalar(select(func.count()).select_from(Job))
    body = {"model": "user:alice", field: ""}
    if field == "validation_file":
        body["training_file"] = None
    error = _error(client.post("/v1/fine_tuning/jobs", headers=bearer(alice.key), json=body), 400)
    assert error["param"] == field and "must be a file id" in error["message"]
    with client.app.state.ctx.session_factory() as session:
        assert session.scalar(select(func.count()).select_from(Job)) == jobs


# -- 5. a streamed body over the cap ------------------------------------------------------------


def _chunks(total: int, chunk: int = 4096):
    sent = 0
    while sent < total:
        yield b"x" * min(chunk, total - sent)
        sent += chunk


@pytest.mark.parametrize(
    "route, content_type",
    [
        ("/v1/files", "multipart/form-data; boundary=zzz"),
        ("/v1/fine_tuning/jobs", "application/json"),
        ("/v1/admin/population", "application/json"),
        ("/v1/admin/retrain", "application/json"),
        ("/v1/onboarding", "application/json"),
    ],
)
def test_a_chunked_body_over_the_cap_is_a_413_on_every_route(world, route, content_type):
    client, _, _, _ = world
    headers = {**ADMIN, "content-type": content_type}
    response = client.post(route, headers=headers, content=_chunks(UPLOAD_LIMIT * 3))
    assert "content-length" not in response.request.headers  # streamed: nothing declared its size
    error = _error(response, 413)
    assert error["code"] == "payload_too_large"


# -- 6. every listed model can be retrieved -----------------------------------------------------


def test_every_model_id_that_models_lists_or_completions_accept_can_be_retrieved(world):
    client, alice, _, version = world
    base = client.app.state.ctx.base_model().model_id
    for key in (alice.key, ADMIN.get("Authorization").removeprefix("Bearer ")):
        listed = [m["id"] for m in client.get("/v1/models", headers=bearer(key)).json()["data"]]
        assert listed
        for model_id in listed:
            response = client.get(f"/v1/models/{model_id}", headers=bearer(key))
            assert response.status_code == 200, (model_id, response.text)
            assert response.json()["id"] == model_id
    listed_by_alice = [m["id"] for m in client.get("/v1/models", headers=bearer(alice.key)).json()["data"]]
    assert "user:alice+brief" in listed_by_alice
    control_version = client.get("/v1/controls/brief/versions", headers=ADMIN).json()["data"][0]["version"]
    accepted = [f"control:brief:v{control_version}", f"ft:{base}:alice:v{version}+brief", "user:alice+brief"]
    for model_id in accepted:
        entry = client.get(f"/v1/models/{model_id}", headers=bearer(alice.key))
        assert entry.status_code == 200, (model_id, entry.text)
        owner = "steer" if model_id.startswith("control:") else "alice"
        assert entry.json()["owned_by"] == owner
    # and what is not a model stays a 404, composed or not
    for missing in ["user:alice+nosuch", "user:bob+brief", "control:brief:v999", f"{base}+nosuch", "user:alice+a+a"]:
        assert client.get(f"/v1/models/{missing}", headers=bearer(alice.key)).status_code == 404, missing


# -- 7 and the file names: a user key's stored files ----------------------------------------------


@pytest.fixture(params=["sqlite", "postgres"])
def files_app(request, tmp_path: Path):
    overrides = {"max_files_per_user": FILES_PER_USER, "max_file_bytes_per_user": FILE_BYTES_PER_USER}
    if request.param == "postgres":
        url = request.getfixturevalue("fresh_postgres_database")
        upgrade_to_head(url)
        overrides["database_url"] = url
    with api_client(make_settings(tmp_path, **overrides), dispatcher=RecordingDispatcher()) as client:
        yield client, onboard(client, "filer")["api_key"]


def _upload(client, key: str, name: str, content: bytes, **extra):
    files = extra.pop("files", None) or {"file": (name, content, "application/octet-stream")}
    return client.post("/v1/files", headers=bearer(key), data={"purpose": "fine-tune"}, files=files)


def _jsonl(size: int) -> bytes:
    line = json.dumps({"text": "A sample of my own writing, long enough to count."}).encode() + b"\n"
    return line * max(1, size // len(line))


def _stored(client) -> tuple[int, int]:
    with client.app.state.ctx.session_factory() as session:
        return session.execute(select(func.count(File.id), func.coalesce(func.sum(File.bytes), 0))).one()


def test_a_user_key_stores_a_bounded_count_and_size_of_files(files_app):
    client, key = files_app
    for number in range(FILES_PER_USER):
        assert _upload(client, key, f"f{number}.jsonl", _jsonl(300)).status_code == 200
    before = _stored(client)
    error = _error(_upload(client, key, "one-more.jsonl", _jsonl(300)), 400)
    assert error["code"] == "storage_limit_exceeded" and "STEER_MAX_FILES_PER_USER" in error["message"]
    assert _stored(client) == before
    # deleting one makes room again; bytes are bounded too
    first = client.get("/v1/files", headers=bearer(key)).json()["data"][0]["id"]
    assert client.delete(f"/v1/files/{first}", headers=bearer(key)).status_code == 200
    error = _error(_upload(client, key, "big.jsonl", _jsonl(FILE_BYTES_PER_USER)), 400)
    assert error["code"] == "storage_limit_exceeded" and "STEER_MAX_FILE_BYTES_PER_USER" in error["message"]
    assert _upload(client, key, "small.jsonl", _jsonl(300)).status_code == 200
    # the admin's own uploads belong to no user and are not counted against one
    assert _upload(client, ADMIN["Authorization"].removeprefix("Bearer "), "admin.jsonl", _jsonl(300)).status_code == (
        200
    )


def test_listing_files_reads_no_file_content(files_app):
    client, key = files_app
    assert _upload(client, key, "f.jsonl", _jsonl(500)).status_code == 200
    with counted_queries(client) as statements:
        listing = client.get("/v1/files", headers=bearer(key))
        one = client.get(f"/v1/files/{listing.json()['data'][0]['id']}", headers=bearer(key))
    assert listing.status_code == 200 and one.status_code == 200
    reads = [s for s in statements if re.search(r"\bFROM files\b", s)]
    assert reads and not any(re.search(r"files\.data\b", s) for s in reads), reads
    content = client.get(f"/v1/files/{one.json()['id']}/content", headers=bearer(key))
    assert content.content == _jsonl(500)  # the bytes are still there when asked for


@pytest.mark.parametrize("name", ["a\x00b.jsonl", "a\nb.jsonl", "a\x1b[31mb.jsonl", "a\u2028b.jsonl", "a\u202eb.jsonl"])
def test_a_file_name_with_control_characters_is_a_400_and_stores_nothing(files_app, name):
    """The multipart body is written by hand: httpx would percent-encode the name, a raw client need not."""
    client, key = files_app
    body = (
        b'--zzz\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nfine-tune\r\n'
        b'--zzz\r\nContent-Disposition: form-data; name="file"; filename="' + name.encode() + b'"\r\n'
        b"Content-Type: application/octet-stream\r\n\r\n" + _jsonl(200) + b"\r\n--zzz--\r\n"
    )
    headers = {**bearer(key), "content-type": "multipart/form-data; boundary=zzz"}
    response = client.post("/v1/files", headers=headers, content=body)
    error = _error(response, 400)
    assert error["param"] == "file" and "control characters" in error["message"]
    assert _stored(client) == (0, 0)


def test_an_upload_with_several_file_parts_is_a_400_not_the_last_one_silently(files_app):
    client, key = files_app
    parts = [("file", ("a.jsonl", _jsonl(200), "application/octet-stream"))] * 2
    error = _error(_upload(client, key, "", b"", files=parts), 400)
    assert error["param"] == "file"
    assert _stored(client) == (0, 0)


# -- suspected, confirmed: quotas, loose typing, console headers ---------------------------------


def test_a_request_refused_for_its_model_costs_no_rate_quota(world):
    """Two requests a minute for alice's key: five 404s first, and both real requests still pass."""
    client, alice, _, _ = world
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    for _ in range(5):
        _error(
            client.post("/v1/chat/completions", headers=bearer(alice.key), json={**body, "model": "user:nobody"}), 404
        )
    for _ in range(2):
        answer = client.post("/v1/chat/completions", headers=bearer(alice.key), json={**body, "model": "user:alice"})
        assert answer.status_code == 200, answer.text
    _error(client.post("/v1/chat/completions", headers=bearer(alice.key), json={**body, "model": "user:alice"}), 429)


@pytest.mark.parametrize(
    "extra, param",
    [
        ({"stream": "yes"}, "stream"),
        ({"stream": 1}, "stream"),
        ({"logprobs": True}, "logprobs"),
        ({"top_logprobs": 3}, "top_logprobs"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"logit_bias": {"42": 100}}, "logit_bias"),
    ],
)
def test_a_parameter_this_server_does_not_serve_is_refused_by_name(world, extra, param):
    client, _, _, _ = world
    body = {"model": "user:alice", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **extra}
    assert _error(client.post("/v1/chat/completions", headers=ADMIN, json=body), 400)["param"] == param


@pytest.mark.parametrize("extra", [{"best_of": 2}, {"suffix": "end"}, {"logprobs": 2}, {"echo": "yes"}])
def test_a_legacy_completion_parameter_it_does_not_serve_is_refused_by_name(world, extra):
    client, _, _, _ = world
    body = {"model": "user:alice", "prompt": "hi", "max_tokens": 2, **extra}
    assert _error(client.post("/v1/completions", headers=ADMIN, json=body), 400)["param"] == next(iter(extra))


def test_the_values_of_those_parameters_that_ask_for_nothing_are_accepted(world):
    client, _, _, _ = world
    harmless = {"logprobs": False, "tools": [], "response_format": {"type": "text"}, "logit_bias": {}, "stream": False}
    body = {"model": "user:alice", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **harmless}
    assert client.post("/v1/chat/completions", headers=ADMIN, json=body).status_code == 200


def test_the_console_forbids_framing_sniffing_and_foreign_scripts(world):
    client, _, _, _ = world
    for path in ("/console/", "/console/console.js"):
        headers = client.get(path).headers
        policy = headers["content-security-policy"]
        assert "frame-ancestors 'none'" in policy and "default-src 'self'" in policy
        assert "'unsafe-inline'" not in policy
        assert headers["x-frame-options"] == "DENY" and headers["x-content-type-options"] == "nosniff"


# -- every integer parameter of every route, at and past its bounds -------------------------------

BOUNDARY_INTEGERS = [0, -1, 1, 2**31 - 1, 2**31, 2**63 - 1, 2**63, 2**64, -(2**63) - 1, 10**30, -(10**30)]
# A request each route accepts, so that the integer under test is what decides the answer.
GOOD_BODIES = {
    "/v1/chat/completions": {"model": "user:alice", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
    "/v1/completions": {"model": "user:alice", "prompt": "hi", "max_tokens": 2},
    "/v1/fine_tuning/jobs": {"model": "user:alice"},
}


def _integer_parameters(schema: dict) -> list[tuple[str, str, str, str]]:
    """(method, path, where, name) of every integer in a path, a query or a JSON body's top level,
    read from the published OpenAPI document (so a new route is covered without touching this)."""
    components = schema["components"]["schemas"]

    def resolved(node: dict) -> dict:
        while "$ref" in node:
            node = components[node["$ref"].rsplit("/", 1)[-1]]
        return node

    def is_integer(node: dict) -> bool:
        node = resolved(node)
        return node.get("type") == "integer" or any(is_integer(n) for n in node.get("anyOf", []))

    found = []
    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            for parameter in operation.get("parameters", []):
                if is_integer(parameter.get("schema", {})):
                    found.append((method, path, parameter["in"], parameter["name"]))
            body = operation.get("requestBody", {}).get("content", {}).get("application/json", {})
            for name, node in resolved(body.get("schema", {})).get("properties", {}).items():
                node = resolved(node)
                if is_integer(node):
                    found.append((method, path, "body", name))
                elif node.get("type") == "array" and is_integer(node.get("items", {})):
                    found.append((method, path, "body[]", name))
    return found


def test_every_integer_path_and_query_parameter_declares_its_bounds(world):
    client, _, _, _ = world
    schema = client.get("/openapi.json").json()
    for method, path, where, name in _integer_parameters(schema):
        if where in ("path", "query"):
            operation = schema["paths"][path][method]
            (parameter,) = [p for p in operation["parameters"] if p["name"] == name]
            bounds = parameter["schema"]
            assert "minimum" in bounds and bounds.get("maximum", 2**63) < 2**63, (method, path, name, bounds)


def test_no_integer_parameter_of_any_route_answers_a_server_error(world):
    """Every integer the schema declares, at the 32/64-bit edges and at random, never answers 5xx."""
    client, alice, job_id, _ = world
    cases = _integer_parameters(client.get("/openapi.json").json())
    assert {(p, n) for _, p, _, n in cases} >= {
        ("/v1/users/{user_id}/prefixes/{version}/activate", "version"),
        ("/v1/fine_tuning/jobs/{job_id}/events", "limit"),
        ("/v1/chat/completions", "seed"),
        ("/v1/admin/population", "samples_per_user"),
    }
    ids = {"user_id": alice.user_id, "job_id": job_id, "name": "brief", "model": "user:alice"}

    @hypothesis.settings(max_examples=150, deadline=None, suppress_health_check=list(hypothesis.HealthCheck))
    @hypothesis.given(
        case=st.sampled_from(cases), value=st.one_of(st.sampled_from(BOUNDARY_INTEGERS), st.integers(-(2**70), 2**70))
    )
    def check(case, value):
        method, path, where, name = case
        url = re.sub(r"\{(\w+)\}", lambda m: str(value) if m.group(1) == name else ids.get(m.group(1), "x"), path)
        params = {name: value} if where == "query" else None
        body = None
        if where.startswith("body"):
            body = {**GOOD_BODIES.get(path, {}), name: [value] if where == "body[]" else value}
        response = client.request(method.upper(), url, headers=ADMIN, params=params, json=body)
        assert response.status_code < 500, (method, url, params, body, response.status_code, response.text[:300])

    check()
