"""A prefix is the model's own cache: it must behave exactly like real preceding text, per row."""

import pytest
import torch

from core.engine.prefix import PrefixConfig, PrefixEncoder, batch_prefixes, forward_with_prefixes, kv_from_text
from core.engine.prompts import text_ids
from tests.engine_fixtures import padded_rows, smollm2, tiny  # noqa: F401
from tests.support.models import model_cache_dir

CONTEXT = "We the People of the United States, in Order to form a more perfect Union,"
CONTINUATION = " establish Justice, insure domestic Tranquility, provide for the common defence"


def _ones(n):
    return torch.ones(1, n, dtype=torch.long)


def _prefix_of_text_equals_text(base):
    a, b = text_ids(base.tokenizer, CONTEXT), text_ids(base.tokenizer, CONTINUATION)
    with torch.no_grad():
        whole = base.model(input_ids=torch.tensor([a + b])).logits[0, len(a) :]
        prefixes = batch_prefixes([kv_from_text(base, a)], base.geometry, device=base.device, dtype=base.dtype)
        with_prefix = forward_with_prefixes(base, torch.tensor([b]), _ones(len(b)), prefixes).logits[0]
    torch.testing.assert_close(with_prefix, whole, atol=1e-4, rtol=0)


def test_prefix_kv_of_real_text_equals_feeding_the_text(tiny):
    _prefix_of_text_equals_text(tiny)


@pytest.mark.slow
def test_prefix_kv_of_real_text_equals_feeding_the_text_on_smollm2(smollm2):
    _prefix_of_text_equals_text(smollm2)


@pytest.mark.slow
def test_the_model_card_of_smollm2_matches_the_loaded_model_without_loading_weights(smollm2, monkeypatch):
    import core.engine.model

    def refuse(*_args, **_kwargs):
        raise AssertionError("weights loaded for a model card")

    monkeypatch.setattr(core.engine.model.AutoModelForCausalLM, "from_pretrained", refuse)
    card = core.engine.model.load_model_card("smollm2", cache_root=model_cache_dir())
    assert (card.model_id, card.fingerprint, card.max_context) == (
        smollm2.model_id,
        smollm2.fingerprint,
        smollm2.max_context,
    )
    text = "Dear Sir, the State of the Union is strong."
    assert card.tokenizer(text).input_ids == smollm2.tokenizer(text).input_ids
    assert card.tokenizer.pad_token_id == smollm2.tokenizer.pad_token_id is not None


def test_prefix_shape_is_per_kv_head(tiny):
    kv = kv_from_text(tiny, text_ids(tiny.tokenizer, CONTEXT)[:5])
    g = tiny.geometry
    assert g.num_kv_heads < tiny.model.config.num_attention_heads  # the tiny model really is GQA
    assert tuple(kv.shape) == (g.num_layers, 2, g.num_kv_heads, 5, g.head_dim)


@pytest.mark.slow
def test_smollm2_prefix_has_184320_values(smollm2):
    assert smollm2.geometry.numel(16) == 184_320
    assert smollm2.geometry.numel(16) / smollm2.num_parameters() < 0.0015


def test_mixed_batch_rows_equal_each_row_alone(tiny):
    """Rows with different prefixes, prefix lengths, no prefix and padding on either side."""
    tok = tiny.tokenizer
    long_kv = kv_from_text(tiny, text_ids(tok, CONTEXT))
    short_kv = torch.randn(tiny.geometry.num_layers, 2, tiny.geometry.num_kv_heads, 3, tiny.geometry.head_dim)
    prompts = [text_ids(tok, CONTINUATION), text_ids(tok, " Hello there"), text_ids(tok, " provide for the common")]
    row_prefixes = [long_kv, None, short_kv]
    for left_pad in (False, True):
        ids, mask, spans = padded_rows(prompts, tok.pad_token_id, left_pad)
        with torch.no_grad():
            batch = batch_prefixes(row_prefixes, tiny.geometry, device=tiny.device, dtype=tiny.dtype)
            mixed = forward_with_prefixes(tiny, ids, mask, batch).logits
            for i, (p, kv) in enumerate(zip(prompts, row_prefixes)):
                alone_batch = batch_prefixes([kv], tiny.geometry, device=tiny.device, dtype=tiny.dtype)
                alone = forward_with_prefixes(tiny, torch.tensor([p]), _ones(len(p)), alone_batch).logits[0]
                torch.testing.assert_close(mixed[i, spans[i]], alone, atol=1e-5, rtol=0)


def test_no_prefix_row_is_the_base_model(tiny):
    ids = text_ids(tiny.tokenizer, CONTINUATION)
    with torch.no_grad():
        base = tiny.model(input_ids=torch.tensor([ids])).logits[0]
        batch = batch_prefixes([None], tiny.geometry, device=tiny.device, dtype=tiny.dtype)
        through_engine = forward_with_prefixes(tiny, torch.tensor([ids]), _ones(len(ids)), batch).logits[0]
    torch.testing.assert_close(through_engine, base, atol=1e-6, rtol=0)


def test_encoder_starts_at_the_activations_it_was_initialised_from(tiny):
    kv = kv_from_text(tiny, text_ids(tiny.tokenizer, CONTEXT)[:8])
    for reparameterize in (True, False):
        encoder = PrefixEncoder(tiny.geometry, PrefixConfig(prefix_len=8, reparameterize=reparameterize), kv)
        torch.testing.assert_close(encoder.export(), kv)


def test_gradients_reach_each_rows_own_prefix_only(tiny):
    g = tiny.geometry
    a = torch.zeros(g.num_layers, 2, g.num_kv_heads, 4, g.head_dim, requires_grad=True)
    b = torch.zeros(g.num_layers, 2, g.num_kv_heads, 2, g.head_dim, requires_grad=True)
    ids = torch.tensor([text_ids(tiny.tokenizer, CONTINUATION)[:6]] * 2)
    batch = batch_prefixes([a, b], g, device=tiny.device, dtype=tiny.dtype)
    logits = forward_with_prefixes(tiny, ids, torch.ones_like(ids), batch).logits
    logits[0].sum().backward()  # only row 0 contributes
    assert a.grad.abs().sum() > 0
    assert b.grad is None or b.grad.abs().sum() == 0
