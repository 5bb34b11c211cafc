"""The deployment's population prefix, end to end (core/service/population.py): the admin trains it
from a sample of every user's text; a user's job queued after it trains on top of it; the unchanged
`openai` client then gets that user's answers from the population version and the user's composed
in one row, exactly as the engine gives them alone; users trained before keep being served alone,
and a retrained population changes no served user until that user is retrained; erasing a user
deletes their text from the population's samples. Embedded, and distributed (Postgres, Redis, S3,
a Celery training worker and a `workers.infer` process)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from sqlalchemy import func, select

from api.app import create_app
from core.db import Job, PrefixVersion, Sample
from core.db.migrate import upgrade_to_head
from core.db.session import make_engine, make_session_factory
from core.service import job_inputs
from core.service.context import build_context
from core.service.errors import Conflict
from core.service.population import population_control, train_population
from core.service.registry import PrefixArtifacts, active_prefix, publish_prefix, served_population
from core.service.samples import add_samples
from core.service.users import get_or_create_user
from core.tuners.artifacts import load_prefix
from tests.support.api import ADMIN_KEY, make_settings, tiny_base_model
from tests.support.inference import ServerThread, create_user, publish_random_prefix, random_prefix_bytes
from tests.support.processes import distributed_env, running_workers, settings_from_env
from tests.support.running import Running, chat

TRAINING = {"max_steps": 4, "learning_rate": 0.05, "preservation_weight": 0}
WRITERS = {
    "ann": [
        "Dear all, the minutes are attached; please read them before Thursday.",
        "Dear all, the budget meeting moves to room four at ten.",
        "Dear all, thank you for the reports; the summary follows below.",
    ],
    "ben": [
        "yo! pizza tonight?? bring the dice, i'll bring the snacks",
        "lol the bus broke down again, running late, save me a seat",
        "ok ok you win, rematch on friday, loser buys the chips",
    ],
    "cat": [
        "The heron stood in the reeds until the light went out of the water.",
        "In the orchard the last apples fell one by one into the frost.",
        "Rain on the tin roof all night, and in the morning the river was brown.",
    ],
}


def test_users_train_on_the_population_prefix_embedded(tmp_path: Path):
    ctx = build_context(make_settings(tmp_path, max_batch_size=8), base_model=tiny_base_model())
    try:
        with ServerThread(create_app(context=ctx)) as server:
            drive_population(Running(server.base_url, ctx))
    finally:
        ctx.close()


@pytest.fixture
def distributed(
    fresh_postgres_database: str, redis_url: str, s3_server, tmp_path: Path
) -> Iterator[tuple[dict, list[Path]]]:
    """Its own database: the population draws from every user in it."""
    upgrade_to_head(fresh_postgres_database)
    env = distributed_env(
        fresh_postgres_database,
        redis_url,
        s3_server,
        "population",
        STEER_TRAIN_BATCH_SIZE_DEFAULT="2",
        STEER_TRAIN_PREFIX_LEN_DEFAULT="2",
        STEER_TRAIN_MAX_SEQ_LEN="64",
        STEER_MAX_BATCH_SIZE="8",
        STEER_TRAIN_INSTANT_VERSION="false",  # as make_settings: the trained version is each user's first
    )
    with running_workers(env, tmp_path) as logs:
        yield env, logs


@pytest.mark.integration
def test_users_train_on_the_population_prefix_distributed(distributed):
    env, logs = distributed
    ctx = build_context(settings_from_env(env))  # as `steer serve` builds it: the workers hold the model
    try:
        with ServerThread(create_app(context=ctx)) as server:
            drive_population(Running(server.base_url, ctx, logs))
    finally:
        ctx.close()


def drive_population(steer: Running) -> None:
    ctx = steer.ctx
    users = {name: _onboard(steer, name) for name in ("ann", "ben")}

    # Bad requests are refused and create nothing; only the admin trains the population.
    for bad in ({"samples_per_user": 0}, {"max_users": 0}, {"hyperparameters": {"method": "lora"}}):
        assert steer.http.post("/admin/population", json=bad).status_code == 400, bad
    user_key = {"Authorization": f"Bearer {users['ann']['key']}"}
    assert steer.http.post("/admin/population", json={}, headers=user_key).status_code == 403
    with ctx.session_factory() as session:
        assert population_control(session) is None
    # The name is reserved: the controls routes neither create nor retrain it.
    taken = steer.http.post("/controls", json={"name": "population", "samples": WRITERS["ann"]})
    assert taken.status_code == 400 and "/v1/admin/population" in taken.json()["error"]["message"]

    made = steer.http.post("/admin/population", json={"samples_per_user": 2, "hyperparameters": TRAINING})
    assert made.status_code == 201, made.text
    body = made.json()
    assert (body["users"], body["samples"], body["control"]["model"]) == (2, 4, "control:population")
    assert steer.wait(body["job"]["id"])["fine_tuned_model"] == "control:population:v1"
    population_v1 = _active(ctx, body["control"]["id"])

    # A user onboarded now trains on top of it and records the version it trained on.
    users["cat"] = _onboard(steer, "cat")
    cat_v = _active(ctx, users["cat"]["id"])
    assert cat_v.population_version_id == population_v1.id and cat_v.metrics["population_version"] == 1
    events = steer.http.get(f"/fine_tuning/jobs/{users['cat']['job']}/events?limit=100").json()["data"]
    assert any(e["message"] == "Training on top of the population prefix v1" for e in events)
    listed = steer.http.get(f"/users/{users['cat']['id']}/prefixes").json()["data"]
    assert [v["population_version"] for v in listed] == [1]
    ann_v = _active(ctx, users["ann"]["id"])
    assert ann_v.population_version_id is None  # trained before the population existed

    # The openai client: cat's row is population v1 then cat's prefix, as the engine alone;
    # without the population it would differ. Ann is served alone, as she trained.
    expected = {
        "cat": steer.alone_versions([population_v1, cat_v]),
        "ann": steer.alone_versions([ann_v]),
        "base": chat(steer.client(ADMIN_KEY), steer.base.model_id),
    }
    assert expected["cat"] != steer.alone_versions([cat_v])
    burst = ["cat", "ann", "base"] * 3

    def ask(name: str) -> str:
        if name == "base":
            return chat(steer.client(ADMIN_KEY), steer.base.model_id)
        return chat(steer.client(users[name]["key"]), f"user:{name}")

    for model in ("user:cat+population", "user:cat+population:v1"):  # it is in cat's model already
        twice = steer.http.post("/completions", json={"model": model, "prompt": "Hi"})
        assert twice.status_code == 400 and "already includes" in twice.json()["error"]["message"], model
    cat_key = {"Authorization": f"Bearer {users['cat']['key']}"}
    listed_models = {m["id"] for m in steer.http.get("/models", headers=cat_key).json()["data"]}
    assert "user:cat" in listed_models and "user:cat+population" not in listed_models
    with ThreadPoolExecutor(len(burst)) as pool:
        answers = list(pool.map(ask, burst))
    assert answers == [expected[name] for name in burst]

    # A new population version serves no one until they retrain: cat keeps v1.
    again = steer.http.post("/admin/population", json={"samples_per_user": 3, "hyperparameters": TRAINING})
    assert steer.wait(again.json()["job"]["id"])["fine_tuned_model"] == "control:population:v2"
    population_v2 = _active(ctx, body["control"]["id"])
    assert steer.http.post("/controls/population/retrain", json={}).status_code == 400
    events = steer.http.get(f"/fine_tuning/jobs/{again.json()['job']['id']}/events?limit=100").json()["data"]
    assert not any("on top of the population" in e["message"] for e in events)  # it never trains on itself
    assert ask("cat") == expected["cat"]
    retrain = steer.http.post("/admin/retrain", json={"user_ids": [users["cat"]["id"]]})
    assert retrain.status_code == 201, retrain.text
    entry = steer.wait(retrain.json()["data"][0]["id"])["result"]["users"][users["cat"]["id"]]
    with ctx.session_factory() as session:
        retrained = session.scalar(
            select(PrefixVersion).where(
                PrefixVersion.user_id == users["cat"]["id"], PrefixVersion.version == entry["version"]
            )
        )
    assert retrained.population_version_id == population_v2.id
    # Compared with v1 as served (population v1 + cat v1), whichever population it trains on.
    assert retrained.metrics["compared_with_version"] == cat_v.version
    served = _active(ctx, users["cat"]["id"])
    population_of_served = population_v2 if served.id == retrained.id else population_v1
    assert ask("cat") == steer.alone_versions([population_of_served, served])

    # Deleting a sample deletes its copy; erasing a user deletes all their text from the population's samples.
    control_id = body["control"]["id"]
    ben_samples = steer.http.get(f"/users/{users['ben']['id']}/samples").json()["data"]
    copied = [s for s in ben_samples if s["text"] in _population_texts(ctx, control_id)]
    assert copied
    assert steer.http.delete(f"/users/{users['ben']['id']}/samples/{copied[0]['id']}").status_code in (200, 204)
    assert copied[0]["text"] not in _population_texts(ctx, control_id)
    assert _population_texts(ctx, control_id) & set(WRITERS["ann"])
    assert steer.http.delete(f"/users/{users['ann']['id']}").status_code == 200
    left = _population_texts(ctx, control_id)
    assert left and not left & set(WRITERS["ann"])


def _onboard(steer: Running, name: str) -> dict:
    body = {"external_id": name, "samples": WRITERS[name], "hyperparameters": TRAINING}
    response = steer.http.post("/onboarding", json=body)
    assert response.status_code == 201, response.text
    created = response.json()
    steer.wait(created["job"]["id"])
    return {"id": created["user"]["id"], "key": created["api_key"], "job": created["job"]["id"]}


def _active(ctx, subject_id: str) -> PrefixVersion:
    with ctx.session_factory() as session:
        return active_prefix(session, subject_id)


def _population_texts(ctx, control_id: str) -> set[str]:
    with ctx.session_factory() as session:
        return set(session.scalars(select(Sample.text).where(Sample.user_id == control_id)))


def test_a_version_on_a_population_is_compared_as_served(tmp_path: Path, caplog):
    """The no-worse rule scores the active version as the catalog serves it: after the population
    version it trained on; alone once that version is gone or corrupt (as served then too)."""
    settings = make_settings(tmp_path)
    upgrade_to_head(settings.effective_database_url)
    ctx = build_context(settings, base_model=tiny_base_model())
    try:
        base = ctx.base_model()
        holder, user = create_user(ctx, "population-holder"), create_user(ctx, "dee")
        publish_random_prefix(ctx, base, holder, seed=1, prefix_len=3)
        population = _active(ctx, holder.user_id)
        pinned = replace(
            PrefixArtifacts(random_prefix_bytes(base, 2, 2), None, base.model_id, base.fingerprint, 2, {}),
            population_version_id=population.id,
        )
        active = publish_prefix(ctx.session_factory, ctx.store, user.user_id, pinned, job_id=None)
        own = load_prefix(ctx.store.get(active.blob_key), base).kv
        under = load_prefix(ctx.store.get(population.blob_key), base).kv

        served = job_inputs.served_adaptation(ctx, "no-job", base, active)
        assert torch.equal(served.kv, torch.cat([under, own], dim=3))
        with ctx.session_factory.begin() as session:
            session.get(PrefixVersion, population.id).status = "corrupt"
        assert torch.equal(job_inputs.served_adaptation(ctx, "no-job", base, active).kv, own)
        with caplog.at_level(logging.WARNING, logger="core.service.registry"), ctx.session_factory() as session:
            for _ in range(3):  # as three requests would
                assert served_population(session, session.get(PrefixVersion, active.id)) is None
        said = [r.getMessage() for r in caplog.records if "population version is corrupt" in r.getMessage()]
        assert len(said) == 1  # when first served alone (by served_adaptation above), not per request
    finally:
        ctx.close()


def test_a_second_population_request_while_one_trains_is_refused_and_changes_nothing(tmp_path: Path):
    """409 while the population's job is queued or running: a second draw would replace the samples
    under the running job. Once the job has ended, the next request trains again."""
    settings = make_settings(tmp_path)
    upgrade_to_head(settings.effective_database_url)
    factory = make_session_factory(make_engine(settings.effective_database_url))
    with factory.begin() as session:
        for name in ("ann", "ben"):
            user, _ = get_or_create_user(session, name)
            add_samples(session, settings, user, WRITERS[name], "api")
        control, first, _ = train_population(session, settings, 2, 10, TRAINING)
    with factory() as session:
        drawn_first = set(session.scalars(select(Sample.text).where(Sample.user_id == control.id)))
        with pytest.raises(Conflict, match=first.id):
            train_population(session, settings, 3, 10, TRAINING, seed=1)
        session.rollback()
        assert set(session.scalars(select(Sample.text).where(Sample.user_id == control.id))) == drawn_first
        assert session.scalar(select(func.count(Job.id))) == 1
    with factory.begin() as session:
        session.get(Job, first.id).status = "succeeded"
    with factory.begin() as session:
        _, second, counts = train_population(session, settings, 3, 10, TRAINING, seed=1)
    assert second.id != first.id and counts == {"users": 2, "samples": 6}


def test_the_population_trains_itself_once_the_deployment_has_enough_users(tmp_path: Path):
    """`STEER_POPULATION_AUTO_USERS=3`: the third onboarding queues the population ahead of the
    user's job, so that user trains on top of it; a fourth user does not retrain it (not twice the
    users yet); after a failed population job nothing is queued until the admin acts; at twice the
    users it retrains."""
    settings = make_settings(tmp_path, max_batch_size=8, population_auto_users=3)
    ctx = build_context(settings, base_model=tiny_base_model())
    try:
        with ServerThread(create_app(context=ctx)) as server:
            steer = Running(server.base_url, ctx)
            users = {name: _onboard(steer, name) for name in ("ann", "ben")}
            with ctx.session_factory() as session:
                assert population_control(session) is None  # 2 users: not yet
            users["cat"] = _onboard(steer, "cat")
            control_id = _control_id(ctx)
            assert _population_texts(ctx, control_id) & set(WRITERS["cat"])  # drawn from all three
            population = _active(ctx, control_id)
            assert population is not None and population.version == 1
            cat_v = _active(ctx, users["cat"]["id"])
            assert cat_v.population_version_id == population.id  # queued first, trained first

            more = {
                f"u{i}": [f"Note {i}: the train leaves at {i} o'clock.", f"Note {i}: bring {i} maps."] for i in range(4)
            }
            _onboard_texts(steer, "u0", more["u0"])  # 4 users: fewer than twice 3
            assert _active(ctx, control_id).version == 1 and _population_jobs(ctx, control_id) == 1

            with ctx.session_factory.begin() as session:  # the last population job failed
                last = session.scalars(select(Job).order_by(Job.created_at.desc())).all()
                next(j for j in last if j.kind == "control").status = "failed"
            for name in ("u1", "u2"):  # 6 users: twice as many, but the admin has not looked
                _onboard_texts(steer, name, more[name])
            assert _population_jobs(ctx, control_id) == 1
            with ctx.session_factory.begin() as session:
                last = session.scalars(select(Job).order_by(Job.created_at.desc())).all()
                next(j for j in last if j.kind == "control").status = "succeeded"
            _onboard_texts(steer, "u3", more["u3"])  # 7 >= 2 x 3: retrained on everyone's text
            assert _population_jobs(ctx, control_id) == 2
            with ctx.session_factory() as session:  # u3's own job may have run first (fair turns)
                newest = session.scalars(
                    select(Job).where(Job.kind == "control").order_by(Job.created_at.desc())
                ).first()
            assert steer.wait(newest.id)["fine_tuned_model"] == "control:population:v2"
            assert _population_texts(ctx, control_id) & set(more["u3"])
    finally:
        ctx.close()


def _onboard_texts(steer: Running, name: str, texts: list[str]) -> None:
    body = {"external_id": name, "samples": texts, "hyperparameters": TRAINING}
    response = steer.http.post("/onboarding", json=body)
    assert response.status_code == 201, response.text
    steer.wait(response.json()["job"]["id"])


def _control_id(ctx) -> str:
    with ctx.session_factory() as session:
        return population_control(session).id


def _population_jobs(ctx, control_id: str) -> int:
    with ctx.session_factory() as session:
        return sum(1 for j in session.scalars(select(Job).where(Job.kind == "control")) if control_id in j.user_ids)
