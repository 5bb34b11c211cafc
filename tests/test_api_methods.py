"""Methods per user, end to end: users onboarded with `method` prefix, lora, pt-peft and auto train,
store and show their method; the unchanged `openai` client chats with each as `user:<id>`; a user's
LoRA composes with a control's prefix; a concurrent burst mixing methods gives every request the
answer it gets alone; and a new version of another method is compared with the active one before it
replaces it. The same scenario runs embedded (in-process training and serving) and distributed
(Postgres, Redis, S3, a Celery training worker and a `workers.infer` process).

Plus the `method` hyperparameter's own rules: "auto" there is the auto method, never "the default".
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from api.app import create_app
from core.db.migrate import upgrade_to_head
from core.service.context import build_context
from core.service.controls import get_control
from core.service.hyperparameters import resolve, training_config, validate_hyperparameters
from core.service.registry import active_prefix
from tests.support.api import ADMIN, ADMIN_KEY, SAMPLES, RecordingDispatcher, api_client, make_settings, tiny_base_model
from tests.support.inference import ServerThread
from tests.support.processes import distributed_env as distributed_env_for
from tests.support.processes import running_workers, settings_from_env
from tests.support.running import Running, chat

# Enough steps and a learning rate for a LoRA to change what the tiny model says (its B starts at 0);
# no preservation term (its base-model samples would take most of the test's time).
TRAINING = {"max_steps": 4, "learning_rate": 0.05, "preservation_weight": 0}
METHODS = {"pat": None, "lou": "lora", "pete": "pt-peft", "ava": "auto"}
"""external id (tagged per run) -> the method its onboarding asks for (None: the service default)."""


# -- the hyperparameter ----------------------------------------------------------------------------


def test_method_auto_is_the_auto_method_and_leaving_it_out_is_the_service_default(tmp_path: Path):
    settings = make_settings(tmp_path, train_method_default="lora", train_lora_rank_default=6)
    for asked, method in ((None, "lora"), ("auto", "auto"), ("pt-peft", "pt-peft"), ("prefix", "prefix")):
        raw = {} if asked is None else {"method": asked, "lora_rank": "auto"}
        values = validate_hyperparameters(raw)
        assert values["method"] == asked  # stored as asked: null means "the default at run time"
        resolved = resolve(values, settings)
        assert resolved["method"] == resolve(resolved, settings)["method"] == method  # a retry resolves alike
        config = training_config(resolved, settings)
        assert (config.method, config.lora.rank) == (method, 6)
    auto, prefix = (training_config(resolve({"method": m}, settings), settings) for m in ("auto", "prefix"))
    assert auto.time_budget_s == pytest.approx(prefix.time_budget_s / 3)  # auto trains three methods in turn
    assert validate_hyperparameters({"method": None, "lora_rank": 2})["lora_rank"] == 2


def test_a_control_trains_a_prefix_and_refuses_another_method(tmp_path: Path):
    with api_client(make_settings(tmp_path), dispatcher=RecordingDispatcher()) as client:
        body = {"name": "brief", "samples": ["Short.", "Done."], "hyperparameters": {"method": "lora"}}
        refused = client.post("/v1/controls", headers=ADMIN, json=body)
        assert refused.status_code == 400 and refused.json()["error"]["param"] == "hyperparameters.method"
        assert client.get("/v1/controls", headers=ADMIN).json()["data"] == []
        assert client.app.state.dispatcher.submitted == []
        created = client.post("/v1/controls", headers=ADMIN, json={**body, "hyperparameters": {}})
        assert created.status_code == 201 and created.json()["job"]["hyperparameters"]["method"] == "prefix"


# -- end to end --------------------------------------------------------------------------------------


def drive_methods(steer: Running) -> None:
    tag = uuid.uuid4().hex[:6]
    users: dict[str, dict] = {}  # name -> {"id", "key", "job", "external_id"}
    for name, method in METHODS.items():
        hyperparameters = TRAINING if method is None else {**TRAINING, "method": method}
        body = {"external_id": f"{name}-{tag}", "samples": SAMPLES, "hyperparameters": hyperparameters}
        response = steer.http.post("/onboarding", json=body)
        assert response.status_code == 201, response.text
        created = response.json()
        users[name] = {"id": created["user"]["id"], "key": created["api_key"], "external_id": f"{name}-{tag}"}
        users[name]["job"] = created["job"]["id"]
    control = f"terse-{tag}"
    samples = ["Short.", "Done, thanks.", "Fine."]
    made = steer.http.post("/controls", json={"name": control, "samples": samples, "hyperparameters": TRAINING})
    assert made.status_code == 201, made.text

    # Every job succeeds and shows the method; every version shows what it holds.
    steer.wait(made.json()["job"]["id"])
    for name, method in METHODS.items():
        user = users[name]
        job = steer.wait(user["job"])
        assert job["hyperparameters"]["method"] == (method or "prefix")
        entry = job["result"]["users"][user["id"]]
        (version,) = steer.http.get(f"/users/{user['id']}/prefixes").json()["data"]
        assert version["method"] == entry["method"] == version["metrics"]["method"]
        assert version["status"] == "active" and version["model"] == job["fine_tuned_model"]
        user["method"] = version["method"]
        if method is not None and method != "auto":
            assert version["method"] == method
        assert (version["prefix_len"] == 0) == (version["method"] == "lora")
        with steer.ctx.session_factory() as session:  # a prefix alone keeps its state to continue from
            assert (active_prefix(session, user["id"]).state_blob_key is not None) == (version["method"] == "prefix")
    losses = steer.http.get(f"/users/{users['ava']['id']}/prefixes").json()["data"][0]["metrics"]["auto"]
    assert set(losses) == {"prefix", "lora", "pt-peft"} and users["ava"]["method"] == min(losses, key=losses.get)
    assert users["pat"]["method"] == "prefix"  # the service default

    # The unchanged openai client: each user's answer is that of its own stored version alone.
    alone = {}
    for name, user in users.items():
        alone[name] = steer.alone([user["id"]])
        assert chat(steer.client(user["key"]), f"user:{user['external_id']}") == alone[name], name
    for name in ("lou", "pete"):  # the LoRA is applied: without it the answer differs
        assert steer.alone([users[name]["id"]], with_lora=False) != alone[name], name
    # A user's LoRA composes with a control's prefix (the control's KV, the user's LoRA, one row).
    lou = users["lou"]
    composed = chat(steer.client(lou["key"]), f"user:{lou['external_id']}+{control}")
    with steer.ctx.session_factory() as session:
        control_id = get_control(session, control).id
    assert composed == steer.alone([lou["id"], control_id]) != alone["lou"]

    # A concurrent burst mixing methods (and the base model): every answer is the one it gets alone.
    base_alone = chat(steer.client(ADMIN_KEY), steer.base.model_id)
    burst = [(name, users[name]) for name in ("pat", "lou", "pete", "ava") for _ in range(3)]
    burst += [("base", None)] * 2

    def ask(item):
        name, user = item
        if user is None:
            return name, chat(steer.client(ADMIN_KEY), steer.base.model_id)
        return name, chat(steer.client(user["key"]), f"user:{user['external_id']}")

    with ThreadPoolExecutor(len(burst)) as pool:
        answers = list(pool.map(ask, burst))
    for name, answer in answers:
        assert answer == (base_alone if name == "base" else alone[name]), name

    # A new version of another method is scored against the active LoRA on the same rows first.
    retrain = steer.http.post("/fine_tuning/jobs", json={"user": lou["id"], "hyperparameters": {"method": "prefix"}})
    assert retrain.status_code == 201, retrain.text
    entry = steer.wait(retrain.json()["id"])["result"]["users"][lou["id"]]
    assert entry["method"] == "prefix" and entry["metrics"]["compared_with_version"] == 1
    assert entry["metrics"]["active_val_loss"] is not None
    versions = steer.http.get(f"/users/{lou['id']}/prefixes").json()["data"]
    assert [(v["version"], v["method"]) for v in versions] == [(1, "lora"), (2, "prefix")]


def test_every_method_trains_and_serves_through_the_openai_client_embedded(tmp_path: Path):
    ctx = build_context(make_settings(tmp_path, max_batch_size=8), base_model=tiny_base_model())
    try:
        with ServerThread(create_app(context=ctx)) as server:
            drive_methods(Running(server.base_url, ctx))
    finally:
        ctx.close()


@pytest.fixture
def distributed(postgres_url: str, redis_url: str, s3_server, tmp_path: Path) -> Iterator[tuple[dict, list[Path]]]:
    upgrade_to_head(postgres_url)
    env = distributed_env_for(
        postgres_url,
        redis_url,
        s3_server,
        "methods",
        STEER_TRAIN_BATCH_SIZE_DEFAULT="2",
        STEER_TRAIN_PREFIX_LEN_DEFAULT="2",
        STEER_TRAIN_MAX_SEQ_LEN="64",
        STEER_MAX_BATCH_SIZE="8",
    )
    with running_workers(env, tmp_path) as logs:
        yield env, logs


@pytest.mark.integration
def test_every_method_trains_and_serves_through_the_openai_client_distributed(distributed):
    env, logs = distributed
    settings = settings_from_env(env)
    assert settings.mode == "distributed" and settings.effective_blob_store == "s3"
    ctx = build_context(settings)  # as `steer serve` builds it: the workers hold the model
    try:
        with ServerThread(create_app(context=ctx)) as server:
            drive_methods(Running(server.base_url, ctx, logs))
    finally:
        ctx.close()


def test_a_deployment_training_in_bfloat16_serves_its_float32_versions_through_the_openai_client(tmp_path: Path):
    """`STEER_TRAIN_COMPUTE_DTYPE=bfloat16`: jobs train on the bfloat16 copy of the weights, the
    versions are float32 and the serving model float32, so a user's answer is the engine's alone."""
    settings = make_settings(tmp_path, max_batch_size=8, train_compute_dtype="bfloat16")
    ctx = build_context(settings, base_model=tiny_base_model())
    try:
        with ServerThread(create_app(context=ctx)) as server:
            steer = Running(server.base_url, ctx)
            keys, versions = {}, {}
            for name, method in (("pat", None), ("lou", "lora")):
                body = {"external_id": name, "samples": SAMPLES, "hyperparameters": {**TRAINING, "method": method}}
                created = steer.http.post("/onboarding", json=body)
                assert created.status_code == 201, created.text
                steer.wait(created.json()["job"]["id"])
                keys[name] = created.json()["api_key"]
                with ctx.session_factory() as session:
                    versions[name] = active_prefix(session, created.json()["user"]["id"])
                assert versions[name].metrics["compute_dtype"] == "bfloat16"
                assert versions[name].metrics["steps"] == TRAINING["max_steps"]
            assert ctx.base_model().dtype == torch.float32  # serving stays float32
            for name in keys:
                assert chat(steer.client(keys[name]), f"user:{name}") == steer.alone_versions([versions[name]])
    finally:
        ctx.close()
