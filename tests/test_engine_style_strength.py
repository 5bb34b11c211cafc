"""Style strength: a row decoded from base + s * (personalised - base), its base-model guide row run
in the same mixed batch. Like every row kind: mixed equals alone; and s = 1 is today's answer, s = 0
the base model's, exactly."""

from dataclasses import replace

import pytest
import torch

from core.engine.generation import GenerationRequest, MixedBatchGenerator
from core.engine.prompts import chat_prompt_ids, text_ids
from core.engine.sampling import SamplingParams
from core.errors import InvalidRequest
from tests.engine_fixtures import tiny  # noqa: F401
from tests.test_engine_lora import random_lora
from tests.test_engine_seq2seq import _requests as seq2seq_requests
from tests.test_engine_seq2seq import s2s  # noqa: F401


def _kv(base, length: int, seed: int, scale: float = 3.0) -> torch.Tensor:
    """A random prefix big enough to move the tiny model's greedy choices."""
    g = base.geometry
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(g.num_layers, 2, g.num_kv_heads, length, g.head_dim, generator=generator) * scale


def _strength(request: GenerationRequest, s: float) -> GenerationRequest:
    return replace(request, params=replace(request.params, stop=list(request.params.stop), style_strength=s))


def _requests(base):
    """Personalised rows (prefix, composed prefixes, LoRA, prefix + LoRA), greedy, sampled and
    penalised, at several strengths, among unguided rows of other users and the base model."""
    tok = base.tokenizer
    chat = [chat_prompt_ids(tok, [{"role": "user", "content": m}]) for m in ("Say hi.", "List three fruits.")]
    alice, bob, brief = _kv(base, 4, 1), _kv(base, 6, 2), _kv(base, 3, 3)
    lora = random_lora(base, seed=4, rank=2)
    return [
        GenerationRequest(chat[0], SamplingParams(16, temperature=0, style_strength=0.5), alice),
        GenerationRequest(chat[1], SamplingParams(16, temperature=0), bob),  # unguided beside guided
        GenerationRequest(text_ids(tok, "The weather"), SamplingParams(12, 0.9, seed=7, style_strength=0.3), bob),
        GenerationRequest(chat[1], SamplingParams(14, temperature=0, style_strength=1.5), [alice, brief]),
        GenerationRequest(chat[0], SamplingParams(10, temperature=0), None),  # the base model
        GenerationRequest(chat[0], SamplingParams(12, temperature=0, style_strength=0.7), None, lora=lora),
        GenerationRequest(
            chat[1], SamplingParams(12, 0.0, frequency_penalty=1.0, style_strength=0.6), alice, lora=lora
        ),
        GenerationRequest(chat[1], SamplingParams(12, temperature=0, style_strength=0.0), alice),
    ]


def _generate(base, requests, **kwargs):
    return MixedBatchGenerator(base, **kwargs).generate(requests)


def test_guided_rows_in_a_mixed_batch_equal_each_request_alone(tiny):
    mixed = _generate(tiny, _requests(tiny), max_batch_size=16)
    alone = [_generate(tiny, [r])[0] for r in _requests(tiny)]
    for m, a in zip(mixed, alone):
        assert m.token_ids == a.token_ids and m.text == a.text and m.finish_reason == a.finish_reason


def test_guided_rows_joining_a_running_batch_are_unaffected(tiny):
    """Continuous batching: guided rows (two batch rows each) join and leave mid-way."""
    requests = _requests(tiny)
    expected = [_generate(tiny, [r])[0].token_ids for r in _requests(tiny)]
    engine = MixedBatchGenerator(tiny, max_batch_size=5)
    done = {}
    for request in requests[:3]:
        engine.submit(request)
    for _ in range(3):
        done |= {r.request_id: r for r in engine.step()}
    for request in requests[3:]:
        engine.submit(request)
    while engine.has_work:
        done |= {r.request_id: r for r in engine.step()}
    assert [done[r.request_id].token_ids for r in requests] == expected


def test_strength_one_is_todays_answer_and_zero_the_base_models(tiny):
    """Exactly: at s = 1 the row is today's (one row, no guide: the default params' answer), at s = 0
    the base model's row with no prefix and no LoRA."""
    for request in _requests(tiny):
        params = {k: v for k, v in vars(request.params).items() if k != "style_strength"}
        today = replace(request, params=SamplingParams(**params))  # a request that never named a strength
        at_one = _strength(request, 1.0)
        assert at_one.rows == 1 and today.params.style_strength == 1.0
        assert _generate(tiny, [at_one])[0].token_ids == _generate(tiny, [today])[0].token_ids
        base = _generate(tiny, [replace(today, prefix=None, lora=None)])[0]
        assert _generate(tiny, [_strength(request, 0.0)])[0].token_ids == base.token_ids
    # and in between the answer is neither: strength moves it
    guided = [r for r in _requests(tiny) if r.guided]
    assert any(
        _generate(tiny, [r])[0].token_ids
        not in (_generate(tiny, [_strength(r, 1.0)])[0].token_ids, _generate(tiny, [_strength(r, 0.0)])[0].token_ids)
        for r in guided
    )


def test_a_guided_greedy_token_is_the_argmax_of_the_mixed_logits(tiny):
    """The first token at strength s is argmax(base + s * (own - base)) of the two rows' own logits."""
    prompt = chat_prompt_ids(tiny.tokenizer, [{"role": "user", "content": "Say hi."}])
    prefix = _kv(tiny, 4, 1)
    with torch.inference_mode():
        own, _ = MixedBatchGenerator(tiny).runner.prefill([prompt], [prefix])
        base, _ = MixedBatchGenerator(tiny).runner.prefill([prompt], [None])
    firsts = {}
    for s in (0.25, 0.5, 0.75, 1.5):
        expected = int((base + s * (own - base)).argmax())
        got = _generate(tiny, [GenerationRequest(prompt, SamplingParams(1, temperature=0, style_strength=s), prefix)])
        assert got[0].token_ids == [expected]
        firsts[s] = expected
    ends = (int(base.argmax()), int(own.argmax()))
    assert ends[0] != ends[1]  # the prefix moves the choice, so the strengths have something to mix
    assert set(firsts.values()) - set(ends) or len(set(firsts.values())) > 1


def test_a_guided_request_takes_two_rows_of_the_batch_and_counts_as_one_request(tiny):
    prompt = text_ids(tiny.tokenizer, "Once upon a time")
    guided = [GenerationRequest(prompt, SamplingParams(6, 0.0, style_strength=0.5), _kv(tiny, 3, i)) for i in (1, 2)]
    engine = MixedBatchGenerator(tiny, max_batch_size=3)
    for request in guided:
        engine.submit(request)
    engine.step()
    assert engine.running == 1 and engine.queued == 1  # 2 rows + 2 rows > 3: the second waits
    while engine.has_work:
        engine.step()
    # a batch of one row still serves a guided request (alone)
    assert _generate(tiny, [guided[0]], max_batch_size=1)[0].token_ids == _generate(tiny, [guided[0]])[0].token_ids


@pytest.mark.parametrize("s", [-0.1, 2.5, float("nan"), float("inf")])
def test_a_strength_out_of_range_is_refused(tiny, s):
    request = GenerationRequest(text_ids(tiny.tokenizer, "Hi"), SamplingParams(4, style_strength=s), _kv(tiny, 2, 1))
    with pytest.raises(InvalidRequest, match="style_strength"):
        MixedBatchGenerator(tiny).submit(request)


def test_guided_encoder_decoder_rows_equal_each_request_alone(s2s):
    """The guide row of an encoder-decoder request is its source encoded without the prefix."""
    # the shared seq2seq requests, with prefixes strong enough to move the random models' choices
    requests = [
        replace(_strength(r, s), prefix=None if r.prefix is None else _kv(s2s, 4, seed, scale=8.0))
        for seed, (r, s) in enumerate(zip(seq2seq_requests(s2s), (0.5, 1.0, 0.4, 1.5, 0.0)))
    ]
    mixed = _generate(s2s, requests, max_batch_size=16)
    alone = [_generate(s2s, [r])[0] for r in requests]
    assert [m.token_ids for m in mixed] == [a.token_ids for a in alone]
    unguided = [_generate(s2s, [_strength(r, 1.0)])[0].token_ids for r in requests]
    assert [r.rows for r in requests] == [2, 1, 2, 2, 1]
    assert any(m.token_ids != u for m, u in zip(mixed, unguided))
