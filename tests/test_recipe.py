"""One recipe: the evaluation trains exactly what the service trains (core/service/recipe.py).

Real service jobs run here (embedded mode, tiny model, every setting from the environment as a
deployment reads it); each stored version carries the `TrainingConfig` it was trained with, and
that config must equal what `steer eval` / `steer eval-controls` build for the same hyperparameters:
a user's job with default and with explicit hyperparameters, the population job (and its draw of
samples), a control's job.
"""

from __future__ import annotations

import random

import pytest
from sqlalchemy import select

from core.config import Settings
from core.db import PrefixVersion, Sample, User
from core.evaluation.controls import ControlEvalSpec
from core.evaluation.runner import EvalSpec
from core.tuners.artifacts import load_prefix
from tests.support.api import ADMIN, SAMPLES, api_client, onboard, tiny_base_model, wait_for_job

# A deployment's settings, as environment variables: the service and the evaluation both read them.
ENVIRONMENT = {
    "STEER_BASE_MODEL": "tiny",
    "STEER_DEVICE": "cpu",
    "STEER_ADMIN_KEY": ADMIN["Authorization"].removeprefix("Bearer "),
    "STEER_TRAIN_MAX_STEPS_DEFAULT": "3",
    "STEER_TRAIN_BATCH_SIZE_DEFAULT": "2",
    "STEER_TRAIN_PREFIX_LEN_DEFAULT": "2",
    "STEER_TRAIN_MAX_SEQ_LEN": "64",
    "STEER_TRAIN_INSTANT_VERSION": "false",
    "STEER_POPULATION_AUTO_USERS": "0",
    "STEER_TRAIN_COMPUTE_DTYPE": "float32",
}
BOB = ["Figures first: revenue up.", "Costs fell, as forecast.", "The quarter closed early.", "Next: audits."]
OTHER = ["Short notes, then silence.", "A reply: yes, Tuesday works.", "Thanks again for the help.", "See you."]


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    with pytest.MonkeyPatch.context() as env:
        for name, value in ENVIRONMENT.items():
            env.setenv(name, value)
        settings = Settings(_env_file=None, data_dir=tmp_path_factory.mktemp("recipe") / "steer")
        with api_client(settings, base=tiny_base_model()) as client:
            yield client


def _trained_config(client, job: dict) -> dict:
    """The TrainingConfig the service stored with the version this job published."""
    assert wait_for_job(client, job["id"])["status"] == "succeeded"
    ctx = client.app.state.ctx
    with ctx.session_factory() as session:
        row = session.scalar(select(PrefixVersion).where(PrefixVersion.job_id == job["id"]))
        data = ctx.store.get(row.blob_key, expected_sha256=row.sha256)
    return load_prefix(data, ctx.base_model()).training_config


def test_a_users_default_job_trains_what_steer_eval_trains(service):
    job = onboard(service, "alice", SAMPLES)["job"]
    assert _trained_config(service, job) == EvalSpec().training_config().to_dict()


def test_a_job_with_hyperparameters_trains_what_steer_eval_trains_with_the_same_options(service):
    hyperparameters = {"max_steps": 4, "batch_size": 3, "learning_rate": 0.01, "prefix_len": 3, "seed": 5}
    job = onboard(service, "bob", BOB, hyperparameters=hyperparameters)["job"]
    spec = EvalSpec(max_steps=4, batch_size=3, lr_prefix=0.01, prefix_len=3, seed=5)
    assert _trained_config(service, job) == spec.training_config(spec.lr_prefix).to_dict()
    assert EvalSpec(max_steps=4).training_config().warmup_steps == 0  # the service's warm-up rule, too


def test_the_population_job_trains_and_draws_what_steer_eval_does(service):
    onboard(service, "carol", OTHER)
    answer = service.post("/v1/admin/population", headers=ADMIN, json={"samples_per_user": 2, "seed": 3})
    assert answer.status_code == 201, answer.text
    job = answer.json()["job"]
    ctx = service.app.state.ctx
    with ctx.session_factory() as session:
        users = {
            user.id: list(session.scalars(select(Sample.text).where(Sample.user_id == user.id).order_by(Sample.id)))
            for user in session.scalars(select(User).where(User.kind == "user"))
        }
        control = session.scalar(select(User).where(User.external_id == "control:population"))
        kept = list(session.scalars(select(Sample.text).where(Sample.user_id == control.id).order_by(Sample.id)))
    drawn = EvalSpec().population_recipe()
    drawn = type(drawn)(2, drawn.max_users, drawn.rows_per_user).draw(users, random.Random(3))
    assert sorted(kept) == sorted(t for texts in drawn.values() for t in texts) and len(kept) == 2 * len(users)
    assert _trained_config(service, job) == EvalSpec().population_config(len(users)).to_dict()


def test_a_controls_job_trains_what_steer_eval_controls_trains(service):
    answer = service.post("/v1/controls", headers=ADMIN, json={"name": "brief", "samples": OTHER})
    assert answer.status_code == 201, answer.text
    config = _trained_config(service, answer.json()["job"])
    assert config == ControlEvalSpec().training_config("control").to_dict()
    assert config["preservation_weight"] == 0.0  # a control's own rule, in the one recipe
    assert ControlEvalSpec().training_config("user").to_dict() == EvalSpec().training_config().to_dict()
