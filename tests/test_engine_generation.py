"""Mixed-user generation: a request's output never depends on who shares its batch."""

import pytest
import torch

from core.engine.generation import FINISH_CANCELLED, FINISH_LENGTH, FINISH_STOP, GenerationRequest, MixedBatchGenerator
from core.engine.prompts import chat_prompt_ids, text_ids
from core.engine.sampling import SamplingParams
from core.errors import InvalidRequest
from tests.engine_fixtures import mixed_requests, smollm2, tiny  # noqa: F401


def _mixed_equals_alone(base):
    mixed = MixedBatchGenerator(base, max_batch_size=8).generate(mixed_requests(base))
    alone = [MixedBatchGenerator(base).generate([r])[0] for r in mixed_requests(base)]
    for m, a in zip(mixed, alone):
        assert m.token_ids == a.token_ids
        assert m.text == a.text and m.finish_reason == a.finish_reason
    return mixed


def test_mixed_batch_generation_equals_each_request_alone(tiny):
    _mixed_equals_alone(tiny)


@pytest.mark.slow
def test_mixed_batch_generation_equals_each_request_alone_on_smollm2(smollm2):
    mixed = _mixed_equals_alone(smollm2)
    assert mixed[0].text != mixed[1].text  # real, distinct outputs, not empty rows


@pytest.mark.slow
def test_base_row_matches_transformers_generate(smollm2):
    prompt = chat_prompt_ids(smollm2.tokenizer, [{"role": "user", "content": "Say hi."}])
    ours = MixedBatchGenerator(smollm2).generate([GenerationRequest(prompt, SamplingParams(20, temperature=0))])[0]
    with torch.no_grad():
        theirs = smollm2.model.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False)
    expected = [t for t in theirs[0, len(prompt) :].tolist() if t not in smollm2.eos_token_ids]
    assert ours.token_ids == expected


def test_requests_admitted_while_others_run_are_unaffected(tiny):
    """Continuous batching: a request joining mid-way (and leaving early) changes nobody's output."""
    reqs = mixed_requests(tiny)
    expected = [MixedBatchGenerator(tiny).generate([r])[0].token_ids for r in mixed_requests(tiny)]
    engine = MixedBatchGenerator(tiny, max_batch_size=3)
    results = {}
    engine.submit(reqs[0])
    engine.submit(reqs[1])
    for _ in range(4):
        for r in engine.step():
            results[r.request_id] = r
    for r in reqs[2:]:
        engine.submit(r)
    assert engine.running == 2 and engine.queued == len(reqs) - 2
    while engine.has_work:
        assert engine.running <= 3
        for r in engine.step():
            results[r.request_id] = r
    assert [results[r.request_id].token_ids for r in reqs] == expected


def test_streamed_text_adds_up_to_the_result(tiny):
    pieces = []
    request = GenerationRequest(
        text_ids(tiny.tokenizer, "Once upon a time"), SamplingParams(30, temperature=0), on_text=pieces.append
    )
    result = MixedBatchGenerator(tiny).generate([request])[0]
    assert len(pieces) > 1 and "".join(pieces) == result.text


def test_stop_sequence_cuts_the_text_and_is_never_streamed(tiny):
    prompt = text_ids(tiny.tokenizer, "Once upon a time")
    free = MixedBatchGenerator(tiny).generate([GenerationRequest(prompt, SamplingParams(30, temperature=0))])[0]
    stop = free.text[len(free.text) // 2 : len(free.text) // 2 + 3]
    assert stop.strip(), free.text
    pieces = []
    request = GenerationRequest(prompt, SamplingParams(30, temperature=0, stop=[stop]), on_text=pieces.append)
    stopped = MixedBatchGenerator(tiny).generate([request])[0]
    assert stopped.finish_reason == FINISH_STOP
    assert stopped.text == free.text[: free.text.find(stop)]
    assert "".join(pieces) == stopped.text


def test_max_tokens_gives_finish_reason_length(tiny):
    prompt = text_ids(tiny.tokenizer, "Once upon a time")
    result = MixedBatchGenerator(tiny).generate([GenerationRequest(prompt, SamplingParams(5, temperature=0))])[0]
    assert result.finish_reason == FINISH_LENGTH and result.completion_tokens == 5


def test_cancelled_request_frees_its_slot(tiny):
    engine = MixedBatchGenerator(tiny, max_batch_size=1)
    prompt = text_ids(tiny.tokenizer, "Once upon a time")
    first = GenerationRequest(prompt, SamplingParams(200, temperature=0))
    second = GenerationRequest(prompt, SamplingParams(3, temperature=0))
    engine.submit(first)
    engine.submit(second)
    engine.step()
    assert engine.running == 1 and engine.queued == 1
    engine.cancel(first.request_id)
    results = {}
    while engine.has_work:
        results.update({r.request_id: r for r in engine.step()})
    assert results[first.request_id].finish_reason == FINISH_CANCELLED
    assert results[second.request_id].completion_tokens == 3


def test_seeded_sampling_is_reproducible_and_seed_dependent(tiny):
    prompt = text_ids(tiny.tokenizer, "Once upon a time")

    def run(seed):
        request = GenerationRequest(prompt, SamplingParams(20, temperature=1.0, seed=seed))
        return MixedBatchGenerator(tiny).generate([request])[0].token_ids

    assert run(1) == run(1)
    assert run(1) != run(2)


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(max_tokens=0),
        SamplingParams(temperature=-1.0),
        SamplingParams(temperature=float("nan")),
        SamplingParams(top_p=0.0),
        SamplingParams(top_p=1.5),
        SamplingParams(stop=[""]),
        SamplingParams(frequency_penalty=2.5),
        SamplingParams(presence_penalty=float("inf")),
    ],
)
def test_bad_sampling_parameters_are_rejected(tiny, params):
    engine = MixedBatchGenerator(tiny)
    with pytest.raises(InvalidRequest):
        engine.submit(GenerationRequest([1, 2, 3], params))
    assert not engine.has_work


def test_prompt_beyond_the_context_window_is_rejected(tiny):
    engine = MixedBatchGenerator(tiny)
    with pytest.raises(InvalidRequest, match="context window"):
        engine.submit(GenerationRequest([5] * tiny.max_context, SamplingParams(4)))
