"""Artifacts: safetensors only, bound to their base model, checked, and faithful to the trained prefix."""

import pytest
import torch

from core.artifacts import Prefix, load_prefix, load_training_state, save_prefix, save_training_state
from core.errors import CorruptArtifact, IncompatibleBaseModel
from core.model import load_base_model
from core.prefix import PrefixConfig, PrefixEncoder, batch_prefixes, forward_with_prefixes
from core.prompts import text_ids
from core.training import TrainingConfig, UserData, train_prefixes
from tests.engine_fixtures import smollm2, tiny  # noqa: F401
from tests.support.models import model_cache_dir


@pytest.fixture(scope="module")
def trained(tiny):
    config = TrainingConfig(
        prefix=PrefixConfig(prefix_len=4, embedding_dim=16, hidden_dim=32), max_steps=3, batch_size=2, max_seq_len=64
    )
    samples = [f"Sample number {i} about trains, timetables and coffee." for i in range(6)]
    return train_prefixes(tiny, [UserData("u", samples)], config)[0]


def _logits(base, kv):
    ids = torch.tensor([text_ids(base.tokenizer, "The timetable says the train")])
    with torch.no_grad():
        batch = batch_prefixes([kv], base.geometry, device=base.device, dtype=base.dtype)
        return forward_with_prefixes(base, ids, torch.ones_like(ids), batch).logits[0]


def _prefix(base, kv):
    return Prefix(kv=kv, base_model_id=base.model_id, base_fingerprint=base.fingerprint, metrics={"val_loss": 1.0})


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_export_load_round_trip_gives_identical_logits(tiny, trained, dtype):
    data = save_prefix(_prefix(tiny, trained.kv), dtype=dtype)
    loaded = load_prefix(data, tiny)
    stored = trained.kv.to(getattr(torch, dtype)).to(tiny.dtype)
    assert torch.equal(loaded.kv, stored)
    assert torch.equal(_logits(tiny, loaded.kv), _logits(tiny, stored))
    assert loaded.metrics == {"val_loss": 1.0}


def test_exported_prefix_matches_the_training_form(tiny, trained):
    encoder = PrefixEncoder(tiny.geometry, trained.prefix_config)
    encoder.load_state_dict(trained.state)
    with torch.no_grad():
        training_form = _logits(tiny, encoder())
    served = _logits(tiny, load_prefix(save_prefix(_prefix(tiny, trained.kv)), tiny).kv)
    torch.testing.assert_close(served, training_form, atol=2e-3, rtol=0)  # fp16 storage rounding only


def test_training_state_round_trip_rebuilds_the_same_prefix(tiny, trained):
    state, config = load_training_state(save_training_state(trained.state, trained.prefix_config.to_dict(), tiny), tiny)
    encoder = PrefixEncoder(tiny.geometry, PrefixConfig(**config))
    encoder.load_state_dict(state)
    assert torch.equal(encoder.export(), trained.kv)
    assert {"embedding", "up.weight", "down.weight", "base"} <= set(state)  # the MLP is kept, unlike PEFT


def test_prefix_of_another_base_model_is_rejected(tiny, trained):
    other = load_base_model("tiny", cache_root=model_cache_dir())
    other.fingerprint = "0" * 64  # same shapes, different weights
    with pytest.raises(IncompatibleBaseModel, match="trained on base model"):
        load_prefix(save_prefix(_prefix(tiny, trained.kv)), other)
    with pytest.raises(IncompatibleBaseModel):
        load_training_state(save_training_state(trained.state, {}, tiny), other)


@pytest.mark.parametrize(
    "corrupt",
    [
        lambda d: d[: len(d) // 2],  # truncated
        lambda d: d[:-3] + bytes(b ^ 0xFF for b in d[-3:]),  # tensor bytes flipped
        lambda d: b"\x00" * len(d),
        lambda d: b"",
        lambda d: b"not a safetensors file at all",
    ],
)
def test_corrupted_artifact_is_rejected_with_a_clear_error(tiny, trained, corrupt):
    with pytest.raises(CorruptArtifact):
        load_prefix(corrupt(save_prefix(_prefix(tiny, trained.kv))), tiny)


def test_state_artifact_is_not_accepted_as_a_prefix(tiny, trained):
    with pytest.raises(CorruptArtifact, match="not a steer-prefix"):
        load_prefix(save_training_state(trained.state, {}, tiny), tiny)


@pytest.mark.slow
def test_smollm2_prefix_artifact_is_under_0_2_percent_of_the_base(smollm2):
    g = smollm2.geometry
    kv = torch.randn(g.num_layers, 2, g.num_kv_heads, 16, g.head_dim)
    data = save_prefix(_prefix(smollm2, kv))
    assert len(data) < 0.002 * smollm2.weight_bytes()
    assert len(data) - 184_320 * 2 < 4096  # the tensor plus a small header
