"""Learning from use, through the unchanged `openai` client over HTTP on the embedded service:
feedback on a user's answers (scoping, bad input, opt-in, erasure), preference files and DPO jobs
(`method={"type": "dpo"}`), and the loop that retrains a user after K feedback items."""

from __future__ import annotations

import json
import time
from contextlib import contextmanager

import httpx
import openai
import pytest
from openai import OpenAI
from sqlalchemy import func, select

from core.db.models import Feedback, PreferencePairRecord, Sample, StoredCompletion
from core.engine.data import clean_text
from tests.support.api import ADMIN_KEY, SAMPLES, served_embedded

JOB_TIMEOUT_S = 240
ASK = [{"role": "user", "content": "Write a short note about the weekend."}]


def preference_line(topic: str, preferred: str, rejected: str) -> str:
    return json.dumps(
        {
            "input": {"messages": [{"role": "user", "content": f"Write a line about {topic}."}]},
            "preferred_output": [{"role": "assistant", "content": preferred}],
            "non_preferred_output": [{"role": "assistant", "content": rejected}],
        }
    )


TOPICS = ["the harbour", "the bakery", "the river", "the cat", "the weather", "the letter"]
PREFERENCE_FILE = (
    "\n".join(
        preference_line(t, f"Oh, {t}! Lovely, lovely.", f"Regarding {t}: see the attached report.") for t in TOPICS
    )
    + "\n"
).encode()


class Steer:
    def __init__(self, base_url: str, ctx) -> None:
        self.base_url, self.ctx = base_url, ctx
        self.http = httpx.Client(base_url=base_url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=60)

    def client(self, key: str = ADMIN_KEY) -> OpenAI:
        return OpenAI(base_url=self.base_url, api_key=key, max_retries=0)

    def onboard(self, external_id: str) -> tuple[str, str]:
        body = self.http.post("/onboarding", json={"external_id": external_id, "samples": SAMPLES}).json()
        self.wait(body["job"]["id"])
        return body["user"]["id"], body["api_key"]

    def wait(self, job_id: str) -> dict:
        deadline = time.monotonic() + JOB_TIMEOUT_S
        while time.monotonic() < deadline:
            job = self.http.get(f"/fine_tuning/jobs/{job_id}").json()
            if job["status"] in ("succeeded", "failed", "cancelled"):
                return job
            time.sleep(0.2)
        raise AssertionError(f"job {job_id} did not finish")

    def feedback(self, completion_id: str, key: str = ADMIN_KEY, **body) -> httpx.Response:
        return httpx.post(
            f"{self.base_url}/chat/completions/{completion_id}/feedback",
            json=body,
            headers={"Authorization": f"Bearer {key}"},
            timeout=60,
        )

    def count(self, model, **where) -> int:
        with self.ctx.session_factory() as session:
            query = select(func.count()).select_from(model)
            for name, value in where.items():
                query = query.where(getattr(model, name) == value)
            return session.execute(query).scalar_one()


@contextmanager
def steer(tmp_path, **settings):
    with served_embedded(tmp_path, **settings) as (base_url, ctx):
        yield Steer(base_url, ctx)


def test_feedback_on_answers_becomes_samples_and_pairs_only_for_their_own_user(tmp_path):
    with steer(tmp_path, feedback_enabled=True) as service:
        ann_id, ann_key = service.onboard("ann")
        ben_id, ben_key = service.onboard("ben")
        ann, ben = service.client(ann_key), service.client(ben_key)
        answer = ann.chat.completions.create(model="user:ann", messages=ASK, max_tokens=12, n=2, temperature=0.9)
        draft = answer.choices[1].message.content
        samples_before = service.count(Sample, user_id=ann_id)

        # Another user's key, an unknown id and the base model's answers are all "no such completion".
        assert service.feedback(answer.id, ben_key, kind="accepted").status_code == 404
        assert service.feedback("chatcmpl-" + "0" * 32, ann_key, kind="accepted").status_code == 404
        base = ann.chat.completions.create(model=ann.models.list().data[0].id, messages=ASK, max_tokens=4)
        assert service.feedback(base.id, ann_key, kind="accepted").status_code == 404
        # Bad input: a clear 400/422 and nothing changes.
        for body in (
            {"kind": "edited"},  # an edit without its text
            {"kind": "edited", "final_text": draft, "choice_index": 1},  # an "edit" that changed nothing
            {"kind": "edited", "final_text": ""},
            {"kind": "accepted", "final_text": "why a text?"},
            {"kind": "loved"},
            {"kind": "accepted", "choice_index": 2},
        ):
            refused = service.feedback(answer.id, ann_key, **body)
            assert refused.status_code in (400, 422), (body, refused.text)
            assert refused.json()["error"]["message"]
        assert service.count(Feedback) == 0 and service.count(PreferencePairRecord) == 0
        assert service.count(Sample, user_id=ann_id) == samples_before

        # Accepted: the answer is now a sample of the user's. Edited: the edit a sample and a pair.
        accepted = service.feedback(answer.id, ann_key, kind="accepted")
        assert accepted.status_code == 201, accepted.text
        assert (accepted.json()["samples_added"], accepted.json()["pairs_added"]) == (1, 0)
        assert service.feedback(answer.id, ann_key, kind="accepted").status_code == 409  # twice the same
        edit = "A proper note: the weekend was long, slow, and full of bread."
        edited = service.feedback(answer.id, ADMIN_KEY, kind="edited", final_text=edit, choice_index=1)
        assert edited.status_code == 201, edited.text
        assert (edited.json()["samples_added"], edited.json()["pairs_added"]) == (1, 1)
        with service.ctx.session_factory() as session:
            (pair,) = session.execute(select(PreferencePairRecord)).scalars()
            texts = set(session.execute(select(Sample.text).where(Sample.user_id == ann_id)).scalars())
        assert (pair.user_id, pair.preferred, pair.rejected, pair.source) == (
            ann_id,
            edit,
            clean_text(draft),
            "feedback",
        )
        assert pair.messages == ASK
        assert {clean_text(answer.choices[0].message.content), edit} <= texts
        # A rejected answer with nothing instead is recorded, and trains nothing.
        other = ben.chat.completions.create(model="user:ben", messages=ASK, max_tokens=8)
        rejected = service.feedback(other.id, ben_key, kind="rejected")
        assert (rejected.status_code, rejected.json()["pairs_added"], rejected.json()["samples_added"]) == (201, 0, 0)

        # Erasure takes the user's completions, feedback and pairs with it.
        assert service.http.delete(f"/users/{ann_id}").status_code == 200
        assert service.count(StoredCompletion, user_id=ann_id) == 0
        assert service.count(Feedback, user_id=ann_id) == 0
        assert service.count(PreferencePairRecord, user_id=ann_id) == 0
        assert service.count(StoredCompletion, user_id=ben_id) == 1


def test_nothing_is_kept_without_the_deployments_opt_in(tmp_path):
    with steer(tmp_path) as service:
        _, ann_key = service.onboard("ann")
        answer = service.client(ann_key).chat.completions.create(model="user:ann", messages=ASK, max_tokens=6)
        streamed = service.client(ann_key).chat.completions.create(
            model="user:ann", messages=ASK, max_tokens=6, stream=True
        )
        assert "".join(chunk.choices[0].delta.content or "" for chunk in streamed if chunk.choices) is not None
        assert service.count(StoredCompletion) == 0
        assert service.feedback(answer.id, ann_key, kind="accepted").status_code == 404


def test_a_streamed_answer_is_kept_for_feedback_too(tmp_path):
    with steer(tmp_path, feedback_enabled=True) as service:
        _, ann_key = service.onboard("ann")
        chunks = list(
            service.client(ann_key).chat.completions.create(model="user:ann", messages=ASK, max_tokens=6, stream=True)
        )
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        with service.ctx.session_factory() as session:
            (kept,) = session.execute(select(StoredCompletion)).scalars()
        assert (kept.id, kept.answers, kept.messages) == (chunks[0].id, [text], ASK)


def test_the_openai_client_creates_a_dpo_job_from_a_preference_file(tmp_path):
    with steer(tmp_path, train_max_steps_default=4) as service:
        ann_id, ann_key = service.onboard("ann")
        ann = service.client(ann_key)
        file = ann.files.create(file=("prefs.jsonl", PREFERENCE_FILE), purpose="fine-tune")
        job = ann.fine_tuning.jobs.create(
            model="user:ann",
            training_file=file.id,
            method={"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.2}}},
        )
        assert job.to_dict()["hyperparameters"]["objective"] == "dpo"
        done = service.wait(job.id)
        assert done["status"] == "succeeded", done
        (entry,) = done["result"]["users"].values()
        metrics = entry["metrics"]
        assert metrics["objective"] == "dpo" and metrics["train_samples"] == 5 and metrics["val_samples"] == 1
        assert set(metrics["preference"]) >= {"loss", "accuracy", "margin", "preferred_nll"}
        assert done["hyperparameters"]["beta"] == 0.2
        # Compared with its reference (the active version), from where it started: a zero margin.
        assert metrics["initial_preference"]["margin"] == pytest.approx(0.0, abs=1e-2)
        assert service.count(PreferencePairRecord, user_id=ann_id, source="file") == len(TOPICS)
        events = [e.message for e in ann.fine_tuning.jobs.list_events(job.id, limit=50).data]
        assert any("preference pair(s) added" in message for message in events)
        # The version it published answers like any other.
        reply = ann.chat.completions.create(model=entry["model"], messages=ASK, max_tokens=6)
        assert reply.choices[0].message.content is not None


def test_a_job_whose_file_does_not_fit_its_method_is_refused_naming_the_line(tmp_path):
    with steer(tmp_path) as service:
        ann_id, ann_key = service.onboard("ann")
        ann = service.client(ann_key)
        prefs = ann.files.create(file=("prefs.jsonl", PREFERENCE_FILE), purpose="fine-tune")
        texts = ann.files.create(
            file=("texts.jsonl", b'{"text": "one of my notes, as I write them"}\n'), purpose="fine-tune"
        )
        jobs_before = len(ann.fine_tuning.jobs.list().data)
        with pytest.raises(openai.BadRequestError) as refused:
            ann.fine_tuning.jobs.create(model="user:ann", training_file=prefs.id)
        assert "line 1" in refused.value.body["message"] and "dpo" in refused.value.body["message"]
        with pytest.raises(openai.BadRequestError) as refused:
            ann.fine_tuning.jobs.create(model="user:ann", training_file=texts.id, method={"type": "dpo"})
        assert "line 1" in refused.value.body["message"] and "preference" in refused.value.body["message"]
        no_pairs = service.http.post("/fine_tuning/jobs", json={"model": "user:ann", "method": {"type": "dpo"}})
        assert no_pairs.status_code == 400 and no_pairs.json()["error"]["param"] == "training_file"
        with pytest.raises(openai.BadRequestError) as refused:
            ann.fine_tuning.jobs.create(model="user:ann", training_file=texts.id, hyperparameters={"beta": 0.1})
        assert "beta" in refused.value.body["message"]
        with pytest.raises(openai.BadRequestError):
            ann.fine_tuning.jobs.create(model="user:ann", training_file=prefs.id, method={"type": "reinforcement"})
        # A bad preference line is refused at upload, by its number.
        bad = PREFERENCE_FILE + json.dumps({"input": {"messages": ASK}, "preferred_output": []}).encode() + b"\n"
        with pytest.raises(openai.BadRequestError) as refused:
            ann.files.create(file=("bad.jsonl", bad), purpose="fine-tune")
        assert f"line {len(TOPICS) + 1}" in refused.value.body["message"]
        assert len(ann.fine_tuning.jobs.list().data) == jobs_before
        assert service.count(PreferencePairRecord) == 0


def test_the_loop_closes_itself_after_k_feedback_items(tmp_path):
    """STEER_FEEDBACK_RETRAIN_AFTER=2: the second feedback item queues a DPO job on the user's pairs,
    which publishes a new version."""
    with steer(tmp_path, feedback_enabled=True, feedback_retrain_after=2, train_max_steps_default=3) as service:
        _, ann_key = service.onboard("ann")
        ann = service.client(ann_key)
        answers = [
            ann.chat.completions.create(model="user:ann", messages=ASK, max_tokens=8, seed=i, temperature=1.0)
            for i in range(2)
        ]
        first = service.feedback(answers[0].id, ann_key, kind="edited", final_text="My weekend: bread, a walk, a nap.")
        assert first.status_code == 201 and first.json()["job"] is None
        second = service.feedback(answers[1].id, ann_key, kind="edited", final_text="The weekend went by in a blur.")
        assert second.status_code == 201 and second.json()["job"] is not None
        job = service.wait(second.json()["job"])
        assert job["status"] == "succeeded", job
        assert job["hyperparameters"]["objective"] == "dpo"
        (entry,) = job["result"]["users"].values()
        assert entry["version"] == 2
