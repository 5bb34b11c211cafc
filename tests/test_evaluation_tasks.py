"""Voice and task measures (core/evaluation/tasks.py): what counts as degenerate and as relevant,
and the answers every adaptation gives the request bank, greedy and sampled, at any style strength."""

import pytest
import torch

from core.evaluation.generations import StyleJudge
from core.evaluation.tasks import (
    GREEDY,
    TASK_REQUESTS,
    at_strength,
    is_degenerate,
    is_relevant,
    measure_tasks,
)
from core.tuners.preservation import ANCHOR_REQUESTS
from tests.engine_fixtures import ALICE, BOB, tiny  # noqa: F401

WEEKEND = TASK_REQUESTS[0]


@pytest.mark.parametrize(
    "text",
    [
        "",
        "  \n ",
        "#\n\n#\n\n#\n\n#",
        "I'm sure you'll find a great topic to discuss. " * 5,
        "the the the the the the the the the the the the",
        "```\n```\n```",
    ],
)
def test_degenerate_answers_are_caught(text):
    assert is_degenerate(text)


@pytest.mark.parametrize(
    "text",
    [
        "Hi Sam, the weekend was lovely: we walked by the river on Saturday and slept all Sunday.",
        "Dear all,\nThe deadline moves to Friday.\nThanks,\nAnn",
        "Yes. Yes, I will come. Yes, gladly.",  # short repeated words, but no repeated sentence of 3+ words
    ],
)
def test_ordinary_answers_are_not_degenerate(text):
    assert not is_degenerate(text)


def test_relevance_is_naming_the_requests_topic():
    assert is_relevant("My weekend? Quiet.", WEEKEND)
    assert is_relevant("On Saturdays we bake.", WEEKEND)
    assert not is_relevant("The quarterly figures look strong and costs fell.", WEEKEND)


def test_the_request_bank_is_kept_apart_from_every_training_request():
    assert not {r.text for r in TASK_REQUESTS} & set(ANCHOR_REQUESTS)
    assert all(r.stems for r in TASK_REQUESTS) and len({r.text for r in TASK_REQUESTS}) == len(TASK_REQUESTS)


def test_every_adaptation_answers_every_request_greedy_and_sampled(tiny):
    g = tiny.geometry
    kv = torch.randn(g.num_layers, 2, g.num_kv_heads, 3, g.head_dim, generator=torch.Generator().manual_seed(1)) * 3
    judge = StyleJudge({"alice": ALICE, "bob": BOB})
    measured = measure_tasks(tiny, {"alice": None, "bob": kv}, judge)
    for decoding in ("greedy", "sampled"):
        result = measured[decoding]
        answers = result["answers"]
        assert set(answers) == {"alice", "bob"} and all(len(a) == len(TASK_REQUESTS) for a in answers.values())
        for user, texts in answers.items():
            share = sum(map(is_degenerate, texts)) / len(texts)
            assert result["per_user"][user]["degenerate"] == share
        assert 0 <= result["overall"]["judge_attribution"] <= 1
    # greedy answers of the base model do not depend on whose seeds drew them; the prefix's differ
    assert measured["greedy"]["answers"]["alice"] != measured["greedy"]["answers"]["bob"]
    # strength 0 is the base model's answer, for every request
    at_zero = measure_tasks(tiny, {"bob": kv}, None, at_strength(0.0))
    alone = measure_tasks(tiny, {"bob": None}, None, (GREEDY,))
    assert at_zero["greedy"]["answers"]["bob"] == alone["greedy"]["answers"]["bob"]
