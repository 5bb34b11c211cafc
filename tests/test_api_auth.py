"""Auth and isolation: keys are required, stored hashed, and a user key reaches only its user."""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import func, select

from core.db import ApiKey, Job, Sample, User
from tests.support.api import ADMIN, ADMIN_KEY, RecordingDispatcher, api_client, bearer, make_settings, onboard


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


# -- listing, revoking and rotating keys -------------------------------------------------------------


def _keys(client, user_id: str, key: str = ADMIN_KEY):
    response = client.get(f"/v1/users/{user_id}/api_keys", headers=bearer(key))
    assert response.status_code == 200, response.text
    return response.json()["data"]


def test_a_users_keys_are_listed_by_prefix_and_times_never_the_key_to_admin_and_self_only(client):
    alice, bob = onboard(client, "alice"), onboard(client, "bob")
    user_id, key = alice["user"]["id"], alice["api_key"]
    second = client.post(f"/v1/users/{user_id}/api_keys", headers=ADMIN).json()["key"]
    for caller in (ADMIN_KEY, key):
        listed = _keys(client, user_id, caller)
        assert [k["prefix"] for k in listed] == [key[:17], second[:17]]
        assert all(k["user_id"] == user_id and k["revoked_at"] is None and k["created_at"] > 0 for k in listed)
        assert not any(key[17:25] in str(v) or second[17:25] in str(v) for k in listed for v in k.values())
    # Another user's keys, and a control's, are not found, exactly like a user that never existed.
    ghost = client.get("/v1/users/0123456789abcdef0123456789abcdef/api_keys", headers=bearer(key))
    theirs = client.get(f"/v1/users/{bob['user']['id']}/api_keys", headers=bearer(key))
    assert theirs.status_code == ghost.status_code == 404
    assert theirs.json()["error"]["message"].replace(bob["user"]["id"], "X") == ghost.json()["error"][
        "message"
    ].replace("0123456789abcdef0123456789abcdef", "X")
    bob_key_id = _keys(client, bob["user"]["id"])[0]["id"]
    for method, path in (
        ("DELETE", f"/v1/users/{bob['user']['id']}/api_keys/{bob_key_id}"),
        ("POST", f"/v1/users/{bob['user']['id']}/api_keys/{bob_key_id}/rotate"),
        # Bob's key through Alice's own path.
        ("DELETE", f"/v1/users/{user_id}/api_keys/{bob_key_id}"),
        ("POST", f"/v1/users/{user_id}/api_keys/{bob_key_id}/rotate"),
    ):
        assert client.request(method, path, headers=bearer(key)).status_code == 404, (method, path)
    assert client.get("/v1/users", headers=bearer(bob["api_key"])).status_code == 200


def test_a_revoked_key_answers_401_on_its_next_request_even_when_it_revoked_itself(client):
    alice = onboard(client, "alice")
    user_id, key = alice["user"]["id"], alice["api_key"]
    spare = client.post(f"/v1/users/{user_id}/api_keys", headers=ADMIN).json()["key"]
    own_id = _keys(client, user_id, key)[0]["id"]
    revoked = client.delete(f"/v1/users/{user_id}/api_keys/{own_id}", headers=bearer(key))
    assert revoked.status_code == 200, revoked.text
    assert revoked.json()["id"] == own_id and revoked.json()["revoked_at"] is not None
    answer = client.get(f"/v1/users/{user_id}", headers=bearer(key))
    assert answer.status_code == 401 and answer.json()["error"]["code"] == "invalid_api_key"
    assert client.post("/v1/completions", headers=bearer(key), json={"model": "x", "prompt": "y"}).status_code == 401
    # The other key of the same user still works; revoking again changes nothing.
    assert client.get(f"/v1/users/{user_id}", headers=bearer(spare)).status_code == 200
    again = client.delete(f"/v1/users/{user_id}/api_keys/{own_id}", headers=ADMIN)
    assert again.status_code == 200 and again.json()["revoked_at"] == revoked.json()["revoked_at"]
    assert client.delete(f"/v1/users/{user_id}/api_keys/nope", headers=ADMIN).status_code == 404


def test_rotation_issues_a_working_key_and_revokes_the_old_one_in_one_call(client):
    alice = onboard(client, "alice")
    user_id, old = alice["user"]["id"], alice["api_key"]
    old_id = _keys(client, user_id)[0]["id"]
    rotated = client.post(f"/v1/users/{user_id}/api_keys/{old_id}/rotate", headers=bearer(old))
    assert rotated.status_code == 201, rotated.text
    body = rotated.json()
    new = body["key"]
    assert new.startswith("sk-steer-") and new != old
    assert body["revoked"]["id"] == old_id and body["revoked"]["revoked_at"] is not None
    assert body["api_key"]["prefix"] == new[:17] and body["api_key"]["revoked_at"] is None
    assert client.get(f"/v1/users/{user_id}", headers=bearer(old)).status_code == 401
    assert client.get(f"/v1/users/{user_id}", headers=bearer(new)).status_code == 200
    # A revoked key cannot be rotated again (no second key from one old key).
    twice = client.post(f"/v1/users/{user_id}/api_keys/{old_id}/rotate", headers=ADMIN)
    assert twice.status_code == 409 and twice.json()["error"]["code"] == "conflict"
    assert [k["revoked_at"] is None for k in _keys(client, user_id)] == [False, True]
    with _ctx(client).session_factory() as session:
        assert session.execute(select(func.count()).select_from(ApiKey)).scalar_one() == 2


def test_last_used_at_is_recorded_at_most_once_a_minute_per_key(client):
    from sqlalchemy import event, update

    alice = onboard(client, "alice")
    user_id, key = alice["user"]["id"], alice["api_key"]
    assert _keys(client, user_id)[0]["last_used_at"] is None
    writes: list[str] = []

    def count(_conn, _cursor, statement, *_args):
        if statement.lstrip().upper().startswith("UPDATE API_KEYS"):
            writes.append(statement)

    engine = _ctx(client).engine
    event.listen(engine, "before_cursor_execute", count)
    try:
        for _ in range(20):
            assert client.get(f"/v1/users/{user_id}", headers=bearer(key)).status_code == 200
    finally:
        event.remove(engine, "before_cursor_execute", count)
    assert len(writes) == 1
    first = _keys(client, user_id)[0]["last_used_at"]
    assert first is not None and abs(first - time.time()) < 60
    # Over a minute later (moved back in the database), the next request records the use again.
    with _ctx(client).session_factory.begin() as session:
        session.execute(update(ApiKey).values(last_used_at=datetime.now(UTC) - timedelta(minutes=5)))
    client.get(f"/v1/users/{user_id}", headers=bearer(key))
    assert _keys(client, user_id)[0]["last_used_at"] >= first


def test_a_key_revoked_through_one_api_process_is_refused_by_another_at_once(tmp_path: Path, postgres_url: str):
    """Two API apps on one Postgres database (as in the distributed mode): authentication reads
    the database on every request, so no process keeps accepting a revoked key."""
    from core.db.migrate import upgrade_to_head

    upgrade_to_head(postgres_url)  # what `steer migrate` does before Postgres deployments start
    first = make_settings(tmp_path / "a", database_url=postgres_url)
    second = make_settings(tmp_path / "b", database_url=postgres_url)
    with (
        api_client(first, dispatcher=RecordingDispatcher()) as one,
        api_client(second, dispatcher=RecordingDispatcher()) as two,
    ):
        alice = onboard(one, f"revoked-{uuid.uuid4().hex[:8]}")
        user_id, key = alice["user"]["id"], alice["api_key"]
        assert two.get(f"/v1/users/{user_id}", headers=bearer(key)).status_code == 200
        key_id = _keys(one, user_id)[0]["id"]
        assert one.delete(f"/v1/users/{user_id}/api_keys/{key_id}", headers=ADMIN).status_code == 200
        assert two.get(f"/v1/users/{user_id}", headers=bearer(key)).status_code == 401
        assert one.get(f"/v1/users/{user_id}", headers=bearer(key)).status_code == 401
