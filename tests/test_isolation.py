"""Users are isolated: no key reaches another user's data, and nothing reveals that another exists.

Six users each have a key, samples, a job and a published prefix. Every user-scoped endpoint is
tried (in a seeded random order) with every other user's key; each answer must be exactly the
answer for an id that never existed (same status, same body once the id the caller sent is
blanked), and no row or blob may change. Plus: keys are stored hashed and compared in constant
time, prefixes are read only as safetensors from index-recorded keys, and erasing a user leaves
nothing of theirs behind.
"""

from __future__ import annotations

import inspect
import json
import random
import re
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import func, select

from core.db import ApiKey, Job, JobEvent, PrefixVersion, Sample, User
from core.db.models import Base
from core.storage import user_blob_prefix
from tests.support.api import ADMIN, RecordingDispatcher, api_client, bearer, make_settings, onboard
from tests.support.inference import TestUser, publish_random_prefix

SEED = 20260601
N_USERS = 6
TABLES = (User, ApiKey, Sample, Job, JobEvent, PrefixVersion)
# Deserializers that can run code from the bytes they read.
UNSAFE_LOADERS = re.compile(r"torch\.load\(|import pickle|pickle\.loads?\(|import dill|numpy\.load\(|allow_pickle")


@dataclass
class Member:
    external_id: str
    user_id: str
    key: str
    job_id: str
    sample_id: str
    version: int


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    rng = random.Random(SEED)
    with api_client(make_settings(tmp_path_factory.mktemp("iso")), dispatcher=RecordingDispatcher()) as client:
        ctx = client.app.state.ctx
        base = ctx.base_model()
        members = []
        for i in range(N_USERS):
            external_id = f"member{i}-{rng.randrange(10**6):06d}"
            body = onboard(
                client, external_id, [f"Sample {j} written by {external_id}, quite personal." for j in range(3)]
            )
            user = TestUser(external_id, body["user"]["id"], body["api_key"])
            version = publish_random_prefix(ctx, base, user, seed=i, prefix_len=2)
            with ctx.session_factory() as session:
                sample_id = session.scalar(select(Sample.id).where(Sample.user_id == user.user_id))
            members.append(Member(external_id, user.user_id, user.key, body["job"]["id"], sample_id, version))
        yield client, members, base.model_id


def _counts(client) -> tuple[int, ...]:
    with client.app.state.ctx.session_factory() as session:
        return tuple(session.execute(select(func.count()).select_from(t)).scalar_one() for t in TABLES)


def _probes(victim: Member, base_model: str, me: Member) -> list[tuple[str, str, dict | None, list[str]]]:
    """(method, path, json body, ids of the victim in the request) for every user-scoped endpoint."""
    v = victim
    chat = lambda model: {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}  # noqa: E731
    return [
        ("GET", f"/v1/users/{v.user_id}", None, [v.user_id]),
        ("DELETE", f"/v1/users/{v.user_id}", None, [v.user_id]),
        ("GET", f"/v1/users/{v.user_id}/samples", None, [v.user_id]),
        ("POST", f"/v1/users/{v.user_id}/samples", {"samples": ["planted by someone else"]}, [v.user_id]),
        ("DELETE", f"/v1/users/{v.user_id}/samples/{v.sample_id}", None, [v.user_id, v.sample_id]),
        # The victim's sample through the attacker's own user path.
        ("DELETE", f"/v1/users/{me.user_id}/samples/{v.sample_id}", None, [v.sample_id]),
        ("GET", f"/v1/users/{v.user_id}/prefixes", None, [v.user_id]),
        ("POST", f"/v1/users/{v.user_id}/prefixes/{v.version}/activate", None, [v.user_id]),
        ("GET", f"/v1/fine_tuning/jobs/{v.job_id}", None, [v.job_id]),
        ("GET", f"/v1/fine_tuning/jobs/{v.job_id}/events", None, [v.job_id]),
        ("POST", f"/v1/fine_tuning/jobs/{v.job_id}/cancel", None, [v.job_id]),
        ("POST", "/v1/fine_tuning/jobs", {"user": v.user_id}, [v.user_id]),
        ("GET", f"/v1/fine_tuning/jobs?user={v.user_id}", None, [v.user_id]),
        ("GET", f"/v1/users?external_id={v.external_id}", None, [v.external_id]),
        ("POST", "/v1/chat/completions", chat(f"ft:{base_model}:{v.external_id}:v{v.version}"), [v.external_id]),
        ("POST", "/v1/chat/completions", chat(f"ft:{base_model}:{v.external_id}"), [v.external_id]),
        ("POST", "/v1/chat/completions", chat(f"user:{v.external_id}"), [v.external_id]),
        (
            "POST",
            "/v1/completions",
            {"model": f"user:{v.external_id}", "prompt": "hi", "max_tokens": 1},
            [v.external_id],
        ),
    ]


def _ghost(real: str) -> str:
    """An id of the same shape as `real` that names nothing."""
    if re.fullmatch(r"[0-9a-f]{32}", real):
        return uuid.uuid4().hex
    if real.startswith("ftjob-"):
        return "ftjob-" + uuid.uuid4().hex[: len(real) - 6]
    return "ghost" + uuid.uuid4().hex[: max(1, len(real) - 5)]


def _call(client, key: str, method: str, path: str, body: dict | None):
    return client.request(method, path, headers=bearer(key), json=body)


def _blank(text: str, ids: list[str]) -> str:
    for i, value in enumerate(ids):
        text = text.replace(value, f"<id{i}>")
    return text


def test_no_key_reaches_another_users_data_or_learns_that_it_exists(world):
    client, members, base_model = world
    rng = random.Random(SEED)
    pairs = [(a, v) for a in members for v in members if a is not v]
    rng.shuffle(pairs)
    before = _counts(client)
    with client.app.state.ctx.session_factory() as session:
        state_before = session.execute(select(Job.id, Job.status, Job.cancel_requested)).all()
        active_before = session.execute(select(PrefixVersion.id, PrefixVersion.status)).all()
    tried = 0
    for attacker, victim in pairs:
        probes = _probes(victim, base_model, attacker)
        rng.shuffle(probes)
        for method, path, body, ids in probes:
            ghosts = [_ghost(i) for i in ids]
            g_path, g_body = path, json.dumps(body) if body else None
            for real, ghost in zip(ids, ghosts):
                g_path = g_path.replace(real, ghost)
                g_body = g_body.replace(real, ghost) if g_body else None
            real_answer = _call(client, attacker.key, method, path, body)
            ghost_answer = _call(client, attacker.key, method, g_path, json.loads(g_body) if g_body else None)
            where = (attacker.external_id, victim.external_id, method, path)
            assert real_answer.status_code == ghost_answer.status_code, where
            assert _blank(real_answer.text, ids) == _blank(ghost_answer.text, ghosts), (where, real_answer.text)
            if real_answer.status_code == 200:  # the list endpoints: an empty list, as for nobody
                assert real_answer.json()["data"] == [], where
            else:
                assert real_answer.status_code == 404, (where, real_answer.text)
            tried += 1
    assert tried == len(pairs) * 18
    assert _counts(client) == before
    with client.app.state.ctx.session_factory() as session:
        assert session.execute(select(Job.id, Job.status, Job.cancel_requested)).all() == state_before
        assert session.execute(select(PrefixVersion.id, PrefixVersion.status)).all() == active_before


def test_each_key_lists_only_its_own_users_jobs_and_models(world):
    client, members, base_model = world
    for m in members:
        users = client.get("/v1/users", headers=bearer(m.key)).json()["data"]
        assert [u["id"] for u in users] == [m.user_id]
        jobs = client.get("/v1/fine_tuning/jobs", headers=bearer(m.key)).json()["data"]
        assert {j["id"] for j in jobs} == {m.job_id}
        models = {e["id"] for e in client.get("/v1/models", headers=bearer(m.key)).json()["data"]}
        assert models == {base_model, f"ft:{base_model}:{m.external_id}:v{m.version}", f"user:{m.external_id}"}
        own = client.post(
            "/v1/completions",
            headers=bearer(m.key),
            json={"model": f"user:{m.external_id}", "prompt": "hi", "max_tokens": 1},
        )
        assert own.status_code == 200, own.text


def test_admin_endpoints_refuse_user_keys_without_revealing_anything(world):
    client, members, _base = world
    before = _counts(client)
    me, other = members[0], members[1]
    for target in (me.user_id, other.user_id, uuid.uuid4().hex):
        response = client.post(f"/v1/users/{target}/api_keys", headers=bearer(me.key))
        assert response.status_code == 403 and response.json()["error"]["type"] == "permission_error"
    assert (
        client.post("/v1/onboarding", headers=bearer(me.key), json={"external_id": "x", "samples": ["s"]}).status_code
        == 403
    )
    for body in ({"all": True}, {"user_ids": [other.user_id]}):
        assert client.post("/v1/admin/retrain", headers=bearer(me.key), json=body).status_code == 403
    assert _counts(client) == before


def _all_values(client) -> list[str]:
    values = []
    with client.app.state.ctx.engine.connect() as conn:
        for table in Base.metadata.sorted_tables:
            for row in conn.execute(table.select()):
                values.extend(str(v) for v in row if v is not None)
    return values


def test_user_keys_are_stored_only_as_hashes(world):
    client, members, _base = world
    values = _all_values(client)
    for m in members:
        secret = m.key.removeprefix("sk-steer-")
        assert not any(secret in v or secret[:16] in v for v in values), m.external_id
    with client.app.state.ctx.session_factory() as session:
        hashes = session.execute(select(ApiKey.key_hash)).scalars().all()
    assert all(re.fullmatch(r"[0-9a-f]{64}", h) for h in hashes)


def test_keys_are_compared_in_constant_time():
    from core.service import api_keys

    source = inspect.getsource(api_keys.authenticate)
    assert source.count("hmac.compare_digest(") >= 2  # the admin hashes and the user's rows
    assert not re.search(r"(digest|key_hash|admin)\s*==|==\s*(digest|key_hash)", source)


def test_prefixes_are_read_only_as_safetensors_from_index_recorded_keys(world, monkeypatch):
    client, members, base_model = world
    import core.tuners.artifacts as artifacts

    source = inspect.getsource(artifacts)
    assert "from safetensors.torch import load" in source and not UNSAFE_LOADERS.search(source)
    for module in (
        "core/inference/prefix_cache.py",
        "core/service/registry.py",
        "core/storage/local.py",
        "core/storage/s3.py",
    ):
        assert not UNSAFE_LOADERS.search((Path(__file__).parent.parent / module).read_text()), module
    store = client.app.state.ctx.store
    completer_store = getattr(client.app.state.completer, "store", None)
    requested: list[str] = []
    for target in {id(store): store, id(completer_store): completer_store}.values():
        if target is None:
            continue
        original = target.get

        def spy(key, *args, _original=original, **kwargs):
            requested.append(key)
            return _original(key, *args, **kwargs)

        monkeypatch.setattr(target, "get", spy)
    me = members[2]
    # A fresh version: not in the prefix cache yet, so serving it must read the store.
    ctx = client.app.state.ctx
    version = publish_random_prefix(ctx, ctx.base_model(), TestUser(me.external_id, me.user_id, me.key), 99, 2)
    models = [f"user:{me.external_id}", f"ft:{base_model}:{me.external_id}:v{version}"]
    hostile = [
        f"ft:{base_model}:../../{me.external_id}:v1",
        "/etc/passwd",
        f"user:../{me.user_id}",
        "users/x/prefix.safetensors",
    ]
    for model in models + hostile:
        response = client.post(
            "/v1/completions", headers=bearer(me.key), json={"model": model, "prompt": "hi", "max_tokens": 1}
        )
        assert response.status_code == (200 if model in models else 404), (model, response.text)
    with client.app.state.ctx.session_factory() as session:
        indexed = set(session.execute(select(PrefixVersion.blob_key)).scalars())
    assert requested and set(requested) <= indexed, requested
    assert all(key.endswith(".safetensors") for key in indexed)


def test_erasing_a_user_leaves_nothing_of_theirs(tmp_path: Path):
    # Its own app: the shared world must keep its six users.
    with api_client(make_settings(tmp_path), dispatcher=RecordingDispatcher()) as client:
        ctx = client.app.state.ctx
        keep = onboard(client, "keeper-7f3a")
        gone = onboard(client, "leaver-91c2")
        user = TestUser("leaver-91c2", gone["user"]["id"], gone["api_key"])
        for seed in (1, 2):  # two versions: the retired one must go too
            publish_random_prefix(ctx, ctx.base_model(), user, seed=seed, prefix_len=2)
        publish_random_prefix(ctx, ctx.base_model(), TestUser("keeper-7f3a", keep["user"]["id"], keep["api_key"]), 3, 2)
        assert ctx.store.list(user_blob_prefix(user.user_id)) != []
        assert client.delete(f"/v1/users/{user.user_id}", headers=bearer(user.key)).status_code == 200
        values = _all_values(client)
        for trace in (user.user_id, "leaver-91c2", gone["job"]["id"]):
            assert not any(trace in v for v in values), trace
        assert not any(user.user_id in key for key in ctx.store.list(""))
        assert client.get("/v1/users", headers=bearer(user.key)).status_code == 401
        # The other user is untouched.
        assert client.get(f"/v1/users/{keep['user']['id']}", headers=ADMIN).status_code == 200
        assert any(keep["user"]["id"] in key for key in ctx.store.list(""))


def test_another_users_id_as_a_pagination_cursor_answers_like_an_unknown_id(world):
    """`?after=<their id>` must not be an existence oracle: their user, sample or job id as a
    cursor answers byte for byte what an id that never existed answers."""
    client, members, _base = world
    me, victim = members[0], members[1]
    for path, victim_id in (
        ("/v1/users?after={}", victim.user_id),
        (f"/v1/users/{me.user_id}/samples?after={{}}", victim.sample_id),
        ("/v1/fine_tuning/jobs?after={}", victim.job_id),
    ):
        ghost = _ghost(victim_id)
        real_answer = client.get(path.format(victim_id), headers=bearer(me.key))
        ghost_answer = client.get(path.format(ghost), headers=bearer(me.key))
        assert real_answer.status_code == ghost_answer.status_code == 400, (path, real_answer.text)
        assert _blank(real_answer.text, [victim_id]) == _blank(ghost_answer.text, [ghost]), path
        assert real_answer.json()["error"]["param"] == "after"
    # The caller's own ids still page.
    assert client.get(f"/v1/users?after={me.user_id}", headers=bearer(me.key)).json()["data"] == []
    own = client.get(f"/v1/users/{me.user_id}/samples?after={me.sample_id}", headers=bearer(me.key))
    assert own.status_code == 200
    assert client.get(f"/v1/fine_tuning/jobs?after={me.job_id}", headers=bearer(me.key)).status_code == 200
