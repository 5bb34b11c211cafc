"""Knowledge preservation: the KL-to-base term on base-model samples (core/tuners/preservation.py)."""

import json
import weakref
from dataclasses import replace

import pytest
import torch

from core.engine.data import REQUESTS_DERIVED
from core.engine.prefix import PrefixConfig
from core.engine.prompts import chat_prompt_ids
from core.tuners.base import TrainingConfig, UserData
from core.tuners.loop import _hidden_states
from core.tuners.prefix_training import train_prefixes
from core.tuners.preservation import (
    ANCHOR_PROMPTS_NONE,
    ANCHOR_PROMPTS_REQUESTS,
    ANCHOR_REQUESTS,
    base_anchors,
    keep_anchor_tokens_in,
    kl_from_base,
    sample_anchors,
)
from tests.engine_fixtures import tiny  # noqa: F401

ALICE = [f"Alice writes about gardens, roses number {i}, and the quiet of early mornings." for i in range(8)]
BOB = [f"Bob reports quarterly figures: revenue grew {i} percent and costs fell sharply." for i in range(10)]


def _config(**overrides) -> TrainingConfig:
    values = dict(
        prefix=PrefixConfig(prefix_len=4, embedding_dim=16, hidden_dim=32),
        learning_rate=3e-2,
        max_steps=12,
        batch_size=3,
        max_seq_len=48,
        eval_every=4,
        patience=100,
        warmup_steps=1,
        seed=3,
        preservation_anchors=4,
        preservation_len=16,
    )
    values.update(overrides)
    return TrainingConfig(**values)


def _mean_kl(base, kv, anchors) -> float:
    """KL(base || base with `kv` attached), averaged over `anchors`."""
    with torch.no_grad():
        hidden, _ = _hidden_states(base, anchors.examples, [kv] * len(anchors))
        return float(
            torch.stack(
                [
                    kl_from_base(hidden[i, : len(ex.input_ids)], base, anchors.log_probs[i])
                    for i, ex in enumerate(anchors.examples)
                ]
            ).mean()
        )


def test_anchors_are_base_model_samples_fixed_by_the_seed(tiny):
    first, again, other = (sample_anchors(tiny, 3, 10, seed) for seed in (5, 5, 6))
    assert [ex.input_ids for ex in first.examples] == [ex.input_ids for ex in again.examples]
    assert [ex.input_ids for ex in first.examples] != [ex.input_ids for ex in other.examples]
    assert all(len(ex.input_ids) == 11 for ex in first.examples)  # start token + 10 sampled
    assert first.log_probs[0].shape == (10, tiny.model.config.vocab_size)
    # With no prefix attached, the model is the base model: KL 0.
    assert _mean_kl(tiny, None, first) < 1e-5


def test_multi_user_batch_with_preservation_equals_each_user_alone(tiny):
    config = _config(preservation_weight=1.0, max_steps=5)
    together = train_prefixes(tiny, [UserData("alice", ALICE), UserData("bob", BOB)], config)
    alone = train_prefixes(tiny, [UserData("bob", BOB)], config)[0]
    torch.testing.assert_close(together[1].kv, alone.kv, atol=1e-5, rtol=1e-4)
    assert together[1].metrics["preservation_kl"] is not None


def test_preservation_keeps_the_prefixed_model_closer_to_the_base_on_unseen_text(tiny):
    held_out = sample_anchors(tiny, 6, 16, seed=99)  # not the anchors training saw
    free = train_prefixes(tiny, [UserData("bob", BOB)], _config(preservation_weight=0.0))[0]
    kept = train_prefixes(tiny, [UserData("bob", BOB)], _config(preservation_weight=5.0))[0]
    assert _mean_kl(tiny, kept.kv, held_out) < 0.7 * _mean_kl(tiny, free.kv, held_out)
    # ... and it still learned the user's text.
    assert kept.metrics["val_loss"] < kept.metrics["initial_val_loss"]


def test_preservation_off_samples_no_anchors_and_changes_nothing(tiny, monkeypatch):
    import core.tuners.loop

    def refuse(*_args, **_kwargs):
        raise AssertionError("anchors sampled with preservation off")

    monkeypatch.setattr(core.tuners.loop, "base_anchors", refuse)
    result = train_prefixes(tiny, [UserData("bob", BOB)], replace(_config(), max_steps=2, preservation_weight=0.0))[0]
    assert result.metrics["preservation_kl"] is None


def test_request_anchors_are_the_base_models_answers_and_count_only_the_answer(tiny):
    anchors = sample_anchors(tiny, 3, 10, seed=5, prompts=ANCHOR_PROMPTS_REQUESTS)
    again = sample_anchors(tiny, 3, 10, seed=5, prompts=ANCHOR_PROMPTS_REQUESTS)
    assert [ex.input_ids for ex in anchors.examples] == [ex.input_ids for ex in again.examples]
    for k, example in enumerate(anchors.examples):
        prompt = chat_prompt_ids(tiny.tokenizer, [{"role": "user", "content": ANCHOR_REQUESTS[k]}])
        assert example.input_ids[: len(prompt)] == prompt and len(example.input_ids) == len(prompt) + 10
        assert anchors.first_position(k) == len(prompt) - 1  # the position predicting the answer's first token
    assert _mean_kl(tiny, None, anchors) < 1e-5
    # the request's own positions do not count: a KL from the answer on equals the KL over the answer alone
    kv = torch.randn(tiny.geometry.num_layers, 2, tiny.geometry.num_kv_heads, 3, tiny.geometry.head_dim) * 3
    with torch.no_grad():
        hidden, _ = _hidden_states(tiny, anchors.examples[:1], [kv])
        row = hidden[0, : len(anchors.examples[0].input_ids)]
        whole = kl_from_base(row, tiny, anchors.log_probs[0])
        answer = kl_from_base(row, tiny, anchors.log_probs[0], anchors.first_position(0))
    assert float(whole) != float(answer) and float(answer) > 0


def test_multi_user_training_with_derived_requests_and_request_anchors_equals_each_user_alone(tiny):
    config = _config(
        preservation_weight=1.0,
        max_steps=5,
        max_seq_len=80,
        chat_requests=REQUESTS_DERIVED,
        preservation_prompts=ANCHOR_PROMPTS_REQUESTS,
    )
    together = train_prefixes(tiny, [UserData("alice", ALICE), UserData("bob", BOB)], config)
    alone = [train_prefixes(tiny, [UserData(u, texts)], config)[0] for u, texts in (("alice", ALICE), ("bob", BOB))]
    for t, a in zip(together, alone):
        torch.testing.assert_close(t.kv, a.kv, atol=1e-5, rtol=1e-4)
    generic = train_prefixes(tiny, [UserData("alice", ALICE)], replace(config, chat_requests="generic"))[0]
    assert not torch.allclose(generic.kv, alone[0].kv, atol=1e-4)  # the rows really differ


@pytest.mark.parametrize("prompts", [ANCHOR_PROMPTS_NONE, ANCHOR_PROMPTS_REQUESTS])
def test_anchors_are_sampled_once_per_base_model_and_kept_for_the_next_process(tiny, tmp_path, monkeypatch, prompts):
    import core.tuners.preservation as preservation

    fresh = sample_anchors(tiny, 3, 10, seed=7, prompts=prompts)
    monkeypatch.setattr(preservation, "_remembered", weakref.WeakKeyDictionary())
    monkeypatch.setattr(preservation, "_token_directory", None)
    keep_anchor_tokens_in(tmp_path)
    first = base_anchors(tiny, 3, 10, seed=7, prompts=prompts)
    assert [ex.input_ids for ex in first.examples] == [ex.input_ids for ex in fresh.examples]
    assert len(list(tmp_path.glob("anchors-*.json"))) == 1

    def refuse(*_args, **_kwargs):
        raise AssertionError("anchors sampled again")

    monkeypatch.setattr(preservation, "sample_anchors", refuse)
    assert base_anchors(tiny, 3, 10, seed=7, prompts=prompts) is first  # the same process: kept in memory

    # A new process (nothing in memory): the kept tokens, scored again, equal a fresh sample.
    monkeypatch.setattr(preservation, "_remembered", weakref.WeakKeyDictionary())
    again = base_anchors(tiny, 3, 10, seed=7, prompts=prompts)
    assert [(ex.input_ids, ex.labels) for ex in again.examples] == [(ex.input_ids, ex.labels) for ex in fresh.examples]
    assert again.first == fresh.first
    for mine, theirs in zip(again.log_probs, fresh.log_probs):
        torch.testing.assert_close(mine, theirs, atol=1e-6, rtol=1e-5)

    # Another draw is another set, sampled (here: refused, so it must not come from the cache).
    with pytest.raises(AssertionError, match="sampled again"):
        base_anchors(tiny, 3, 10, seed=8, prompts=prompts)
    with pytest.raises(AssertionError, match="sampled again"):
        base_anchors(tiny, 4, 10, seed=7, prompts=prompts)


def test_an_unreadable_anchor_file_is_sampled_again(tiny, tmp_path, monkeypatch):
    import core.tuners.preservation as preservation

    monkeypatch.setattr(preservation, "_remembered", weakref.WeakKeyDictionary())
    monkeypatch.setattr(preservation, "_token_directory", None)
    keep_anchor_tokens_in(tmp_path)
    first = base_anchors(tiny, 2, 6, seed=3)
    (path,) = tmp_path.glob("anchors-*.json")
    path.write_text("{not json")
    monkeypatch.setattr(preservation, "_remembered", weakref.WeakKeyDictionary())
    again = base_anchors(tiny, 2, 6, seed=3)
    assert [ex.input_ids for ex in again.examples] == [ex.input_ids for ex in first.examples]
    assert json.loads(path.read_text())["rows"] == [ex.input_ids for ex in first.examples]  # and written anew
