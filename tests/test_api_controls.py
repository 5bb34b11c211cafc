"""Control prefixes through the API: an admin defines a control from example texts, the training
workers train it beside users' prefixes, and any request composes it with a user's prefix — in the
model string (`user:alice+formal+brief`) or in the body (`controls`, the openai client's
`extra_body`). Each composed answer equals the same request run alone on the engine."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest
from sqlalchemy import func, select

from core.config import Settings
from core.db import Job, PrefixVersion, Sample, User
from core.db.migrate import upgrade_to_head
from core.engine.generation import GenerationRequest, MixedBatchGenerator
from core.engine.model import load_base_model
from core.engine.prompts import text_ids
from core.engine.sampling import SamplingParams
from core.inference.catalog import prefix_ref
from core.inference.prefix_cache import store_loader
from core.service.context import build_context
from core.service.registry import active_prefix
from tests.support import inference as serving
from tests.support.api import ADMIN, SAMPLES, api_client, bearer, make_settings, onboard, tiny_base_model, wait_for_job
from tests.support.inference import ADMIN_KEY, ServerThread, build_app, create_user, publish_random_prefix
from tests.support.models import model_cache_dir

PROMPT = "The weather today is"
BRIEF = ["Short.", "Noted, thanks.", "Yes. Tomorrow.", "Done and sent.", "Call me later.", "All fine here."]


def test_an_admin_defines_a_control_that_trains_beside_users_and_composes_with_them(tmp_path: Path):
    with api_client(make_settings(tmp_path), base=tiny_base_model()) as client:
        ctx = client.app.state.ctx
        alice = onboard(client, "alice")
        assert wait_for_job(client, alice["job"]["id"])["status"] == "succeeded"
        user_key = bearer(alice["api_key"])

        created = client.post("/v1/controls", headers=ADMIN, json={"name": "brief", "samples": BRIEF})
        assert created.status_code == 201, created.text
        body = created.json()
        assert body["control"]["model"] == "control:brief" and body["control"]["active_version"] is None
        assert body["samples"] == {"added": len(BRIEF), "duplicates": 0}
        job = wait_for_job(client, body["job"]["id"])
        assert job["status"] == "succeeded" and job["kind"] == "control", job
        assert job["fine_tuned_model"] == "control:brief:v1"
        assert job["hyperparameters"]["preservation_weight"] == 0.0  # see core/service/controls.py
        events = client.get(f"/v1/fine_tuning/jobs/{job['id']}/events?limit=100", headers=ADMIN).json()["data"]
        assert any(e["message"] == "Training the control alone" for e in events)  # recipe (a), the default

        # Every key sees it and may compose it; it is no user.
        control = client.get("/v1/controls/brief", headers=user_key).json()
        assert control["active_version"] == 1 and control["samples"] == len(BRIEF)
        assert [c["name"] for c in client.get("/v1/controls", headers=user_key).json()["data"]] == ["brief"]
        versions = client.get("/v1/controls/brief/versions", headers=user_key).json()["data"]
        assert [(v["model"], v["status"]) for v in versions] == [("control:brief:v1", "active")]
        models = {m["id"] for m in client.get("/v1/models", headers=user_key).json()["data"]}
        assert {"control:brief", "user:alice+brief"} <= models
        users = client.get("/v1/users", headers=ADMIN).json()["data"]
        assert [u["external_id"] for u in users] == ["alice"]
        assert client.get(f"/v1/users/{control['id']}", headers=ADMIN).status_code == 404
        assert client.delete(f"/v1/users/{control['id']}", headers=ADMIN).status_code == 404
        for model in ("user:alice+brief", "user:alice+brief:v1", "control:brief", "tiny-llama-random+brief"):
            reply = client.post(
                "/v1/completions", headers=user_key, json={"model": model, "prompt": "Hi", "max_tokens": 3}
            )
            assert reply.status_code == 200, (model, reply.text)
        via_body = client.post(
            "/v1/completions",
            headers=user_key,
            json={"model": "user:alice", "controls": ["brief"], "prompt": PROMPT, "max_tokens": 6, "temperature": 0},
        ).json()["choices"][0]["text"]
        via_model = client.post(
            "/v1/completions",
            headers=user_key,
            json={"model": "user:alice+brief", "prompt": PROMPT, "max_tokens": 6, "temperature": 0},
        ).json()["choices"][0]["text"]
        assert via_body == via_model == _alone(tiny_base_model(), ctx, [alice["user"]["id"], control["id"]], PROMPT, 6)

        # Retraining makes v2 active (beside the users' current prefixes); v1 stays for rollback.
        retrain = client.post("/v1/controls/brief/retrain", headers=ADMIN, json={"hyperparameters": {"max_steps": 1}})
        assert retrain.status_code == 201, retrain.text
        assert wait_for_job(client, retrain.json()["id"])["fine_tuned_model"] == "control:brief:v2"
        rolled = client.post("/v1/controls/brief/versions/1/activate", headers=ADMIN).json()
        assert (rolled["model"], rolled["status"]) == ("control:brief:v1", "active")
        assert client.get("/v1/controls/brief", headers=user_key).json()["active_version"] == 1
        # Controls are not users: the users' retraining and jobs routes do not take them.
        assert client.post("/v1/admin/retrain", headers=ADMIN, json={"user_ids": [control["id"]]}).status_code == 404
        assert client.post("/v1/fine_tuning/jobs", headers=ADMIN, json={"user": control["id"]}).status_code == 404

        # Only the admin defines, retrains or deletes controls.
        assert client.post("/v1/controls/brief/retrain", headers=user_key).status_code == 403
        assert client.post("/v1/controls", headers=user_key, json={"name": "x", "samples": BRIEF}).status_code == 403
        assert client.delete("/v1/controls/brief", headers=user_key).status_code == 403

        # Deleting erases its samples, versions, blobs and jobs; requests naming it then fail clearly.
        control_id = control["id"]
        assert ctx.store.list(f"users/{control_id}/")
        assert client.delete("/v1/controls/brief", headers=ADMIN).json()["deleted"] is True
        assert ctx.store.list(f"users/{control_id}/") == []
        with ctx.session_factory() as session:
            for model, column in ((Sample, Sample.user_id), (PrefixVersion, PrefixVersion.user_id)):
                assert session.scalar(select(func.count()).select_from(model).where(column == control_id)) == 0
            assert session.get(User, control_id) is None
            assert session.get(Job, job["id"]) is None
        gone = client.post("/v1/completions", headers=user_key, json={"model": "user:alice+brief", "prompt": "Hi"})
        assert gone.status_code == 404 and "brief" in gone.json()["error"]["message"]
        assert client.get("/v1/controls/brief", headers=user_key).status_code == 404


def test_bad_control_definitions_and_references_are_refused_and_change_nothing(tmp_path: Path):
    with api_client(make_settings(tmp_path), base=tiny_base_model()) as client:
        ctx = client.app.state.ctx
        for name in ("Brief", "9lives", "has space", "a:b", "a+b", "", "x" * 65):
            response = client.post("/v1/controls", headers=ADMIN, json={"name": name, "samples": BRIEF})
            assert response.status_code == 400, name
        assert client.post("/v1/controls", headers=ADMIN, json={"name": "ok", "samples": []}).status_code == 400
        with ctx.session_factory() as session:
            assert session.scalar(select(func.count()).select_from(User)) == 0
            assert session.scalar(select(func.count()).select_from(Job)) == 0

        assert client.post("/v1/controls", headers=ADMIN, json={"name": "brief", "samples": BRIEF}).status_code == 201
        again = client.post("/v1/controls", headers=ADMIN, json={"name": "brief", "samples": SAMPLES})
        assert again.status_code == 409
        alice = onboard(client, "alice")
        assert wait_for_job(client, alice["job"]["id"])["status"] == "succeeded"
        key = bearer(alice["api_key"])
        cases = {
            "user:alice+nosuch": 404,
            "user:alice+brief+brief": 400,
            "user:alice+Brief": 404,
            "user:control:brief": 404,
            "control:nosuch": 404,
            "user:bob+brief": 404,
        }
        for model, status in cases.items():
            response = client.post("/v1/completions", headers=key, json={"model": model, "prompt": "Hi"})
            assert response.status_code == status, (model, response.text)
        for controls in (["Bad Name"], [1], ["brief", "brief"], ["a", "b", "c", "d", "e"]):
            response = client.post(
                "/v1/completions", headers=key, json={"model": "user:alice", "controls": controls, "prompt": "Hi"}
            )
            assert response.status_code in (400, 404), (controls, response.text)
            assert response.json()["error"]["param"].split(".")[0] in ("controls", "model"), response.text


# -- the mixed burst through the official openai client ----------------------------------------------


@pytest.fixture(scope="module")
def base():
    return load_base_model("tiny", device="cpu", dtype="float32", cache_root=model_cache_dir())


def _control(ctx, name: str) -> serving.TestUser:
    """A control row (as `POST /v1/controls` makes it) without training it: its prefix is published
    directly, like the users' random prefixes here."""
    with ctx.session_factory() as session:
        row = User(external_id=f"control:{name}", kind="control")
        session.add(row)
        session.commit()
        return serving.TestUser(f"control:{name}", row.id, "")


@pytest.fixture(scope="module")
def service(tmp_path_factory, base):
    settings = Settings(
        data_dir=tmp_path_factory.mktemp("steer"), base_model="tiny", admin_key=ADMIN_KEY, max_batch_size=8
    )
    upgrade_to_head(settings.effective_database_url)
    ctx = build_context(settings, base_model=base)
    subjects = {name: create_user(ctx, name) for name in ("alice", "bob")}
    subjects |= {name: _control(ctx, name) for name in ("formal", "brief")}
    for seed, subject in enumerate(subjects.values(), start=1):
        publish_random_prefix(ctx, base, subject, seed=seed, prefix_len=3 + seed)
    with ServerThread(build_app(ctx)) as server:
        yield ctx, subjects, server
    ctx.close()


def _alone(base, ctx, subject_ids: list[str], prompt: str, max_tokens: int = 12) -> str:
    """The engine run directly, alone, with these subjects' active prefixes composed in order, greedy
    with the loop guard the service gives rows on a prefix (STEER_GREEDY_NO_REPEAT_NGRAM)."""
    kvs = []
    for subject_id in subject_ids:
        with ctx.session_factory() as session:
            kvs.append(store_loader(ctx.store, base)(prefix_ref(active_prefix(session, subject_id))).kv)
    guard = ctx.settings.greedy_no_repeat_ngram if kvs else 0
    params = SamplingParams(max_tokens, temperature=0, no_repeat_ngram=guard)
    request = GenerationRequest(text_ids(base.tokenizer, prompt), params, kvs)
    return MixedBatchGenerator(base).generate([request])[0].text


def test_a_concurrent_burst_of_users_with_different_control_sets_equals_each_request_alone(service, base):
    ctx, subjects, server = service
    # two users x {no control, one control, two controls}; controls named in the model string or the body
    cases = [
        (user, model_controls, body_controls, prompt)
        for user in ("alice", "bob")
        for model_controls, body_controls in (((), ()), (("formal",), ()), (("formal",), ("brief",)))
        for prompt in ("The weather today is", "Dear team,")
    ]
    cases.append(("bob", (), ("brief", "formal"), "Dear team,"))  # order of the controls differs

    def run(case):
        user, model_controls, body_controls, prompt = case
        client = openai.OpenAI(base_url=server.base_url, api_key=subjects[user].key, max_retries=0, timeout=60)
        model = "+".join([f"user:{user}", *model_controls])
        extra = {"controls": list(body_controls)} if body_controls else None
        reply = client.completions.create(model=model, prompt=prompt, max_tokens=12, temperature=0, extra_body=extra)
        return reply.choices[0].text

    with ThreadPoolExecutor(len(cases)) as pool:
        burst = list(pool.map(run, cases))
    alone = [
        _alone(base, ctx, [subjects[n].user_id for n in (user, *mc, *bc)], prompt) for user, mc, bc, prompt in cases
    ]
    assert burst == alone
    # and the controls really changed the answers
    by_case = dict(zip(((u, mc, bc, p) for u, mc, bc, p in cases), burst))
    for user in ("alice", "bob"):
        texts = {by_case[(user, mc, bc, "Dear team,")] for mc, bc in (((), ()), (("formal",), ()))}
        assert len(texts) == 2


def test_an_external_id_with_a_plus_sign_names_the_user_before_any_control(service, base):
    """External ids may contain `+` (e-mail addresses): the longest head naming a model wins."""
    ctx, subjects, server = service
    lookalike = create_user(ctx, "alice+formal")
    publish_random_prefix(ctx, base, lookalike, seed=9, prefix_len=4)
    client = openai.OpenAI(base_url=server.base_url, api_key=ADMIN_KEY, max_retries=0, timeout=60)

    def complete(model: str) -> str:
        reply = client.completions.create(model=model, prompt="Dear team,", max_tokens=12, temperature=0)
        return reply.choices[0].text

    ids = {name: subject.user_id for name, subject in subjects.items()}
    assert complete("user:alice+formal") == _alone(base, ctx, [lookalike.user_id], "Dear team,")
    assert complete("user:alice+formal+brief") == _alone(base, ctx, [lookalike.user_id, ids["brief"]], "Dear team,")
    assert complete("user:alice+brief") == _alone(base, ctx, [ids["alice"], ids["brief"]], "Dear team,")
    assert complete("user:alice+brief+formal") == _alone(
        base, ctx, [ids["alice"], ids["brief"], ids["formal"]], "Dear team,"
    )


def test_a_control_trains_beside_the_users_whose_prefixes_it_can_read(tmp_path: Path):
    """A companion whose blob is gone (erased while the control was queued, or a store restored
    from an older backup) is skipped with a warning: the control trains beside the others."""
    with api_client(make_settings(tmp_path, control_companions=8), base=tiny_base_model()) as client:
        ctx = client.app.state.ctx
        for name in ("alice", "bob"):
            assert wait_for_job(client, onboard(client, name)["job"]["id"])["status"] == "succeeded"
        with ctx.session_factory() as session:
            gone = session.scalars(select(PrefixVersion).order_by(PrefixVersion.user_id)).first()
            ctx.store.delete(gone.blob_key)

        created = client.post("/v1/controls", headers=ADMIN, json={"name": "brief", "samples": BRIEF})
        job = wait_for_job(client, created.json()["job"]["id"])
        assert job["status"] == "succeeded", job
        events = client.get(f"/v1/fine_tuning/jobs/{job['id']}/events?limit=100", headers=ADMIN).json()["data"]
        assert "Training the control beside 1 users' prefixes" in [e["message"] for e in events]


def test_a_second_control_of_the_same_name_is_a_409_the_schema_declares(tmp_path: Path):
    """Found by the fuzzer: the conflict was answered but not declared in /openapi.json."""
    with api_client(make_settings(tmp_path), base=tiny_base_model()) as client:
        assert client.post("/v1/controls", headers=ADMIN, json={"name": "brief", "samples": BRIEF}).status_code == 201
        again = client.post("/v1/controls", headers=ADMIN, json={"name": "brief", "samples": BRIEF})
        assert again.status_code == 409 and again.json()["error"]["code"] == "conflict"
        paths = client.get("/openapi.json").json()["paths"]
        assert "409" in paths["/v1/controls"]["post"]["responses"]
        assert "409" in paths["/v1/controls/{name}/versions/{version}/activate"]["post"]["responses"]
        assert "409" in paths["/v1/users/{user_id}/prefixes/{version}/activate"]["post"]["responses"]
