"""The engine on decoder families other than Llama, through the same geometry and batch cache.

Each family is a small random model built in code with the bundled SmolLM2 tokenizer's vocabulary,
saved with `save_pretrained` (tokenizer next to it) and loaded back through `load_base_model(<dir>)`,
so every test here also runs the local-directory loading path:

    llama   the reference row: the same config as `load_base_model("tiny")` (RoPE, RMSNorm, GQA)
    gpt2    learned absolute position embeddings, fused QKV (`c_attn`), LayerNorm, no GQA,
            a hard context window (`n_positions`): a position past it has no embedding at all
    qwen2   Llama-like with biases on q/k/v and GQA

The properties are those the Llama-only tests check: a prefix is the model's own cache, a row's
result never depends on its neighbours, composition is concatenation, and training users together
equals training each alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, MistralConfig, PreTrainedModel, Qwen2Config, Qwen2ForCausalLM

from core.engine.generation import FINISH_LENGTH, GenerationRequest, MixedBatchGenerator
from core.engine.model import BaseModel, geometry_of, load_base_model, load_model_card, tiny_model, weights_fingerprint
from core.engine.prefix import PrefixConfig, batch_prefixes, forward_with_prefixes, kv_from_text
from core.engine.prompts import chat_prompt_ids, text_ids
from core.engine.sampling import SamplingParams
from core.errors import InvalidTrainingData, ModelLoadError
from core.tuners.base import TrainingConfig, UserData
from core.tuners.prefix_training import train_prefixes
from tests.engine_fixtures import ALICE, BOB, CAROL, mixed_requests, padded_rows, small_training_config, tiny  # noqa: F401

FAMILIES = ("llama", "gpt2", "qwen2")
GPT2_POSITIONS = 256
"""GPT-2's context window here: small, so a test can reach its end cheaply."""

CONTEXT = "We the People of the United States, in Order to form a more perfect Union,"
CONTINUATION = " establish Justice, insure domestic Tranquility, provide for the common defence"


def random_model(family: str, tokenizer, seed: int = 0, **overrides) -> PreTrainedModel:
    """A small random causal LM of `family` whose vocabulary is the SmolLM2 tokenizer's."""
    if family == "llama":
        return tiny_model(tokenizer, seed)
    special = dict(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    if family == "gpt2":
        values = dict(vocab_size=len(tokenizer), n_embd=64, n_layer=2, n_head=4, n_positions=GPT2_POSITIONS)
        config = GPT2Config(**{**values, **special, **overrides})
        cls = GPT2LMHeadModel
    elif family == "qwen2":
        config = Qwen2Config(
            vocab_size=len(tokenizer),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=2048,
            tie_word_embeddings=True,
            **{**special, **overrides},
        )
        cls = Qwen2ForCausalLM
    else:
        raise ValueError(family)
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = cls(config)
        if family == "qwen2":  # random q/k/v biases (they start at zero), so the biases really take part
            with torch.no_grad():
                for layer in model.model.layers:
                    for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                        proj.bias.normal_(0.0, 0.5)
    finally:
        torch.random.set_rng_state(state)
    return model.eval()


@dataclass
class Family:
    name: str
    base: BaseModel  # loaded from `directory` by load_base_model
    source: PreTrainedModel  # the in-memory model that was saved there
    directory: str


def _saved_and_loaded(name, tiny, tmp_path_factory):  # noqa: F811
    source = random_model(name, tiny.tokenizer)
    directory = tmp_path_factory.mktemp("families") / f"tiny-{name}-random"
    source.save_pretrained(directory)
    tiny.tokenizer.save_pretrained(directory)
    base = load_base_model(str(directory), device="cpu", dtype="float32")
    return Family(name, base, source, str(directory))


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, tiny, tmp_path_factory):  # noqa: F811
    return _saved_and_loaded(request.param, tiny, tmp_path_factory)


@pytest.fixture(scope="module", params=[f for f in FAMILIES if f != "llama"])
def other_family(request, tiny, tmp_path_factory):  # noqa: F811
    """The families beside Llama: the slowest tests run Llama's row in their own files (on `tiny`,
    the same config: tests/test_engine_generation.py and tests/test_engine_training.py)."""
    return _saved_and_loaded(request.param, tiny, tmp_path_factory)


@pytest.fixture(scope="module")
def gpt2(tiny, tmp_path_factory):  # noqa: F811
    return _saved_and_loaded("gpt2", tiny, tmp_path_factory)


def _ones(n):
    return torch.ones(1, n, dtype=torch.long)


def _alone(base, ids, prefix):
    cache = batch_prefixes([prefix], base.geometry, device=base.device, dtype=base.dtype)
    return forward_with_prefixes(base, torch.tensor([ids]), _ones(len(ids)), cache).logits[0]


# -- (6) loading --------------------------------------------------------------------------------


def test_a_saved_model_directory_loads_as_that_family(family):
    base, source = family.base, family.source
    assert type(base.model) is type(source)
    assert base.model_id == f"tiny-{family.name}-random"
    assert base.fingerprint == weights_fingerprint(source) == weights_fingerprint(base.model)
    assert base.geometry == geometry_of(source.config)
    expected_context = GPT2_POSITIONS if family.name == "gpt2" else 2048
    assert base.max_context == expected_context
    assert base.tokenizer.pad_token_id is not None and base.eos_token_ids
    ids = text_ids(base.tokenizer, CONTEXT)
    with torch.no_grad():
        loaded, saved = (m(input_ids=torch.tensor([ids])).logits for m in (base.model, source))
    torch.testing.assert_close(loaded, saved, atol=0, rtol=0)
    card = load_model_card(family.directory)
    assert (card.model_id, card.fingerprint, card.max_context) == (base.model_id, base.fingerprint, base.max_context)


def test_geometry_matches_the_attention_layout(family):
    config, g = family.base.model.config, family.base.geometry
    if family.name == "gpt2":  # no GQA: one key/value head per query head
        expected = (config.n_layer, config.n_head, config.n_embd // config.n_head)
        assert (g.num_layers, g.num_kv_heads, g.head_dim) == expected
    else:
        assert g.num_kv_heads == config.num_key_value_heads < config.num_attention_heads
    kv = kv_from_text(family.base, text_ids(family.base.tokenizer, CONTEXT)[:5])
    assert tuple(kv.shape) == (g.num_layers, 2, g.num_kv_heads, 5, g.head_dim)


def test_sliding_window_attention_is_refused_not_served_wrongly(tiny, tmp_path):  # noqa: F811
    """A sliding window counts cache columns, and other rows' padding sits among a row's columns:
    such a model would make a row depend on its neighbours, so loading it fails loudly."""
    model = random_model("qwen2", tiny.tokenizer, use_sliding_window=True, sliding_window=8, max_window_layers=0)
    model.save_pretrained(tmp_path)
    tiny.tokenizer.save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match="sliding_attention"):
        load_base_model(str(tmp_path), device="cpu", dtype="float32")
    with pytest.raises(ModelLoadError, match="full attention only"):
        geometry_of(MistralConfig(sliding_window=4096))
    geometry_of(MistralConfig(sliding_window=None))  # Mistral without a window is plain full attention


# -- (1) a prefix is the model's own cache ------------------------------------------------------


def test_prefix_kv_of_real_text_equals_feeding_the_text(family):
    base = family.base
    a, b = text_ids(base.tokenizer, CONTEXT), text_ids(base.tokenizer, CONTINUATION)
    with torch.no_grad():
        whole = base.model(input_ids=torch.tensor([a + b])).logits[0, len(a) :]
        with_prefix = _alone(base, b, kv_from_text(base, a))
    torch.testing.assert_close(with_prefix, whole, atol=1e-4, rtol=0)


def test_no_prefix_row_is_the_base_model(family):
    base = family.base
    ids = text_ids(base.tokenizer, CONTINUATION)
    with torch.no_grad():
        plain = base.model(input_ids=torch.tensor([ids])).logits[0]
        torch.testing.assert_close(_alone(base, ids, None), plain, atol=1e-6, rtol=0)


# -- (2) mixed-batch forward --------------------------------------------------------------------


def test_mixed_batch_rows_equal_each_row_alone(family):
    """Different prefixes and prefix lengths, a no-prefix row, padding on either side."""
    base = family.base
    tok, g = base.tokenizer, base.geometry
    long_kv = kv_from_text(base, text_ids(tok, CONTEXT))
    short_kv = torch.randn(g.num_layers, 2, g.num_kv_heads, 3, g.head_dim, generator=torch.Generator().manual_seed(0))
    prompts = [text_ids(tok, CONTINUATION), text_ids(tok, " Hello there"), text_ids(tok, " provide for the common")]
    row_prefixes = [long_kv, None, short_kv]
    with torch.no_grad():
        alone = [_alone(base, p, kv) for p, kv in zip(prompts, row_prefixes)]
        for left_pad in (False, True):
            ids, mask, spans = padded_rows(prompts, tok.pad_token_id, left_pad)
            batch = batch_prefixes(row_prefixes, g, device=base.device, dtype=base.dtype)
            mixed = forward_with_prefixes(base, ids, mask, batch).logits
            for i in range(3):
                torch.testing.assert_close(mixed[i, spans[i]], alone[i], atol=1e-5, rtol=0)


# -- (3) mixed-batch generation -----------------------------------------------------------------


def test_mixed_batch_generation_equals_each_request_alone(family):
    base = family.base
    mixed = MixedBatchGenerator(base, max_batch_size=8).generate(mixed_requests(base))
    alone = [MixedBatchGenerator(base).generate([r])[0] for r in mixed_requests(base)]
    for m, a in zip(mixed, alone):
        assert m.token_ids == a.token_ids
        assert m.text == a.text and m.finish_reason == a.finish_reason
    # real, distinct rows (a random tiny model may repeat itself across the composed ones)
    assert len({tuple(m.token_ids) for m in mixed[:5]}) == 5 and len({tuple(m.token_ids) for m in mixed[5:]}) > 1


def test_requests_admitted_while_others_run_are_unaffected(other_family):
    family = other_family
    base = family.base
    reqs = mixed_requests(base)
    expected = [MixedBatchGenerator(base).generate([r])[0].token_ids for r in mixed_requests(base)]
    engine = MixedBatchGenerator(base, max_batch_size=3)
    results = {}
    for r in reqs[:2]:
        engine.submit(r)
    for _ in range(4):
        results.update({r.request_id: r for r in engine.step()})
    for r in reqs[2:]:
        engine.submit(r)
    while engine.has_work:
        results.update({r.request_id: r for r in engine.step()})
    assert [results[r.request_id].token_ids for r in reqs] == expected


def test_base_row_matches_transformers_generate(family):
    base = family.base
    prompt = chat_prompt_ids(base.tokenizer, [{"role": "user", "content": "Say hi."}])
    ours = MixedBatchGenerator(base).generate([GenerationRequest(prompt, SamplingParams(20, temperature=0))])[0]
    with torch.no_grad():
        theirs = base.model.generate(
            torch.tensor([prompt]),
            attention_mask=_ones(len(prompt)),
            max_new_tokens=20,
            do_sample=False,
            pad_token_id=base.tokenizer.pad_token_id,
        )
    expected = theirs[0, len(prompt) :].tolist()
    stops = [i for i, t in enumerate(expected) if t in base.eos_token_ids]
    assert ours.token_ids == expected[: stops[0]] if stops else expected


def test_generation_stops_at_the_context_window(gpt2):
    """Near the end of the window a row finishes with 'length' instead of running off it (for GPT-2
    a position past `n_positions` has no embedding), and it still equals running alone."""
    base = gpt2.base  # only GPT-2's window (256 here) is small enough to reach cheaply
    tok = base.tokenizer
    filler = (text_ids(tok, CONTEXT + CONTINUATION) * base.max_context)[: base.max_context - 12]
    prefix = kv_from_text(base, text_ids(tok, CONTEXT)[:5])
    long = GenerationRequest(filler, SamplingParams(50, temperature=0, ignore_eos=True), prefix)
    short = GenerationRequest(text_ids(tok, "Once upon a time"), SamplingParams(8, temperature=0, ignore_eos=True))
    mixed = MixedBatchGenerator(base, max_batch_size=4).generate([long, short])
    assert mixed[0].finish_reason == FINISH_LENGTH
    assert 5 + len(filler) + mixed[0].completion_tokens <= base.max_context
    assert mixed[0].completion_tokens < 50
    alone = MixedBatchGenerator(base).generate([GenerationRequest(filler, long.params, prefix)])[0]
    assert mixed[0].token_ids == alone.token_ids


# -- (4) composition ----------------------------------------------------------------------------


def _kv_after(base, context_kv, ids):
    """The KV of `ids` read in the context `context_kv` (positions continue after it)."""
    cache = batch_prefixes([context_kv], base.geometry, device=base.device, dtype=base.dtype)
    base.model(**cache.model_inputs(torch.tensor([ids])), logits_to_keep=1)
    return cache.row_kv(0)[:, :, :, context_kv.shape[3] :].float().cpu()


def test_a_composed_row_equals_one_prefix_holding_the_concatenation(family):
    base = family.base
    tok, g = base.tokenizer, base.geometry
    gen = torch.Generator().manual_seed(1)
    parts = [torch.randn(g.num_layers, 2, g.num_kv_heads, n, g.head_dim, generator=gen) for n in (2, 5, 3)]
    ids = text_ids(tok, CONTINUATION)
    chat = chat_prompt_ids(tok, [{"role": "user", "content": "Say hi."}])
    with torch.no_grad():
        for composed in (parts[:2], parts):
            joined = torch.cat(composed, dim=3)
            # forward: the composed row inside a mixed batch, against one prefix holding the concatenation
            batch = batch_prefixes([composed, None, parts[0]], g, device=base.device, dtype=base.dtype)
            ones = torch.ones(3, len(ids), dtype=torch.long)
            mixed = forward_with_prefixes(base, torch.tensor([ids] * 3), ones, batch)
            torch.testing.assert_close(mixed.logits[0], _alone(base, ids, joined), atol=1e-5, rtol=0)
            # generation: same tokens, greedy and sampled
            for params in (SamplingParams(12, temperature=0), SamplingParams(12, temperature=1.0, seed=5)):
                rows = [GenerationRequest(chat, params, list(composed)), GenerationRequest(chat, params, parts[1])]
                got = MixedBatchGenerator(base).generate(rows)[0]
                want = MixedBatchGenerator(base).generate([GenerationRequest(chat, params, joined)])[0]
                assert got.token_ids == want.token_ids
        # prefixes of consecutive pieces of text, composed, are that text
        a, b = text_ids(tok, CONTEXT), text_ids(tok, " establish Justice,")
        kv_a = kv_from_text(base, a)
        kv_b = _kv_after(base, kv_a, b)
        rest = text_ids(tok, " insure domestic Tranquility")
        whole = base.model(input_ids=torch.tensor([a + b + rest])).logits[0, len(a + b) :]
        torch.testing.assert_close(_alone(base, rest, [kv_a, kv_b]), whole, atol=1e-4, rtol=0)


# -- (5) training -------------------------------------------------------------------------------


def test_multi_user_training_equals_each_user_alone(other_family):
    family = other_family
    base = family.base
    config = small_training_config(max_steps=3, preservation_anchors=3, preservation_len=16)
    users = [UserData("alice", ALICE), UserData("bob", BOB), UserData("carol", CAROL)]
    together = train_prefixes(base, users, config)
    for user, joint in zip(users, together):
        alone = train_prefixes(base, [user], config)[0]
        assert joint.user_id == user.user_id
        assert joint.metrics["steps"] == alone.metrics["steps"] == config.max_steps
        torch.testing.assert_close(joint.kv, alone.kv, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(together[0].kv, together[1].kv)
    assert weights_fingerprint(base.model) == base.fingerprint
    assert all(p.grad is None and not p.requires_grad for p in base.model.parameters())


def test_training_that_would_run_past_the_context_window_is_refused(gpt2):
    """GPT-2 has no position embedding past its window: a clear error, before any step."""
    config = TrainingConfig(max_steps=1, max_seq_len=gpt2.base.max_context, prefix=PrefixConfig(prefix_len=4))
    with pytest.raises(InvalidTrainingData, match="context window"):
        train_prefixes(gpt2.base, [UserData("u", ["Some text of mine."] * 4)], config)
