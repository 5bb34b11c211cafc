"""BatchCache: rows put in, composed, kept, appended and trimmed equal the same rows alone."""

import pytest
import torch

from core.engine.batch_cache import BatchCache, compose, prefix_length
from core.engine.generation import GenerationRequest, MixedBatchGenerator
from core.engine.prefix import batch_prefixes, forward_with_prefixes, kv_from_text
from core.engine.prompts import text_ids
from core.engine.sampling import SamplingParams
from tests.engine_fixtures import control_prefixes, smollm2, tiny  # noqa: F401

TEXTS = ["We the People of the United States, in Order to form", "Dear team, the numbers are in", "Once upon a time"]


def _prefixes(base):
    """Three 'adapters' of different lengths: a shared one, a user's, an attribute's."""
    shared, user, attribute = (kv_from_text(base, text_ids(base.tokenizer, t)) for t in TEXTS)
    return shared[:, :, :, :5], user[:, :, :, :7], attribute[:, :, :, :3]


def _logits_alone(base, prefix, prompt):
    cache = batch_prefixes([prefix], base.geometry, device=base.device, dtype=base.dtype)
    ids = torch.tensor([prompt])
    return forward_with_prefixes(base, ids, torch.ones_like(ids), cache).logits[0]


@torch.no_grad()
def test_a_composed_row_equals_one_prefix_holding_the_concatenation(tiny):
    shared, user, attribute = _prefixes(tiny)
    prompt = text_ids(tiny.tokenizer, " provide for the common defence")
    concatenated = torch.cat([shared, user, attribute], dim=3)
    composed = _logits_alone(tiny, [shared, user, attribute], prompt)
    torch.testing.assert_close(composed, _logits_alone(tiny, concatenated, prompt), atol=0, rtol=0)
    assert prefix_length([shared, user, attribute]) == 15 and compose([None, user]) is user
    # Keys carry their positions already, and attention weighs a set of keys: the order of composed
    # parts does not matter, but each part does.
    torch.testing.assert_close(composed, _logits_alone(tiny, [attribute, shared, user], prompt), atol=1e-5, rtol=0)
    assert (composed - _logits_alone(tiny, [shared, user], prompt)).abs().max() > 1e-3


@pytest.mark.parametrize("model", ["tiny", pytest.param("smollm2", marks=pytest.mark.slow)])
@torch.no_grad()
def test_rows_with_different_users_and_control_sets_in_a_mixed_batch_equal_each_alone(model, request):
    base = request.getfixturevalue(model)
    shared, user, other_user = _prefixes(base)
    formal, brief = control_prefixes(base)
    rows = [
        [user, formal, brief],
        None,
        [user],
        [other_user, formal],
        brief,
        [other_user, brief, formal],
        [shared, user],
    ]
    texts = (" to form", " Hello there", " a more perfect", " Union", " x", " Dear team", " Once upon a time")
    prompts = [text_ids(base.tokenizer, t) for t in texts]
    T = max(map(len, prompts))
    ids = torch.full((len(rows), T), base.tokenizer.pad_token_id)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, : len(p)], mask[i, : len(p)] = torch.tensor(p), 1
    cache = batch_prefixes(rows, base.geometry, device=base.device, dtype=base.dtype)
    mixed = forward_with_prefixes(base, ids, mask, cache).logits
    # fp32 rounding only: a batch sums attention over more (masked) columns in another order. On
    # SmolLM2's 30 layers that reaches 3.8e-5 on logits of magnitude ~20 (2e-6 relative).
    atol = 1e-5 if model == "tiny" else 1e-4
    for i, (prefix, prompt) in enumerate(zip(rows, prompts)):
        torch.testing.assert_close(mixed[i, : len(prompt)], _logits_alone(base, prefix, prompt), atol=atol, rtol=0)
    # the controls matter: the same user and prompt without them gives other logits
    assert (mixed[0, : len(prompts[0])] - _logits_alone(base, [user], prompts[0])).abs().max() > 1e-3


@torch.no_grad()
def test_rows_kept_appended_and_trimmed_equal_the_same_rows_alone(tiny):
    """Cache operations at the BatchCache level: the next token's logits of every row that stays
    equal those of the row run alone, after rows leave, others join (wider and narrower) and unused
    columns are trimmed."""
    shared, user, attribute = _prefixes(tiny)
    tok = tiny.tokenizer
    first = [([shared, user], text_ids(tok, "One two three four five six")), (None, text_ids(tok, "Hi"))]
    second = [(attribute, text_ids(tok, "Seven")), ([user, attribute], text_ids(tok, "Eight nine ten"))]

    def prefilled(rows):
        cache = BatchCache.from_prefixes(
            [p for p, _ in rows], tiny.geometry, device=tiny.device, dtype=tiny.dtype, reserve=True
        )
        width = max(len(ids) for _, ids in rows)
        ids = torch.full((len(rows), width), tok.pad_token_id)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for i, (_, prompt) in enumerate(rows):
            ids[i, width - len(prompt) :], mask[i, width - len(prompt) :] = torch.tensor(prompt), 1
        tiny.model(**cache.model_inputs(ids, mask), logits_to_keep=1)
        return cache

    batch = prefilled(first)
    batch.append_rows(prefilled(second))  # rows: first[0], first[1], second[0], second[1]
    batch.keep_rows([0, 2, 3])  # first[1] leaves; its columns (and shared padding) are trimmed
    assert batch.batch_size == 3 and int(batch.mask.sum(dim=1).min()) > 0
    assert bool((batch.mask[:, 0] == 1).any())  # no column that no row uses is left at the front
    kept = [first[0], second[0], second[1]]
    step = torch.tensor([[11], [12], [13]])
    for _ in range(3):  # decoding steps write into reserved columns
        logits = tiny.model(**batch.model_inputs(step), logits_to_keep=1).logits[:, -1]
        for i, (prefix, prompt) in enumerate(kept):
            alone = _logits_alone(
                tiny, prefix, prompt + [11 + i] * (step.shape[1] and _steps_done(batch, i, prompt, prefix))
            )
            torch.testing.assert_close(logits[i], alone[-1], atol=1e-5, rtol=0)


def _steps_done(batch, row, prompt, prefix):
    """How many decode tokens row `row` has been fed so far (its position minus prompt and prefix)."""
    return int(batch.next_position[row]) - len(prompt) - prefix_length(prefix)


@torch.no_grad()
def test_row_kv_of_a_text_is_the_prefix_that_text_builds(tiny):
    ids = text_ids(tiny.tokenizer, TEXTS[0])
    cache = batch_prefixes([None, None], tiny.geometry, device=tiny.device, dtype=tiny.dtype)
    padded = torch.tensor([[tiny.tokenizer.pad_token_id] * 3 + ids[:-3], ids])
    mask = torch.tensor([[0] * 3 + [1] * (len(ids) - 3), [1] * len(ids)])
    tiny.model(**cache.model_inputs(padded, mask))
    torch.testing.assert_close(cache.row_kv(1), kv_from_text(tiny, ids), atol=1e-6, rtol=0)
    torch.testing.assert_close(cache.row_kv(0), kv_from_text(tiny, ids[:-3]), atol=1e-6, rtol=0)


def test_generation_with_composed_prefixes_equals_each_request_alone(tiny):
    shared, user, attribute = _prefixes(tiny)
    tok = tiny.tokenizer

    def requests():
        return [
            GenerationRequest(
                text_ids(tok, "The weather"), SamplingParams(12, temperature=0), [shared, user, attribute]
            ),
            GenerationRequest(text_ids(tok, "Say hi"), SamplingParams(10, temperature=0), [user]),
            GenerationRequest(
                text_ids(tok, "Once"), SamplingParams(14, temperature=0.9, top_p=0.8, seed=5), [shared, user]
            ),
            GenerationRequest(text_ids(tok, "Hello"), SamplingParams(8, temperature=0), None),
        ]

    mixed = MixedBatchGenerator(tiny, max_batch_size=4).generate(requests())
    alone = [MixedBatchGenerator(tiny).generate([r])[0] for r in requests()]
    concatenated = requests()
    concatenated[0].prefix = torch.cat([shared, user, attribute], dim=3)
    as_one = MixedBatchGenerator(tiny).generate([concatenated[0]])[0]
    assert [m.token_ids for m in mixed] == [a.token_ids for a in alone]
    assert as_one.token_ids == mixed[0].token_ids
