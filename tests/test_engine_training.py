"""Training: frozen base, multi-user batches equal to single-user jobs, cancellation, resuming."""

from dataclasses import replace

import pytest
import torch

from core.engine.model import weights_fingerprint
from core.engine.prefix import INIT_RANDOM, PrefixConfig
from core.errors import InvalidTrainingData, TrainingCancelled
from core.tuners.base import UserData
from core.tuners.prefix_training import train_prefixes
from tests.engine_fixtures import ALICE, BOB, CAROL, tiny  # noqa: F401
from tests.engine_fixtures import small_training_config as _config


def test_multi_user_batch_equals_each_user_trained_alone(tiny):
    config = _config()
    users = [UserData("alice", ALICE), UserData("bob", BOB), UserData("carol", CAROL)]
    together = train_prefixes(tiny, users, config)
    for user, joint in zip(users, together):
        alone = train_prefixes(tiny, [user], config)[0]
        assert joint.user_id == user.user_id
        assert joint.metrics["steps"] == alone.metrics["steps"] == config.max_steps
        torch.testing.assert_close(joint.kv, alone.kv, atol=1e-5, rtol=1e-4)
    # and the users really did train to different prefixes
    assert not torch.allclose(together[0].kv, together[1].kv)


@pytest.mark.parametrize("users_per_pass", [1, 2])
def test_passes_of_fewer_users_train_what_one_pass_of_all_trains(tiny, users_per_pass):
    """Bounded memory: a step split into passes of at most N users gives every user the same prefix."""
    users = [UserData("alice", ALICE), UserData("bob", BOB), UserData("carol", CAROL)]
    config = _config(preservation_weight=0.5)
    one_pass = train_prefixes(tiny, users, config)
    in_passes = train_prefixes(tiny, users, replace(config, users_per_pass=users_per_pass))
    for whole, split in zip(one_pass, in_passes):
        assert split.metrics["steps"] == whole.metrics["steps"]
        torch.testing.assert_close(split.kv, whole.kv, atol=1e-5, rtol=1e-4)


def test_multi_user_batch_equals_alone_without_reparameterization_and_random_init(tiny):
    prefix = PrefixConfig(prefix_len=3, reparameterize=False, init=INIT_RANDOM)
    config = _config(prefix=prefix)
    together = train_prefixes(tiny, [UserData("alice", ALICE), UserData("bob", BOB)], config)
    alone = train_prefixes(tiny, [UserData("bob", BOB)], config)[0]
    torch.testing.assert_close(together[1].kv, alone.kv, atol=1e-5, rtol=1e-4)


def test_training_never_changes_or_grads_the_base_model(tiny):
    before = weights_fingerprint(tiny.model)
    train_prefixes(tiny, [UserData("alice", ALICE), UserData("bob", BOB)], _config(max_steps=3))
    assert weights_fingerprint(tiny.model) == before == tiny.fingerprint
    assert all(p.grad is None and not p.requires_grad for p in tiny.model.parameters())


def test_training_lowers_the_validation_loss_on_the_tiny_model(tiny):
    result = train_prefixes(tiny, [UserData("bob", BOB * 2)], _config(max_steps=20, learning_rate=3e-2))[0]
    assert result.metrics["val_loss"] < result.metrics["initial_val_loss"]


def test_progress_is_reported_every_step(tiny):
    seen = []
    train_prefixes(tiny, [UserData("alice", ALICE)], _config(max_steps=4), on_progress=seen.append)
    assert [p.step for p in seen] == [1, 2, 3, 4]
    assert all(p.loss > 0 and p.tokens_per_s > 0 and p.eta_s >= 0 for p in seen)
    assert seen[-1].eta_s == 0 and seen[1].val_loss is not None


def test_cancellation_stops_training(tiny):
    calls = []

    def should_cancel():
        calls.append(1)
        return len(calls) > 2

    with pytest.raises(TrainingCancelled):
        train_prefixes(tiny, [UserData("alice", ALICE)], _config(max_steps=50), should_cancel=should_cancel)
    assert len(calls) == 3


def test_same_seed_same_prefix_and_resume_continues_from_state(tiny):
    config = _config(max_steps=3)
    first = train_prefixes(tiny, [UserData("alice", ALICE)], config)[0]
    again = train_prefixes(tiny, [UserData("alice", ALICE)], config)[0]
    assert torch.equal(first.kv, again.kv)
    resumed = train_prefixes(tiny, [UserData("alice", ALICE, resume_state=first.state)], _config(max_steps=1))[0]
    fresh = train_prefixes(tiny, [UserData("alice", ALICE)], _config(max_steps=1))[0]
    # one more step from the saved state moves away from it, and differs from a fresh start
    assert (resumed.kv - first.kv).abs().max() < (fresh.kv - first.kv).abs().max()
    assert not torch.equal(resumed.kv, first.kv)


def test_early_stopping_keeps_the_best_checkpoint(tiny):
    # A huge learning rate soon makes validation worse: training stops and keeps the best state.
    result = train_prefixes(tiny, [UserData("bob", BOB)], _config(max_steps=40, learning_rate=50.0, patience=2))[0]
    assert result.metrics["stopped_early"] and result.metrics["steps"] < 40
    assert result.metrics["best_step"] < result.metrics["steps"]
    assert result.metrics["val_loss"] < result.metrics["initial_val_loss"]


@pytest.mark.parametrize("samples", [[], ["", "   ", "\x00\x01"]])
def test_unusable_samples_are_rejected(tiny, samples):
    with pytest.raises(InvalidTrainingData):
        train_prefixes(tiny, [UserData("empty", samples)], _config())


def test_a_user_twice_in_one_job_is_rejected(tiny):
    with pytest.raises(InvalidTrainingData):
        train_prefixes(tiny, [UserData("alice", ALICE), UserData("alice", ALICE)], _config())


def test_prefix_length_search_keeps_the_best_candidate_per_user(tiny):
    config = _config(prefix_len_candidates=(2, 6), max_steps=4)
    results = train_prefixes(tiny, [UserData("alice", ALICE), UserData("bob", BOB)], config)
    for result in results:
        search = result.metrics["prefix_len_search"]
        assert set(search) == {"2", "6"}
        assert result.prefix_config.prefix_len == int(min(search, key=search.get))
        assert result.kv.shape[3] == result.prefix_config.prefix_len
    # each candidate is what training that length alone gives
    alone = train_prefixes(
        tiny, [UserData("bob", BOB, prefix=replace(config.prefix, prefix_len=6))], _config(max_steps=4)
    )
    assert abs(results[1].metrics["prefix_len_search"]["6"] - alone[0].metrics["val_loss"]) < 1e-4


def test_a_control_trained_beside_companion_prefixes_equals_training_it_alone(tiny):
    """A control prefix trains with frozen users' prefixes composed before it (one per row, in
    turn); beside another user in the same job it still gets exactly what it gets alone."""
    config = _config()
    alice, bob = train_prefixes(tiny, [UserData("alice", ALICE), UserData("bob", BOB)], config)
    companions = [alice.kv, bob.kv]
    control = UserData("formal", CAROL * 4, companions=companions)
    alone = train_prefixes(tiny, [control], config)[0]
    together = train_prefixes(tiny, [UserData("dave", ALICE[:4]), control], config)[1]
    torch.testing.assert_close(together.kv, alone.kv, atol=1e-5, rtol=1e-4)
    # the companions were really attached: without them the same control trains differently
    without = train_prefixes(tiny, [replace(control, companions=None)], config)[0]
    assert not torch.allclose(without.kv, alone.kv, atol=1e-4)
    assert alone.kv.shape == without.kv.shape  # the companions are never part of the result


def test_a_stored_prefix_is_scored_on_the_users_validation_rows_like_the_users_own(tiny):
    """`reference_kv` (the version a job may replace) is scored once on the same validation rows,
    by the same code, as the prefix being trained; scoring it changes nothing in the training, and
    a user beside others gets the same numbers as alone."""
    config = _config()
    first = train_prefixes(tiny, [UserData("alice", ALICE)], config)[0]
    assert first.metrics["reference_val_loss"] is None  # nothing to compare with
    compared = UserData("alice", ALICE, reference_kv=first.kv)
    alone = train_prefixes(tiny, [compared], config)[0]
    # The stored prefix scores what it scored when it was trained: same rows, same scorer.
    assert abs(alone.metrics["reference_val_loss"] - first.metrics["val_loss"]) < 1e-5
    torch.testing.assert_close(alone.kv, first.kv, atol=0, rtol=0)  # scoring it trained nothing
    together = train_prefixes(tiny, [UserData("bob", BOB), compared], config)
    assert together[0].metrics["reference_val_loss"] is None
    assert abs(together[1].metrics["reference_val_loss"] - alone.metrics["reference_val_loss"]) < 1e-5
    torch.testing.assert_close(together[1].kv, alone.kv, atol=1e-5, rtol=1e-4)
    # A control scores its stored prefix beside its companions, without shifting their cycle.
    control = UserData("formal", ALICE, companions=[train_prefixes(tiny, [UserData("bob", BOB)], config)[0].kv])
    trained = train_prefixes(tiny, [control], config)[0]
    scored = train_prefixes(tiny, [replace(control, reference_kv=trained.kv)], config)[0]
    torch.testing.assert_close(scored.kv, trained.kv, atol=0, rtol=0)
    assert scored.metrics["reference_val_loss"] is not None


def test_the_prefix_length_search_scores_the_stored_version_as_served(tiny):
    """A user on a population prefix: the stored version already holds the population
    (`reference_composed`), so the search must score it exactly as a job without the search does
    (it once rebuilt the user by hand, dropped the flag and composed the population twice)."""
    config = _config(max_steps=2)
    population = train_prefixes(tiny, [UserData("population", BOB)], config)[0].kv
    user = UserData("alice", ALICE, companions=[population])
    stored = train_prefixes(tiny, [user], config)[0].kv
    compared = replace(user, reference_kv=torch.cat([population, stored], dim=3), reference_composed=True)
    plain = train_prefixes(tiny, [compared], config)[0]
    searched = train_prefixes(tiny, [compared], replace(config, prefix_len_candidates=(2, 3)))[0]
    assert abs(searched.metrics["reference_val_loss"] - plain.metrics["reference_val_loss"]) < 1e-6
