"""`steer bench onboarding` on a real `steer serve` (tiny model): every user onboarded at once is
served by their own instant version before their training ends, and both arms train everyone."""

from __future__ import annotations

import pytest

from api.commands.onboarding_bench import OnboardingBenchConfig, run_onboarding_bench, writing_of

SETTINGS = {"STEER_TRAIN_MAX_STEPS_DEFAULT": "20", "STEER_TRAIN_MAX_SEQ_LEN": "64"}  # too few steps to stop early


@pytest.fixture(scope="module")
def report():
    return run_onboarding_bench(OnboardingBenchConfig(users=3, samples=8, base_model="tiny", settings=SETTINGS))


def test_every_user_answers_with_an_instant_version_before_their_training_ends(report):
    assert report["users_without_instant_answer"] == []
    assert report["job_status"] == ["succeeded"]
    for instant, trained in zip(report["instant"]["each_s"], report["trained"]["each_s"]):
        assert instant < trained
    # the third user's job waited for two others, and was served all the while
    assert max(report["trained"]["each_s"]) > max(report["instant"]["each_s"])


def test_one_at_a_time_and_batched_train_every_user_the_same_steps(report):
    assert report["one_at_a_time"]["steps"] == [20, 20, 20]
    assert report["batched"]["status"] == "succeeded" and report["batched"]["steps"] == [20, 20, 20]
    assert report["batched_over_one_at_a_time"] > 0


def test_each_user_writes_as_a_different_president():
    writing = writing_of(3, 5)
    assert list(writing) == ["jackson", "vanburen", "tyler"] and all(len(t) == 5 for t in writing.values())
    with pytest.raises(ValueError, match="at most 16"):
        writing_of(17, 5)
