"""Vectorised sampling: each row's token depends only on its own logits, parameters and generator."""

import torch

from core.engine.generation import GenerationRequest, MixedBatchGenerator
from core.engine.generation.output import FINISH_LENGTH, FINISH_STOP, IncrementalDetokenizer, OutputProcessor
from core.engine.prompts import text_ids
from core.engine.sampling import SamplingParams, make_generator, sample_tokens
from tests.engine_fixtures import tiny  # noqa: F401


def _draw(logits, params, seeds):
    return sample_tokens(logits, params, [make_generator(s) for s in seeds])


def test_a_row_samples_the_same_token_alone_or_in_any_batch():
    torch.manual_seed(0)
    logits = torch.randn(6, 500) * 3
    params = [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=1.0, seed=1),
        SamplingParams(temperature=0.7, top_p=0.9),
        SamplingParams(temperature=1.3, top_p=0.5),
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=0.5, top_p=1e-30),
    ]
    seeds = [0, 1, 2, 3, 4, 5]
    together = _draw(logits, params, seeds)
    alone = [_draw(logits[i : i + 1], [params[i]], [seeds[i]])[0] for i in range(6)]
    assert together == alone
    assert together[0] == int(logits[0].argmax()) and together[4] == int(logits[4].argmax())
    assert together[5] == int(logits[5].argmax())  # a nucleus below any probability keeps the top token


def test_frequency_penalty_counts_repeats_and_presence_penalty_does_not():
    logits = torch.tensor([[2.0, 1.9, 0.0]])
    generated = [[0, 0, 0]]  # token 0 three times so far

    def greedy(**penalty):
        return sample_tokens(logits, [SamplingParams(temperature=0.0, **penalty)], [make_generator(0)], generated)[0]

    assert greedy() == 0
    assert greedy(frequency_penalty=0.05) == 1  # 2.0 - 3 x 0.05 = 1.85 < 1.9
    assert greedy(presence_penalty=0.05) == 0  # 2.0 - 0.05 = 1.95 > 1.9: once, however often
    assert greedy(presence_penalty=0.2) == 1
    assert greedy(frequency_penalty=-1.0) == 0  # negative values favour repeats


def test_a_penalized_row_samples_the_same_token_alone_or_in_any_batch():
    torch.manual_seed(1)
    logits = torch.randn(4, 300) * 2
    params = [
        SamplingParams(temperature=0.0, frequency_penalty=1.0),
        SamplingParams(temperature=0.9, seed=1, presence_penalty=0.5),
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=0.7, top_p=0.9, frequency_penalty=-0.5, presence_penalty=1.5),
    ]
    generated = [[int(logits[0].argmax())] * 2, list(range(50)), [int(logits[2].argmax())], []]
    together = sample_tokens(logits, params, [make_generator(s) for s in range(4)], generated)
    alone = [sample_tokens(logits[i : i + 1], [params[i]], [make_generator(i)], [generated[i]])[0] for i in range(4)]
    assert together == alone
    assert together[0] != int(logits[0].argmax())  # its top token was penalised below the next
    assert together[2] == int(logits[2].argmax())  # no penalty asked: its history changes nothing


def test_sampled_frequencies_follow_the_distribution_within_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    generator = make_generator(7)
    counts = torch.zeros(4)
    for _ in range(4000):
        counts[sample_tokens(logits, [SamplingParams(temperature=1.0, top_p=0.8)], [generator])[0]] += 1
    assert counts[2] == 0 and counts[3] == 0  # outside the 0.8 nucleus: {0.5, 0.3}
    assert abs(counts[0] / 4000 - 0.5 / 0.8) < 0.03


def test_an_overflowing_temperature_falls_back_to_greedy():
    logits = torch.tensor([[1.0, 5.0, 2.0]])
    assert sample_tokens(logits, [SamplingParams(temperature=1e-45, seed=0)], [make_generator(0)]) == [1]


def test_incremental_detokenisation_equals_a_full_decode(tiny):
    tok = tiny.tokenizer
    text = "Héllo wörld — naïve café 日本語 text 🙂 with  spaces\nand lines."
    ids = (
        tok(text, add_special_tokens=False)["input_ids"]
        + [tok.eos_token_id]
        + tok("end", add_special_tokens=False)["input_ids"]
    )
    detok = IncrementalDetokenizer(tok)
    pieces = [detok.add(t) for t in ids]
    assert "".join(pieces) == detok.text == tok.decode(ids, skip_special_tokens=True)
    assert all("\ufffd" not in p for p in pieces)


def test_stop_string_across_tokens_is_cut_and_never_streamed(tiny):
    tok = tiny.tokenizer
    processor = OutputProcessor(tok, {tok.eos_token_id}, max_context=1000)
    row = processor.new_row(SamplingParams(max_tokens=50, stop=["brown fox"]))
    streamed = ""
    for i, t in enumerate(tok("The quick brown fox jumps", add_special_tokens=False)["input_ids"]):
        streamed += processor.accept(row, t, 10 + i)
        if row.finish_reason:
            break
    assert row.finish_reason == FINISH_STOP and row.text == "The quick " and streamed == row.text
    row = processor.new_row(SamplingParams(max_tokens=2))
    for i, t in enumerate(tok("one two three", add_special_tokens=False)["input_ids"][:2]):
        processor.accept(row, t, i)
    assert row.finish_reason == FINISH_LENGTH and row.text == "one two"


def test_no_repeat_ngram_never_lets_a_row_write_an_n_gram_twice(tiny):
    """The tiny model loops at once when greedy; with no_repeat_ngram=n no n-gram of its tokens repeats,
    and a row's answer still does not depend on its batch."""
    prompt = text_ids(tiny.tokenizer, "Once upon a time")
    looping = MixedBatchGenerator(tiny).generate([GenerationRequest(prompt, SamplingParams(40, temperature=0))])[0]
    grams = lambda ids, n: [tuple(ids[i : i + n]) for i in range(len(ids) - n + 1)]  # noqa: E731
    assert len(set(grams(looping.token_ids, 3))) < len(grams(looping.token_ids, 3))  # it does loop
    requests = [
        GenerationRequest(prompt, SamplingParams(40, temperature=0, no_repeat_ngram=3, ignore_eos=True)),
        GenerationRequest(prompt, SamplingParams(30, temperature=0.9, seed=4, no_repeat_ngram=2, ignore_eos=True)),
        GenerationRequest(prompt, SamplingParams(20, temperature=0)),
    ]
    mixed = MixedBatchGenerator(tiny, max_batch_size=8).generate(requests)
    for request, result in zip(requests, mixed):
        n = request.params.no_repeat_ngram
        if n:
            assert len(set(grams(result.token_ids, n))) == len(grams(result.token_ids, n))
        assert result.token_ids == MixedBatchGenerator(tiny).generate([request])[0].token_ids
    assert mixed[2].token_ids == looping.token_ids[:20]  # rows without it are untouched
