"""Every tuning method trains through the one loop of core/tuners/loop.py: prompt tuning and LoRA get
the multi-user guarantee, epochs, early stopping and checkpoint restore exactly as prefixes do."""

import pytest
import torch

from core.engine.data import build_examples, prepare_samples, split_samples
from core.engine.model import weights_fingerprint
from core.evaluation.baselines import GroupedScorer, train_baseline
from core.evaluation.metrics import PrefixScorer
from core.tuners.base import TrainingConfig, UserData
from core.tuners.peft_lora import LoRA
from core.tuners.prefix_training import train_prefixes
from core.tuners.prompt_tuning import PromptTuning
from tests.engine_fixtures import tiny  # noqa: F401
from tests.test_engine_training import ALICE, BOB, CAROL, _config


def _trained(method, user: str) -> dict[str, torch.Tensor]:
    return method.export(method.modules[user])


def test_prompt_tuning_multi_user_batch_equals_each_user_trained_alone(tiny):
    config = _config()
    users = [UserData("alice", ALICE), UserData("bob", BOB), UserData("carol", CAROL)]
    joint = PromptTuning(tiny, 4)
    metrics = train_baseline(tiny, joint, users, config)
    for user in users:
        alone = PromptTuning(tiny, 4)
        alone_metrics = train_baseline(tiny, alone, [user], config)[user.user_id]
        assert metrics[user.user_id]["steps"] == alone_metrics["steps"] == config.max_steps
        torch.testing.assert_close(
            _trained(joint, user.user_id)["prompt"], _trained(alone, user.user_id)["prompt"], atol=1e-5, rtol=1e-4
        )
    assert not torch.allclose(_trained(joint, "alice")["prompt"], _trained(joint, "bob")["prompt"])
    assert metrics["bob"]["preservation_kl"] is not None  # the preservation term applies to baselines too


def test_lora_two_users_in_one_job_equal_each_user_trained_alone(tiny):
    pytest.importorskip("peft")
    config = _config(learning_rate=3e-2, max_steps=4)
    before = weights_fingerprint(tiny.model)
    joint = LoRA(tiny, rank=2)
    metrics = train_baseline(tiny, joint, [UserData("alice", ALICE), UserData("bob", BOB)], config)
    for user, samples in (("alice", ALICE), ("bob", BOB)):
        alone = LoRA(tiny, rank=2)
        train_baseline(tiny, alone, [UserData(user, samples)], config)
        joint_weights, alone_weights = _trained(joint, user), _trained(alone, user)
        assert joint_weights.keys() == alone_weights.keys() and joint_weights
        for name in joint_weights:
            torch.testing.assert_close(joint_weights[name], alone_weights[name], atol=1e-5, rtol=1e-4)
    trained_b = [w for n, w in _trained(joint, "bob").items() if "lora_B" in n]
    assert all(w.abs().max() > 0 for w in trained_b)  # B starts at zero: the adapter did train
    assert metrics["bob"]["served_params"] == sum(w.numel() for w in _trained(joint, "bob").values())
    assert metrics["bob"]["preservation_kl"] is not None
    assert weights_fingerprint(tiny.model) == before  # PEFT patched a private copy, not the base


def _train(tiny, method: str, config: TrainingConfig):
    """(metrics, scorer) of `method` trained for bob alone."""
    if method == "prefix":
        trained = train_prefixes(tiny, [UserData("bob", BOB)], config)[0]
        return trained.metrics, PrefixScorer(tiny, {"bob": trained.kv})
    prompt = PromptTuning(tiny, 4)
    return train_baseline(tiny, prompt, [UserData("bob", BOB)], config)["bob"], GroupedScorer(prompt)


def _val_loss(tiny, scorer, config: TrainingConfig) -> float:
    """Bob's validation loss under the returned adaptation, scored outside the loop."""
    _, val = split_samples(prepare_samples(BOB), config.val_fraction, config.seed)
    rows = build_examples(tiny.tokenizer, val, config.max_seq_len, config.formats)
    sums, counts = scorer.loss_sums(rows, ["bob"] * len(rows))
    return float(sums.sum() / counts.sum())


@pytest.mark.parametrize("method", ["prefix", "prompt"])
def test_epochs_cap_the_steps_of_every_method(tiny, method):
    config = _config(max_steps=50, epochs=1.5)
    metrics, _ = _train(tiny, method, config)
    per_epoch = -(-metrics["train_examples"] // config.batch_size)
    assert metrics["steps"] == -(-3 * per_epoch // 2) < config.max_steps
    assert not metrics["stopped_early"]


@pytest.mark.parametrize("method", ["prefix", "prompt"])
def test_early_stopping_restores_the_best_checkpoint_for_every_method(tiny, method):
    # A huge learning rate soon makes validation worse: training stops `patience` evaluations after
    # the best one and returns the state of that best evaluation.
    config = _config(max_steps=40, learning_rate=50.0, patience=2)
    metrics, scorer = _train(tiny, method, config)
    assert metrics["stopped_early"] and metrics["steps"] < config.max_steps
    assert metrics["steps"] - metrics["best_step"] == config.patience * config.eval_every
    assert metrics["val_loss"] <= metrics["initial_val_loss"]
    assert _val_loss(tiny, scorer, config) == pytest.approx(metrics["val_loss"], rel=1e-4)
