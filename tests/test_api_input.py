"""Bad input gets a clear 4xx JSON error and changes nothing; good uploads are parsed and deduped."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sqlalchemy import func, select

from core.db import ApiKey, Job, Sample, User
from tests.support.api import ADMIN, SAMPLES, RecordingDispatcher, api_client, bearer, make_settings, onboard


@pytest.fixture
def client(tmp_path: Path):
    settings = make_settings(
        tmp_path, max_samples_per_request=5, max_sample_chars=200, max_upload_bytes=4000, max_total_samples_per_user=6
    )
    with api_client(settings, dispatcher=RecordingDispatcher()) as client:
        yield client


def _counts(client) -> tuple[int, ...]:
    with client.app.state.ctx.session_factory() as session:
        return tuple(
            session.execute(select(func.count()).select_from(model)).scalar_one()
            for model in (User, ApiKey, Sample, Job)
        )


BAD_ONBOARDINGS = [
    ({"external_id": "a", "samples": []}, "samples"),
    ({"external_id": "a", "samples": ["   \n "]}, "samples[0]"),
    ({"external_id": "a", "samples": ["ok", "x" * 201]}, "samples[1]"),
    ({"external_id": "a", "samples": ["s"] * 6}, "samples"),
    ({"external_id": "a", "samples": [42]}, "samples[0]"),
    ({"external_id": "has:colon", "samples": ["ok"]}, "external_id"),
    ({"external_id": "a", "samples": ["ok"], "hyperparameters": {"prefix_len": -1}}, "hyperparameters.prefix_len"),
    ({"external_id": "a", "samples": ["ok"], "hyperparameters": {"max_steps": "many"}}, "hyperparameters.max_steps"),
    ({"external_id": "a", "samples": ["ok"], "hyperparameters": {"init": "zeros"}}, "hyperparameters.init"),
    ({"external_id": "a", "samples": ["ok"], "hyperparameters": {"dropout": 0.1}}, "hyperparameters.dropout"),
    (
        {"external_id": "a", "samples": ["ok"], "hyperparameters": {"preservation_weight": -0.5}},
        "hyperparameters.preservation_weight",
    ),
    ({"external_id": "a", "samples": ["ok"], "hyperparameters": {"learning_rate": float("nan")}}, None),
    ({"external_id": "a", "samples": ["ok"], "hyperparameters": {"method": "dora"}}, "hyperparameters.method"),
    ({"external_id": "a", "samples": ["ok"], "hyperparameters": {"method": ["lora"]}}, "hyperparameters.method"),
    ({"external_id": "a", "samples": ["ok"], "hyperparameters": {"lora_rank": 0}}, "hyperparameters.lora_rank"),
    ({"external_id": "a", "samples": ["ok"], "hyperparameters": {"lora_rank": 65}}, "hyperparameters.lora_rank"),
    ({"external_id": "a", "samples": ["ok"], "hyperparameters": {"lora_rank": "4"}}, "hyperparameters.lora_rank"),
    ({"external_id": "a", "samples": ["ok"], "surprise": 1}, "surprise"),
]


@pytest.mark.parametrize(("body", "param"), BAD_ONBOARDINGS)
def test_bad_onboarding_is_400_and_changes_nothing(client, body, param):
    before = _counts(client)
    response = client.post(
        "/v1/onboarding",
        headers=ADMIN,
        content=json.dumps(body),
    )
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["message"]
    if param is not None:
        assert error["param"] == param
    assert _counts(client) == before
    assert client.app.state.dispatcher.submitted == []


def test_non_utf8_and_malformed_uploads_are_refused(client):
    before = _counts(client)
    files = [
        ("notes.txt", b"caf\xe9 au lait\n"),
        ("notes.jsonl", b'{"text": "ok"}\nnot json\n'),
        ("notes.jsonl", b'{"body": "no text field"}\n'),
        ("notes.pdf", b"%PDF-1.4"),
    ]
    for name, data in files:
        response = client.post("/v1/onboarding", headers=ADMIN, data={"external_id": "a"}, files={"file": (name, data)})
        assert response.status_code == 400, (name, response.text)
        assert response.json()["error"]["param"] == "file"
    assert (
        "UTF-8"
        in client.post("/v1/onboarding", headers=ADMIN, data={"external_id": "a"}, files={"file": files[0]}).json()[
            "error"
        ]["message"]
    )
    assert _counts(client) == before


def test_oversized_body_is_413(client):
    before = _counts(client)
    response = client.post(
        "/v1/onboarding", headers=ADMIN, data={"external_id": "a"}, files={"file": ("big.txt", b"word " * 2000)}
    )
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "payload_too_large"
    assert _counts(client) == before


def test_txt_upload_is_split_into_paragraphs_and_jsonl_per_line(client):
    txt = "First paragraph\nstill first.\n\nSecond one.\n\n\n  \nThird."
    body = client.post(
        "/v1/onboarding", headers=ADMIN, data={"external_id": "carol"}, files={"file": ("a.txt", txt.encode())}
    )
    assert body.status_code == 201, body.text
    user_id = body.json()["user"]["id"]
    texts = [s["text"] for s in client.get(f"/v1/users/{user_id}/samples", headers=ADMIN).json()["data"]]
    assert texts == ["First paragraph\nstill first.", "Second one.", "Third."]
    jsonl = b'{"text": "From jsonl."}\n\n{"text": "Second one."}\n'
    added = client.post(f"/v1/users/{user_id}/samples", headers=ADMIN, files={"file": ("b.jsonl", jsonl)})
    assert added.status_code == 201
    assert [s["text"] for s in added.json()["data"]] == ["From jsonl."]
    assert added.json()["duplicates"] == 1  # "Second one." was already stored


def test_samples_are_deduplicated_and_the_per_user_total_is_enforced(client):
    body = onboard(client, "dave", samples=SAMPLES[:3] + [SAMPLES[0] + "  "])
    assert body["samples"] == {"added": 3, "duplicates": 1}
    user_id, key = body["user"]["id"], body["api_key"]
    too_many = client.post(f"/v1/users/{user_id}/samples", headers=bearer(key), json={"samples": ["a", "b", "c", "d"]})
    assert too_many.status_code == 400 and "limit" in too_many.json()["error"]["message"]
    listed = client.get(f"/v1/users/{user_id}/samples", headers=bearer(key)).json()["data"]
    assert len(listed) == 3
    assert client.delete(f"/v1/users/{user_id}/samples/{listed[0]['id']}", headers=bearer(key)).status_code == 200
    assert len(client.get(f"/v1/users/{user_id}/samples", headers=bearer(key)).json()["data"]) == 2


def test_jobs_for_unknown_users_or_without_samples_are_refused(client):
    before = _counts(client)
    assert client.post("/v1/fine_tuning/jobs", headers=ADMIN, json={"user": "nobody"}).status_code == 404
    assert client.post("/v1/fine_tuning/jobs", headers=ADMIN, json={}).status_code == 400
    assert client.post("/v1/admin/retrain", headers=ADMIN, json={"user_ids": ["nobody"]}).status_code == 404
    assert client.post("/v1/admin/retrain", headers=ADMIN, json={"all": True, "user_ids": ["x"]}).status_code == 400
    assert _counts(client) == before


def test_job_listing_is_paginated_newest_first_and_filterable(client):
    alice = onboard(client, "alice")
    bob = onboard(client, "bob")
    user_id = alice["user"]["id"]
    for _ in range(2):
        assert client.post("/v1/fine_tuning/jobs", headers=ADMIN, json={"user": user_id}).status_code == 201
    first = client.get("/v1/fine_tuning/jobs?limit=2", headers=ADMIN).json()
    assert first["has_more"] is True and len(first["data"]) == 2
    rest = client.get(f"/v1/fine_tuning/jobs?limit=10&after={first['data'][-1]['id']}", headers=ADMIN).json()
    ids = [j["id"] for j in first["data"] + rest["data"]]
    assert len(ids) == 4 == len(set(ids)) and rest["has_more"] is False
    assert ids[-1] == alice["job"]["id"]  # oldest last
    only_bob = client.get(f"/v1/fine_tuning/jobs?user={bob['user']['id']}", headers=ADMIN).json()["data"]
    assert [j["id"] for j in only_bob] == [bob["job"]["id"]]
    assert client.get("/v1/fine_tuning/jobs?after=ftjob-unknown", headers=ADMIN).status_code == 400


def test_cancelling_a_queued_job_cancels_it_and_a_finished_one_is_a_conflict(client):
    job_id = onboard(client, "erin")["job"]["id"]
    cancelled = client.post(f"/v1/fine_tuning/jobs/{job_id}/cancel", headers=ADMIN)
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    again = client.post(f"/v1/fine_tuning/jobs/{job_id}/cancel", headers=ADMIN)
    assert again.status_code == 409
    events = client.get(f"/v1/fine_tuning/jobs/{job_id}/events", headers=ADMIN).json()["data"]
    assert events[0]["object"] == "fine_tuning.job.event" and "cancelled" in events[0]["message"]
