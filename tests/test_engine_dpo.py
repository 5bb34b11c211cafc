"""Preference tuning (DPO) in the one training loop: multi-user equals alone, the reference is where
the user stands, the exported prefix scores as it trained, and it learns what the pairs prefer."""

import math
from dataclasses import replace

import pytest
import torch

from core.engine.data import split_samples
from core.engine.lora import LoRAConfig
from core.errors import InvalidTrainingData
from core.tuners.base import TrainingConfig, UserData
from core.tuners.loop import token_losses
from core.tuners.preference import NO_PREFERENCE_LOSS, OBJECTIVE_DPO, PreferencePair, pair_rows, preference_score
from core.tuners.prefix_training import train_prefixes
from core.tuners.registry import LORA
from core.tuners.train import train_adapters
from tests.engine_fixtures import small_training_config as _config
from tests.engine_fixtures import tiny  # noqa: F401

TOPICS = ["the garden", "the roses", "the morning", "the weekend", "the river", "the letter", "the train", "tea"]


def _pairs(preferred_style: str, rejected_style: str, n: int = 8) -> list[PreferencePair]:
    return [
        PreferencePair(
            ({"role": "user", "content": f"Write a line about {topic}."},),
            preferred_style.format(topic=topic),
            rejected_style.format(topic=topic),
        )
        for topic in TOPICS[:n]
    ]


ALICE_PAIRS = _pairs("Oh, {topic}! Lovely, lovely, lovely.", "Regarding {topic}: see the attached report.")
BOB_PAIRS = _pairs("Re {topic}: numbers attached, costs down.", "Oh, {topic}! Lovely, lovely, lovely.", n=6)


def _dpo(**overrides) -> TrainingConfig:
    values = dict(objective=OBJECTIVE_DPO, dpo_beta=0.5, val_fraction=0.25, learning_rate=3e-2, max_steps=8)
    values.update(overrides)
    return _config(**values)


def _users():
    return [UserData("alice", [], pairs=ALICE_PAIRS), UserData("bob", [], pairs=BOB_PAIRS)]


def test_a_multi_user_dpo_job_equals_each_user_trained_alone(tiny):
    config = _dpo(preservation_weight=0.5)
    together = train_prefixes(tiny, _users(), config)
    for user, joint in zip(_users(), together):
        (alone,) = train_prefixes(tiny, [user], config)
        assert joint.metrics["steps"] == alone.metrics["steps"] == config.max_steps
        assert joint.metrics["objective"] == OBJECTIVE_DPO
        torch.testing.assert_close(joint.kv, alone.kv, atol=1e-5, rtol=1e-4)
        assert abs(joint.metrics["val_loss"] - alone.metrics["val_loss"]) < 1e-5
    assert not torch.allclose(together[0].kv, together[1].kv)  # they learned different preferences


def test_a_multi_user_lora_dpo_job_equals_each_user_trained_alone(tiny):
    config = _dpo(method=LORA, lora=LoRAConfig(rank=2))
    together = train_adapters(tiny, _users(), config)
    for user, joint in zip(_users(), together):
        (alone,) = train_adapters(tiny, [user], config)
        for name, (a, b) in joint.adaptation.lora.modules.items():
            a_alone, b_alone = alone.adaptation.lora.modules[name]
            torch.testing.assert_close(a, a_alone, atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(b, b_alone, atol=1e-5, rtol=1e-4)


def test_dpo_learns_the_preference_on_held_out_pairs(tiny):
    (result,) = train_prefixes(tiny, [UserData("alice", [], pairs=ALICE_PAIRS)], _dpo(max_steps=20))
    before, after = result.metrics["initial_preference"], result.metrics["preference"]
    assert result.metrics["val_samples"] == 2  # pairs held out, never trained on
    assert after["loss"] < before["loss"]
    assert after["accuracy"] == 1.0 and after["margin"] > 0
    assert result.metrics["val_loss"] == pytest.approx(after["loss"])


def test_the_reference_is_the_users_stored_version_so_a_job_starts_at_no_preference(tiny):
    """Starting from the active version with that version as the reference, every margin is zero:
    the first held-out loss is ln 2, whatever the version learned before."""
    (first,) = train_prefixes(tiny, [UserData("alice", [], pairs=ALICE_PAIRS)], _dpo())
    again = UserData("alice", [], pairs=ALICE_PAIRS, resume_state=first.state, reference_kv=first.kv)
    (second,) = train_prefixes(tiny, [again], _dpo())
    start = second.metrics["initial_preference"]
    assert start["loss"] == pytest.approx(NO_PREFERENCE_LOSS, abs=1e-4)
    assert abs(start["margin"]) < 1e-3
    assert second.metrics["reference_val_loss"] == pytest.approx(math.log(2))
    # Without a reference the base model is one: a fresh prefix starts away from it.
    assert abs(first.metrics["initial_preference"]["margin"]) > 1e-3


def test_the_exported_prefix_scores_the_held_out_pairs_as_it_did_in_training(tiny):
    """Export == training form: the stored KV, scored outside the loop against the base model (the
    reference of a first version), gives the score the loop recorded for the kept checkpoint."""
    config = _dpo(max_steps=10)
    (result,) = train_prefixes(tiny, [UserData("alice", [], pairs=ALICE_PAIRS)], config)
    held_out = [ALICE_PAIRS[i] for i in _held_out_indices(config)]
    rows = [pair_rows(tiny.tokenizer, pair, config.max_seq_len) for pair in held_out]

    def nll(kv):
        flat = [row for pair in rows for row in (pair.preferred, pair.rejected)]
        losses, scored = token_losses(tiny, flat, [kv] * len(flat))
        return losses.sum(dim=1).tolist(), scored.sum(dim=1).tolist()

    with torch.no_grad():
        base_sums, _ = nll(None)
        sums, counts = nll(result.kv)
    for i, pair in enumerate(rows):
        pair.reference_preferred, pair.reference_rejected = -base_sums[2 * i], -base_sums[2 * i + 1]
    score = preference_score(rows, list(zip(sums[0::2], sums[1::2])), counts[0::2], config.dpo_beta)
    recorded = result.metrics["preference"]
    assert score.loss == pytest.approx(recorded["loss"], abs=1e-4)
    assert score.accuracy == recorded["accuracy"]
    assert score.preferred_nll == pytest.approx(recorded["preferred_nll"], rel=1e-4)


def _held_out_indices(config: TrainingConfig) -> list[int]:
    indices = list(range(len(ALICE_PAIRS)))
    _, val = split_samples(indices, config.val_fraction, config.seed)
    return val


def test_bad_preference_jobs_are_refused(tiny):
    with pytest.raises(InvalidTrainingData, match="no preference pairs"):
        train_prefixes(tiny, [UserData("alice", ["some text here"])], _dpo())
    with pytest.raises(InvalidTrainingData, match="objective"):
        train_prefixes(tiny, [UserData("alice", [], pairs=ALICE_PAIRS)], replace(_dpo(), objective="ppo"))
    long_request = PreferencePair(({"role": "user", "content": "word " * 200},), "yes", "no")
    with pytest.raises(InvalidTrainingData, match="request takes"):
        train_prefixes(tiny, [UserData("alice", [], pairs=[long_request])], _dpo())
