"""Per-row LoRA (core/engine/lora.py): rows of one batch carry their own LoRA, a prefix, both, several, or
nothing, and each row's result equals that row alone; training LoRA and PT-PEFT for many users in one
job equals training each alone."""

import copy
import dataclasses

import pytest
import torch

from core.engine import lora
from core.engine.generation import GenerationRequest, MixedBatchGenerator
from core.engine.lora import LoRABatch, LoRAConfig, LoRAWeights, target_modules
from core.engine.model import weights_fingerprint
from core.engine.prefix import forward_with_prefixes, kv_from_text
from core.engine.prompts import chat_prompt_ids, text_ids
from core.engine.sampling import SamplingParams
from core.tuners.base import UserData
from core.tuners.registry import AUTO, LORA, PT_PEFT
from core.tuners.train import train_adapters
from tests.engine_fixtures import ALICE, BOB, CAROL, padded_rows, small_training_config, smollm2, tiny  # noqa: F401


def random_lora(base, seed: int, rank: int, targets=("q_proj", "v_proj"), scale: float = 0.2) -> LoRAWeights:
    """A LoRA big enough to change the model's outputs (B != 0, unlike a fresh one)."""
    g = torch.Generator().manual_seed(seed)
    shapes = target_modules(base.model, targets)
    return LoRAWeights(
        {
            name: (torch.randn(rank, i, generator=g) * scale, torch.randn(o, rank, generator=g) * scale)
            for name, (i, o) in shapes.items()
        }
    )


def merged_copy(base, *weights: LoRAWeights):
    """The base model with the LoRAs merged into its weights: the textbook reference (W + B A)."""
    model = copy.deepcopy(base.model)
    with torch.no_grad():
        for w in weights:
            for name, (a, b) in w.modules.items():
                model.get_submodule(name).weight += (b @ a).to(model.dtype)
    return model


def rows(base):
    """(prompt, prefix, LoRA) per row: prefix only, LoRA only, both, none, two LoRAs, other users."""
    tok = base.tokenizer
    alice_kv = kv_from_text(base, text_ids(tok, "My fellow citizens, the state of our union is strong."))
    bob_kv = kv_from_text(base, text_ids(tok, "Dear team, a quick note:"))[:, :, :, :4]
    alice, bob, formal = random_lora(base, 1, 2), random_lora(base, 2, 4), random_lora(base, 3, 1, ("v_proj",))
    return [
        (text_ids(tok, "The weather today is"), alice_kv, None),
        (text_ids(tok, "Once upon a time, in a land"), None, bob),
        (text_ids(tok, "Write about the economy"), alice_kv, alice),
        (text_ids(tok, "Hello"), None, None),
        (text_ids(tok, "The weather today is"), bob_kv, [bob, formal]),
        (text_ids(tok, "Numbers: one, two,"), None, alice),
    ]


def last_logits(base, batch):
    ids, mask, _ = padded_rows([p for p, _, _ in batch], base.tokenizer.pad_token_id, left_pad=True)
    from core.engine.prefix import batch_prefixes

    cache = batch_prefixes([kv for _, kv, _ in batch], base.geometry, device=base.device, dtype=base.dtype)
    loras = LoRABatch.from_rows([w for _, _, w in batch], device=base.device, dtype=base.dtype)
    with torch.no_grad(), lora.active(base.model, loras):
        return forward_with_prefixes(base, ids, mask, cache, logits_to_keep=1).logits[:, -1]


def _mixed_forward_equals_alone(base, atol):
    batch = rows(base)
    mixed = last_logits(base, batch)
    for i, row in enumerate(batch):
        torch.testing.assert_close(mixed[i], last_logits(base, [row])[0], atol=atol, rtol=0)
    return mixed


def test_mixed_lora_and_prefix_rows_equal_each_row_alone(tiny):
    mixed = _mixed_forward_equals_alone(tiny, atol=1e-5)
    # the LoRA changed the rows that carry one, and left the base row exactly the base model
    plain = last_logits(tiny, [(p, kv, None) for p, kv, _ in rows(tiny)])
    assert (mixed[1] - plain[1]).abs().max() > 1e-2 and (mixed[2] - plain[2]).abs().max() > 1e-2
    assert torch.equal(mixed[3], plain[3])


@pytest.mark.slow
def test_mixed_lora_and_prefix_rows_equal_each_row_alone_on_smollm2(smollm2):
    # In float32 a row's logits move by up to ~9e-5 between alone and in a batch, LoRA or not: the
    # base row does too (4.6e-5), as the BLAS kernels tile a (1, T) and a (6, T) product differently.
    _mixed_forward_equals_alone(smollm2, atol=1e-4)
    # In float64 that rounding is gone and what is left is the batching itself: exact to 1e-5.
    wide = dataclasses.replace(smollm2, model=copy.deepcopy(smollm2.model).to(torch.float64))
    _mixed_forward_equals_alone(wide, atol=1e-5)


def test_a_lora_row_equals_the_model_with_the_lora_merged_into_its_weights(tiny):
    prompt = text_ids(tiny.tokenizer, "Once upon a time, in a land")
    bob, formal = random_lora(tiny, 2, 4), random_lora(tiny, 3, 1, ("v_proj",))
    ours = last_logits(tiny, [(prompt, None, [bob, formal]), (prompt, None, None)])
    with torch.no_grad():
        reference = merged_copy(tiny, bob, formal)(torch.tensor([prompt])).logits[0, -1]
    torch.testing.assert_close(ours[0], reference, atol=1e-4, rtol=1e-4)
    assert weights_fingerprint(tiny.model) == tiny.fingerprint  # nothing was merged into the shared model


def test_gpt2_fused_attention_projection_takes_a_lora():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=50, n_positions=64)).eval()
    shapes = target_modules(model)
    assert list(shapes) == ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"]
    g = torch.Generator().manual_seed(0)
    weights = LoRAWeights(
        {n: (torch.randn(2, i, generator=g), torch.randn(o, 2, generator=g)) for n, (i, o) in shapes.items()}
    )
    ids = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
    with torch.no_grad():
        with lora.active(model, LoRABatch.from_rows([weights, None], device="cpu", dtype=torch.float32)):
            ours = model(ids).logits
        merged = copy.deepcopy(model)
        for name, (a, b) in weights.modules.items():
            merged.get_submodule(name).weight += (b @ a).t()  # Conv1D keeps its weight as (in, out)
        torch.testing.assert_close(ours[0], merged(ids[:1]).logits[0], atol=1e-4, rtol=1e-4)
        assert torch.equal(ours[1], model(ids[1:]).logits[0])


def _requests(base):
    tok = base.tokenizer

    def chat(message):
        return chat_prompt_ids(tok, [{"role": "user", "content": message}])

    out = []
    for i, (prompt, kv, weights) in enumerate(rows(base)):
        params = SamplingParams(12 + i, temperature=0) if i % 2 == 0 else SamplingParams(10, temperature=0.9, seed=i)
        out.append(GenerationRequest(prompt, params, kv, lora=weights))
    out.append(
        GenerationRequest(chat("Say hi."), SamplingParams(14, temperature=0), None, lora=random_lora(base, 5, 3))
    )
    return out


def _generation_mixed_equals_alone(base):
    mixed = MixedBatchGenerator(base, max_batch_size=4).generate(_requests(base))  # rows join and leave
    alone = [MixedBatchGenerator(base).generate([r])[0] for r in _requests(base)]
    for m, a in zip(mixed, alone):
        assert m.token_ids == a.token_ids and m.text == a.text
    return mixed


def test_mixed_lora_generation_equals_each_request_alone(tiny):
    mixed = _generation_mixed_equals_alone(tiny)
    without = MixedBatchGenerator(tiny).generate(
        [GenerationRequest(r.prompt_ids, r.params, r.prefix) for r in _requests(tiny)]
    )
    changed = [m.token_ids != w.token_ids for m, w, r in zip(mixed, without, _requests(tiny)) if r.lora is not None]
    assert sum(changed) >= 3  # the LoRAs changed what their rows say


@pytest.mark.slow
def test_mixed_lora_generation_equals_each_request_alone_on_smollm2(smollm2):
    _generation_mixed_equals_alone(smollm2)


# -- training ---------------------------------------------------------------------------------------


def _lora_config(**overrides):
    return small_training_config(lora=LoRAConfig(rank=2), learning_rate=3e-2, **overrides)


@pytest.mark.parametrize("method", [LORA, PT_PEFT])
def test_multi_user_lora_and_pt_peft_training_equal_each_user_alone(tiny, method):
    config = _lora_config(method=method)
    users = [UserData("alice", ALICE), UserData("bob", BOB), UserData("carol", CAROL)]
    before = weights_fingerprint(tiny.model)
    joint = train_adapters(tiny, users, config)
    for user, together in zip(users, joint):
        (alone,) = train_adapters(tiny, [user], config)
        assert together.method == alone.method == method
        assert together.metrics["steps"] == alone.metrics["steps"]
        for name, (a, b) in together.adaptation.lora.modules.items():
            a_alone, b_alone = alone.adaptation.lora.modules[name]
            torch.testing.assert_close(a, a_alone, atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(b, b_alone, atol=1e-5, rtol=1e-4)
        if method == PT_PEFT:
            torch.testing.assert_close(together.adaptation.kv, alone.adaptation.kv, atol=1e-5, rtol=1e-4)
        else:
            assert together.adaptation.kv is None
    assert weights_fingerprint(tiny.model) == before  # the base model is never trained
    assert joint[0].metrics["val_loss"] < joint[0].metrics["base_val_loss"]  # it learned something


def test_a_fresh_lora_starts_exactly_at_the_base_model(tiny):
    (trained,) = train_adapters(tiny, [UserData("alice", ALICE)], _lora_config(method=LORA, max_steps=1))
    assert trained.metrics["initial_val_loss"] == pytest.approx(trained.metrics["base_val_loss"], abs=1e-6)


def test_pt_peft_keeps_its_stage_one_prefix_frozen_unless_asked(tiny):
    users = [UserData("alice", ALICE)]
    frozen = train_adapters(tiny, users, _lora_config(method=PT_PEFT))[0]
    stage1 = train_adapters(tiny, users, _lora_config(method="prefix", max_steps=3))[0]
    torch.testing.assert_close(frozen.adaptation.kv, stage1.adaptation.kv)  # 6 steps, half on the prefix
    trained_on = train_adapters(tiny, users, _lora_config(method=PT_PEFT, pt_peft_train_prefix=True))[0]
    assert not torch.allclose(trained_on.adaptation.kv, stage1.adaptation.kv)


def test_auto_keeps_the_method_with_the_lowest_validation_loss(tiny):
    users = [UserData("alice", ALICE), UserData("bob", BOB)]
    for result in train_adapters(tiny, users, _lora_config(method=AUTO)):
        losses = result.metrics["auto"]
        assert set(losses) == {"prefix", "lora", "pt-peft"}
        assert result.method == min(losses, key=losses.get)
