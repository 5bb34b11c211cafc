"""Auth and isolation: keys are required, stored hashed, and a user key reaches only its user."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import func, select

from core.db import ApiKey, Job, Sample, User
from tests.support.api import ADMIN, RecordingDispatcher, api_client, bearer, make_settings, onboard


@pytest.fixture
def client(tmp_path: Path):
    with api_client(make_settings(tmp_path), dispatcher=RecordingDispatcher()) as client:
        yield client


def _ctx(client):
    return client.app.state.ctx


def test_missing_or_invalid_key_is_401_in_openai_error_format(client):
    for headers in ({}, {"Authorization": "Bearer sk-steer-nope"}, {"Authorization": "Basic abc"}):
        response = client.get("/v1/users", headers=headers)
        assert response.status_code == 401
        error = response.json()["error"]
        assert error["type"] == "authentication_error"
        assert set(error) == {"message", "type", "param", "code"}


def test_onboarding_returns_a_working_user_key_that_is_stored_only_hashed(client):
    body = onboard(client, "alice")
    key = body["api_key"]
    assert key.startswith("sk-steer-") and body["job"]["status"] == "queued"
    assert client.app.state.dispatcher.submitted == [body["job"]["id"]]
    me = client.get(f"/v1/users/{body['user']['id']}", headers=bearer(key))
    assert me.status_code == 200 and me.json()["external_id"] == "alice"
    with _ctx(client).session_factory() as session:
        hashes = session.execute(select(ApiKey.key_hash)).scalars().all()
    assert len(hashes) == 1 and key not in hashes[0] and hashes[0] != key


def test_user_key_is_refused_on_admin_endpoints(client):
    key = onboard(client, "alice")["api_key"]
    response = client.post("/v1/onboarding", headers=bearer(key), json={"external_id": "mallory", "samples": ["x"]})
    assert response.status_code == 403
    assert client.post("/v1/admin/retrain", headers=bearer(key), json={"all": True}).status_code == 403
    with _ctx(client).session_factory() as session:
        assert session.execute(select(User.external_id)).scalars().all() == ["alice"]


def test_a_user_key_sees_nothing_of_another_user(client):
    alice = onboard(client, "alice")
    bob = onboard(client, "bob")
    key = alice["api_key"]
    bob_id, bob_job = bob["user"]["id"], bob["job"]["id"]
    with _ctx(client).session_factory() as session:
        bob_sample = session.execute(select(Sample.id).where(Sample.user_id == bob_id)).scalars().first()
    hidden = [
        ("get", f"/v1/users/{bob_id}"),
        ("get", f"/v1/users/{bob_id}/samples"),
        ("get", f"/v1/users/{bob_id}/prefixes"),
        ("post", f"/v1/users/{bob_id}/samples"),
        ("delete", f"/v1/users/{bob_id}/samples/{bob_sample}"),
        ("delete", f"/v1/users/{bob_id}"),
        ("get", f"/v1/fine_tuning/jobs/{bob_job}"),
        ("get", f"/v1/fine_tuning/jobs/{bob_job}/events"),
        ("post", f"/v1/fine_tuning/jobs/{bob_job}/cancel"),
    ]
    for method, path in hidden:
        kwargs = {"json": {"samples": ["sneaky"]}} if method == "post" and "samples" in path else {}
        response = client.request(method, path, headers=bearer(key), **kwargs)
        assert response.status_code == 404, (method, path, response.text)
        # Same answer as for an id that never existed: existence is not revealed.
        assert response.json()["error"]["type"] == "not_found_error"
    created = client.post("/v1/fine_tuning/jobs", headers=bearer(key), json={"user": bob_id})
    assert created.status_code == 404
    listed = client.get("/v1/fine_tuning/jobs", headers=bearer(key)).json()["data"]
    assert [job["id"] for job in listed] == [alice["job"]["id"]]
    assert [u["external_id"] for u in client.get("/v1/users", headers=bearer(key)).json()["data"]] == ["alice"]
    with _ctx(client).session_factory() as session:
        assert session.execute(select(func.count()).select_from(Sample).where(Sample.user_id == bob_id)).scalar() == 4
        assert session.get(Job, bob_job).status == "queued"
        assert session.get(User, bob_id) is not None


def test_deleted_user_key_stops_working(client):
    alice = onboard(client, "alice")
    key, user_id = alice["api_key"], alice["user"]["id"]
    assert client.delete(f"/v1/users/{user_id}", headers=bearer(key)).json()["deleted"] is True
    assert client.get(f"/v1/users/{user_id}", headers=bearer(key)).status_code == 401
    assert client.get(f"/v1/users/{user_id}", headers=ADMIN).status_code == 404


def test_admin_endpoints_are_disabled_without_an_admin_key(tmp_path: Path):
    settings = make_settings(tmp_path, admin_key=None, redis_url=None)
    # Embedded mode without a key and without a stored one: nobody is admin.
    with api_client(settings, dispatcher=RecordingDispatcher()) as client:
        response = client.post("/v1/onboarding", headers=ADMIN, json={"external_id": "a", "samples": ["x"]})
        assert response.status_code == 401


def test_embedded_generated_admin_key_is_stored_hashed_and_survives_restart(tmp_path: Path):
    from core.service.admin_key import admin_key_file, ensure_embedded_admin_key

    settings = make_settings(tmp_path, admin_key=None)
    key = ensure_embedded_admin_key(settings)
    assert key is not None and ensure_embedded_admin_key(settings) is None  # printed only once
    assert key not in admin_key_file(settings).read_text()
    for _restart in range(2):
        with api_client(settings, dispatcher=RecordingDispatcher()) as client:
            assert client.get("/v1/users", headers=bearer(key)).status_code == 200
