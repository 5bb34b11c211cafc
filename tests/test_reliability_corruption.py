"""Corruption: a prefix blob altered in the store (local directory or S3) is caught by its sha256
and never served. The version is marked "corrupt" (queryable in the prefix list, with a log line),
`user:<id>` falls back to the previous good version, and the corrupt version's explicit id gets a
clear error.
"""

from __future__ import annotations

import logging
import uuid

import openai
import pytest

from core.config import Settings
from core.db.migrate import upgrade_to_head
from core.engine.generation import GenerationRequest, MixedBatchGenerator
from core.engine.prompts import chat_prompt_ids
from core.engine.sampling import SamplingParams
from core.inference.catalog import prefix_ref
from core.inference.prefix_cache import store_loader
from core.service.context import build_context
from core.service.registry import list_versions
from tests.support.api import tiny_base_model
from tests.support.inference import ADMIN_KEY, ServerThread, build_app, create_user, publish_random_prefix
from tests.support.seaweed import flip_a_byte

MESSAGES = [{"role": "user", "content": "Write me a note."}]


def _tamper_local(ctx, key: str) -> None:
    path = ctx.store.root_dir.joinpath(*key.split("/"))
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte in the tensor data: still parses, wrong values
    path.write_bytes(bytes(data))


def _tamper_s3(s3_server, bucket: str):
    def tamper(ctx, key: str) -> None:
        flip_a_byte(s3_server.minio_client(), bucket, key)

    return tamper


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.integration)])
def store_setup(request, tmp_path):
    overrides = {}
    tamper = _tamper_local
    if request.param == "s3":
        s3_server = request.getfixturevalue("s3_server")
        bucket = f"corrupt-{uuid.uuid4().hex[:8]}"
        overrides = {k.removeprefix("STEER_").lower(): v for k, v in s3_server.settings_env(bucket).items()}
        tamper = _tamper_s3(s3_server, bucket)
    settings = Settings(
        _env_file=None,
        data_dir=tmp_path / "steer",
        base_model="tiny",
        admin_key=ADMIN_KEY,  # type: ignore[call-arg]
        request_timeout_s=30,
        **overrides,
    )
    upgrade_to_head(settings.effective_database_url)
    ctx = build_context(settings, base_model=tiny_base_model())
    try:
        yield ctx, tamper
    finally:
        ctx.close()


def _direct(ctx, row) -> str:
    """The engine alone on this version, greedy with the loop guard the service gives a user's rows."""
    base = ctx.base_model()
    kv = store_loader(ctx.store, base)(prefix_ref(row)).kv
    params = SamplingParams(max_tokens=10, temperature=0, no_repeat_ngram=ctx.settings.greedy_no_repeat_ngram)
    request = GenerationRequest(chat_prompt_ids(base.tokenizer, MESSAGES), params, kv)
    return MixedBatchGenerator(base).generate([request])[0].text


def test_a_tampered_prefix_is_refused_and_the_alias_falls_back_to_the_previous_version(store_setup, caplog):
    ctx, tamper = store_setup
    base = ctx.base_model()
    user = create_user(ctx, "tampered")
    publish_random_prefix(ctx, base, user, seed=1)
    publish_random_prefix(ctx, base, user, seed=2)
    with ctx.session_factory() as session:
        v1, v2 = list_versions(session, user.user_id)
    good_v1 = _direct(ctx, v1)
    assert good_v1 != _direct(ctx, v2)
    tamper(ctx, v2.blob_key)

    with ServerThread(build_app(ctx)) as server:
        client = openai.OpenAI(base_url=server.base_url, api_key=user.key, max_retries=0, timeout=60)
        with caplog.at_level(logging.WARNING):
            reply = client.chat.completions.create(
                model="user:tampered", messages=MESSAGES, max_tokens=10, temperature=0
            )
        # Served with v1, never with the altered bytes of v2.
        assert reply.choices[0].message.content == good_v1
        assert any("corrupt" in r.getMessage() and "quarantined" in r.getMessage() for r in caplog.records)
        # Recorded where an operator (or the user) can query it.
        listed = {p["version"]: p for p in _prefixes(server, user)}
        assert (listed[1]["status"], listed[2]["status"]) == ("active", "corrupt")
        assert "sha256" in listed[2]["metrics"]["corrupt_reason"]
        # The alias keeps serving v1 (a stream too); the corrupt version's own id is a clear error.
        stream = client.chat.completions.create(
            model="user:tampered", messages=MESSAGES, max_tokens=10, temperature=0, stream=True
        )
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == good_v1
        corrupt_id = f"ft:{base.model_id}:tampered:v2"
        with pytest.raises(openai.APIStatusError) as info:
            client.chat.completions.create(model=corrupt_id, messages=MESSAGES, max_tokens=4)
        assert info.value.status_code == 500 and "corrupt" in info.value.message
        assert info.value.body["code"] == "corrupt_artifact"
        assert corrupt_id not in [m.id for m in client.models.list().data]
        # And it cannot be re-activated by mistake.
        again = _post(server, f"/v1/users/{user.user_id}/prefixes/2/activate")
        assert again.status_code == 409


def test_with_no_good_version_left_the_alias_says_so_instead_of_serving_garbage(store_setup):
    ctx, tamper = store_setup
    user = create_user(ctx, "only-one")
    publish_random_prefix(ctx, ctx.base_model(), user, seed=5)
    with ctx.session_factory() as session:
        (v1,) = list_versions(session, user.user_id)
    tamper(ctx, v1.blob_key)
    with ServerThread(build_app(ctx)) as server:
        client = openai.OpenAI(base_url=server.base_url, api_key=user.key, max_retries=0, timeout=60)
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(model="user:only-one", messages=MESSAGES, max_tokens=4)
        assert info.value.body["code"] == "model_not_ready"
        assert [p["status"] for p in _prefixes(server, user)] == ["corrupt"]


def _prefixes(server, user) -> list[dict]:
    import httpx

    response = httpx.get(
        f"{server.base_url}/users/{user.user_id}/prefixes", headers={"Authorization": f"Bearer {user.key}"}
    )
    assert response.status_code == 200, response.text
    return response.json()["data"]


def _post(server, path: str):
    import httpx

    return httpx.post(server.base_url.removesuffix("/v1") + path, headers={"Authorization": f"Bearer {ADMIN_KEY}"})
