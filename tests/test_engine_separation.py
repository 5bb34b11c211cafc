"""The separation term: each user's prefix should fit the user's own rows better than the other
users' prefixes of the same job do (what attribution asks of a prefix)."""

from dataclasses import replace

import pytest
import torch

from core.data import FORMAT_PLAIN, build_examples
from core.prefix import PrefixConfig
from core.training import TrainingConfig, UserData, _token_loss_sums, train_prefixes
from tests.engine_fixtures import tiny  # noqa: F401

# One shared frame, different words: most of what a prefix can learn here is common to both users.
ALICE = [f"Today I wrote {i} letters about gardens, roses and the quiet of early mornings." for i in range(12)]
BOB = [f"Today I wrote {i} letters about revenue, costs and the quarterly figures we report." for i in range(12)]
ALICE_UNSEEN = [f"Today I wrote {i} letters about gardens, roses and the quiet of early mornings." for i in range(40, 46)]
BOB_UNSEEN = [f"Today I wrote {i} letters about revenue, costs and the quarterly figures we report." for i in range(40, 46)]


def _config(**overrides) -> TrainingConfig:
    values = dict(
        prefix=PrefixConfig(prefix_len=4, embedding_dim=16, hidden_dim=32),
        learning_rate=3e-2, max_steps=16, batch_size=3, max_seq_len=48, eval_every=4, patience=100,
        warmup_steps=1, seed=3, preservation_weight=0.0, preservation_anchors=4, preservation_len=16,
        formats=(FORMAT_PLAIN,),
    )
    values.update(overrides)
    return TrainingConfig(**values)


@torch.no_grad()
def _mean_loss(base, kv, texts) -> float:
    rows = build_examples(base.tokenizer, texts, 48, (FORMAT_PLAIN,))
    sums, counts = _token_loss_sums(base, rows, [kv] * len(rows))
    return float(sums.sum() / counts.sum())


def _gaps(base, trained) -> list[float]:
    """Per user, on their unseen text: the other prefix's loss minus their own (higher: better told apart)."""
    alice, bob = trained
    return [
        _mean_loss(base, bob.kv, ALICE_UNSEEN) - _mean_loss(base, alice.kv, ALICE_UNSEEN),
        _mean_loss(base, alice.kv, BOB_UNSEEN) - _mean_loss(base, bob.kv, BOB_UNSEEN),
    ]


@pytest.mark.parametrize("preservation_weight", [0.0, 1.0])
def test_separation_tells_the_users_of_a_job_apart_on_unseen_text(tiny, preservation_weight):
    users = [UserData("alice", ALICE), UserData("bob", BOB)]
    base_config = _config(preservation_weight=preservation_weight)  # the two terms add up
    plain = _gaps(tiny, train_prefixes(tiny, users, base_config))
    separated = train_prefixes(tiny, users, replace(base_config, separation_weight=4.0, separation_margin=1.0))
    apart = _gaps(tiny, separated)
    assert all(a > p + 0.05 for a, p in zip(apart, plain)), (plain, apart)
    # ... and each user still learned their own text.
    assert all(t.metrics["val_loss"] < t.metrics["initial_val_loss"] for t in separated)


def test_separation_has_no_effect_on_a_job_of_one_user(tiny):
    alone = train_prefixes(tiny, [UserData("bob", BOB)], _config(max_steps=5))[0]
    asked = train_prefixes(tiny, [UserData("bob", BOB)], _config(max_steps=5, separation_weight=4.0))[0]
    torch.testing.assert_close(asked.kv, alone.kv, atol=0, rtol=0)


def test_separation_couples_users_and_is_off_by_default(tiny):
    """Off by default, a user's prefix does not depend on who else is in the job; on, it does."""
    config = replace(_config(max_steps=5), separation_weight=TrainingConfig.separation_weight)
    assert config.separation_weight == 0
    alone = train_prefixes(tiny, [UserData("bob", BOB)], config)[0]
    beside = train_prefixes(tiny, [UserData("alice", ALICE), UserData("bob", BOB)], config)[1]
    coupled = train_prefixes(tiny, [UserData("alice", ALICE), UserData("bob", BOB)], replace(config, separation_weight=4.0))[1]
    torch.testing.assert_close(beside.kv, alone.kv, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(coupled.kv, alone.kv, atol=1e-4)
