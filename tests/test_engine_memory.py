"""Memory prefixes (core/tuners/memory.py): the model's own KV of a user's typical texts, composed under the
user's trained prefix (and a population prefix), keep the engine's guarantees: a composed row in a
mixed batch equals the same row alone, and users trained on top of their own memories together
equal each trained alone."""

import pytest
import torch

from core.engine.generation import GenerationRequest, MixedBatchGenerator
from core.engine.prefix import batch_prefixes, forward_with_prefixes, kv_from_text
from core.engine.prompts import text_ids
from core.engine.sampling import SamplingParams
from core.tuners.base import UserData
from core.tuners.memory import memory_prefix, typical_samples
from core.tuners.prefix_training import train_prefixes
from tests.engine_fixtures import ALICE, BOB, CAROL, padded_rows, small_training_config, tiny  # noqa: F401


def test_the_most_typical_samples_come_first():
    usual, odd = [1, 2, 3, 1, 2], [9, 9, 9]
    # the odd one out is last however the samples are ordered; ties keep the samples' order
    assert typical_samples([odd, usual, usual]) == [1, 2, 0]
    assert typical_samples([usual, odd]) == [0, 1]
    assert typical_samples([]) == []


def test_a_memory_prefix_is_the_models_own_cache_of_the_typical_samples(tiny):
    samples = ["Completely unrelated words about ships.", *ALICE[:3]]
    memory = memory_prefix(tiny, samples, tokens=20)
    ids = [text_ids(tiny.tokenizer, s + "\n") for s in samples]
    read = [t for i in typical_samples(ids) for t in ids[i]][:20]
    assert read[: len(ids[1])] == ids[1]  # an Alice sample first, not the ships
    torch.testing.assert_close(memory, kv_from_text(tiny, read), atol=0, rtol=0)
    assert memory.shape[3] == 20
    assert memory_prefix(tiny, ["Short."], tokens=64).shape[3] == len(text_ids(tiny.tokenizer, "Short.\n"))
    with pytest.raises(ValueError, match="no usable writing samples"):
        memory_prefix(tiny, ["   ", ""])


def _parts(base):
    """A population prefix, and each of two users' memory and trained-like prefixes."""
    tok = base.tokenizer
    population = kv_from_text(base, text_ids(tok, "Everyone here writes letters and reports."))[:, :, :, :5]
    g = base.geometry
    users = {}
    for name, samples, seed in (("alice", ALICE, 1), ("bob", BOB, 2)):
        generator = torch.Generator().manual_seed(seed)
        own = 0.5 * torch.randn(g.num_layers, 2, g.num_kv_heads, 4, g.head_dim, generator=generator)
        users[name] = (memory_prefix(base, samples, tokens=24), own)
    return population, users


@torch.no_grad()
def test_a_population_memory_user_row_in_a_mixed_batch_equals_the_same_row_alone(tiny):
    population, users = _parts(tiny)
    tok = tiny.tokenizer
    (a_memory, a_own), (b_memory, b_own) = users["alice"], users["bob"]
    rows = [(population, a_memory, a_own), None, (b_memory, b_own), (population, b_memory, b_own), a_own]
    prompts = [text_ids(tok, p) for p in (" Dear friend,", " Hello there", " The numbers", " Today I", " Roses")]
    for left_pad in (False, True):
        ids, mask, spans = padded_rows(prompts, tok.pad_token_id, left_pad)
        batch = batch_prefixes(rows, tiny.geometry, device=tiny.device, dtype=tiny.dtype)
        mixed = forward_with_prefixes(tiny, ids, mask, batch).logits
        for i, (prompt, row) in enumerate(zip(prompts, rows)):
            alone_batch = batch_prefixes([row], tiny.geometry, device=tiny.device, dtype=tiny.dtype)
            one = torch.tensor([prompt])
            alone = forward_with_prefixes(tiny, one, torch.ones_like(one), alone_batch).logits[0]
            torch.testing.assert_close(mixed[i, spans[i]], alone, atol=1e-5, rtol=0)
    # the memory really is in the row: without it alice's row answers differently
    without = batch_prefixes([(population, a_own)], tiny.geometry, device=tiny.device, dtype=tiny.dtype)
    one = torch.tensor([prompts[0]])
    assert not torch.allclose(
        forward_with_prefixes(tiny, one, torch.ones_like(one), without).logits[0], mixed[0, spans[0]], atol=1e-3
    )


def test_generation_with_population_memory_user_rows_equals_each_request_alone(tiny):
    population, users = _parts(tiny)
    tok = tiny.tokenizer
    (a_memory, a_own), (b_memory, b_own) = users["alice"], users["bob"]

    def requests():
        return [
            GenerationRequest(text_ids(tok, "Dear"), SamplingParams(12, temperature=0), [population, a_memory, a_own]),
            GenerationRequest(text_ids(tok, "Hello"), SamplingParams(10, temperature=0), None),
            GenerationRequest(
                text_ids(tok, "The"), SamplingParams(14, temperature=0.9, seed=4), [population, b_memory, b_own]
            ),
            GenerationRequest(text_ids(tok, "Once"), SamplingParams(8, temperature=0), [b_memory, b_own]),
        ]

    mixed = MixedBatchGenerator(tiny, max_batch_size=4).generate(requests())
    alone = [MixedBatchGenerator(tiny).generate([r])[0] for r in requests()]
    assert [m.token_ids for m in mixed] == [a.token_ids for a in alone]


def test_users_trained_on_their_own_memories_together_equal_each_trained_alone(tiny):
    config = small_training_config()
    population, _ = _parts(tiny)
    users = [
        UserData(name, samples, companions=[torch.cat([population, memory_prefix(tiny, samples, 12)], dim=3)])
        for name, samples in (("alice", ALICE), ("bob", BOB), ("carol", CAROL * 4))
    ]
    together = train_prefixes(tiny, users, config)
    for user, joint in zip(users, together):
        alone = train_prefixes(tiny, [user], config)[0]
        torch.testing.assert_close(joint.kv, alone.kv, atol=1e-5, rtol=1e-4)
    # the memory shapes what the user's prefix learns: without it alice trains to another prefix
    plain = train_prefixes(tiny, [UserData("alice", ALICE)], config)[0]
    assert not torch.allclose(plain.kv, together[0].kv, atol=1e-4)
