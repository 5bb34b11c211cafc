"""Artifacts: safetensors only, bound to their base model, checked, and faithful to what was trained:
a prefix, a LoRA, or both (format 2), and format 1 prefixes still load."""

import hashlib
import json
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from core.config import Settings
from core.engine import lora
from core.engine.adaptation import Adaptation
from core.engine.lora import LoRABatch, LoRAConfig, LoRAWeights, target_modules
from core.engine.model import load_base_model
from core.engine.prefix import PrefixConfig, PrefixEncoder, batch_prefixes, forward_with_prefixes
from core.engine.prompts import text_ids
from core.errors import CorruptArtifact, IncompatibleBaseModel
from core.service.hyperparameters import ENGINE_DEFAULTS
from core.tuners.artifacts import (
    Prefix,
    _tensors_sha256,
    load_prefix,
    load_training_state,
    save_prefix,
    save_training_state,
)
from core.tuners.base import TrainingConfig, UserData
from core.tuners.prefix_training import train_prefixes
from core.tuners.registry import LORA, PREFIX, PT_PEFT, STORED_METHODS
from core.tuners.train import train_adapters
from tests.engine_fixtures import small_training_config, smollm2, tiny  # noqa: F401
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


# -- every method: a prefix KV, a LoRA, or both (format 2) ------------------------------------------


@pytest.fixture(scope="module")
def adapted(tiny):
    """One trained user per method (core/tuners/registry.py), as the training job gets them."""
    config = small_training_config(lora=LoRAConfig(rank=2), max_steps=4, learning_rate=3e-2)
    users = [UserData("u", [f"Sample number {i} about trains, timetables and coffee." for i in range(6)])]
    return {method: train_adapters(tiny, users, replace(config, method=method))[0] for method in STORED_METHODS}


def _artifact(base, trained, **overrides) -> bytes:
    values = dict(
        kv=trained.adaptation.kv,
        base_model_id=base.model_id,
        base_fingerprint=base.fingerprint,
        metrics=trained.metrics,
        lora=trained.adaptation.lora,
        method=trained.method,
    )
    values.update(overrides)
    return save_prefix(Prefix(**values))


def _metadata(data: bytes) -> dict[str, str]:
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + n])["__metadata__"]


def _rewritten(data: bytes, tensors=None, metadata=None, checksum=True) -> bytes:
    """A well-formed file with changed content: the tensors and metadata `tensors`/`metadata` map
    to new ones, the checksum recomputed (so only the content checks can catch it)."""
    new_tensors = (tensors or (lambda t: t))(dict(st_load(data)))
    new_metadata = (metadata or (lambda m: m))(dict(_metadata(data)))
    if checksum:
        new_metadata["tensor_sha256"] = _tensors_sha256(new_tensors)
    return st_save(new_tensors, metadata=new_metadata)


def _served_logits(base, adaptation):
    ids = torch.tensor([text_ids(base.tokenizer, "The timetable says the train")])
    kvs = None if adaptation.kv is None else [adaptation.kv]
    loras = LoRABatch.from_rows([adaptation.lora], device=base.device, dtype=base.dtype)
    with torch.no_grad(), lora.active(base.model, loras):
        batch = batch_prefixes([kvs], base.geometry, device=base.device, dtype=base.dtype)
        return forward_with_prefixes(base, ids, torch.ones_like(ids), batch).logits[0]


def _fp16(adaptation, base) -> Adaptation:
    """What storing in float16 and loading onto `base` makes of an adaptation."""

    def rounded(t):
        return t.to(torch.float16).to(base.dtype)

    weights = adaptation.lora
    if weights is not None:
        weights = LoRAWeights({n: (rounded(a), rounded(b)) for n, (a, b) in weights.modules.items()})
    return Adaptation(None if adaptation.kv is None else rounded(adaptation.kv), weights)


@pytest.mark.parametrize("method", STORED_METHODS)
def test_every_method_round_trips_to_identical_tensors_and_logits(tiny, adapted, method):
    trained = adapted[method]
    data = _artifact(tiny, trained)
    loaded = load_prefix(data, tiny)
    stored = _fp16(trained.adaptation, tiny)
    assert loaded.method == method and loaded.metrics["method"] == method
    assert (loaded.kv is None) == (method == LORA) and (loaded.lora is None) == (method == PREFIX)
    if stored.kv is not None:
        assert torch.equal(loaded.kv, stored.kv)
    if stored.lora is not None:
        assert list(loaded.lora.modules) == list(stored.lora.modules) == list(target_modules(tiny.model))
        for name, (a, b) in stored.lora.modules.items():
            assert torch.equal(loaded.lora.modules[name][0], a) and torch.equal(loaded.lora.modules[name][1], b)
    assert torch.equal(_served_logits(tiny, loaded.adaptation), _served_logits(tiny, stored))
    metadata = _metadata(data)
    assert (metadata["format_version"], metadata["method"]) == ("2", method)
    if method != PREFIX:
        assert (metadata["lora_rank"], json.loads(metadata["lora_targets"])) == ("2", ["q_proj", "v_proj"])
    assert all(t.dtype == torch.float16 for t in st_load(data).values())


def test_a_format_1_prefix_artifact_still_loads(tiny, trained):
    """Format 1 as the service wrote it before methods: `kv` alone, its checksum over the KV bytes."""
    kv = trained.kv.to(torch.float16).contiguous()
    metadata = {
        "format": "steer-prefix",
        "format_version": "1",
        "base_model_id": tiny.model_id,
        "base_fingerprint": tiny.fingerprint,
        "prefix_len": str(kv.shape[3]),
        "num_layers": str(kv.shape[0]),
        "num_kv_heads": str(kv.shape[2]),
        "head_dim": str(kv.shape[4]),
        "dtype": "float16",
        "training_config": "{}",
        "metrics": '{"val_loss": 1.0}',
        "tensor_sha256": hashlib.sha256(kv.view(torch.uint8).numpy().tobytes()).hexdigest(),
    }
    data = st_save({"kv": kv}, metadata=metadata)
    loaded = load_prefix(data, tiny)
    assert (loaded.method, loaded.lora, loaded.metrics) == (PREFIX, None, {"val_loss": 1.0})
    assert torch.equal(loaded.kv, kv.to(tiny.dtype))
    with pytest.raises(CorruptArtifact, match="checksum"):
        load_prefix(data[:-3] + bytes(b ^ 0xFF for b in data[-3:]), tiny)


def _first_a(change):
    """A change of the tensors: the first LoRA A matrix becomes `change(A)` (None: removed)."""

    def apply(tensors):
        name = next(n for n in sorted(tensors) if n.endswith(".A"))
        changed = change(tensors.pop(name))
        return tensors if changed is None else {**tensors, name: changed}

    return apply


LORA_CORRUPTIONS = {
    "truncated": lambda d: d[: len(d) // 2],
    "tensor bytes flipped": lambda d: d[:-3] + bytes(b ^ 0xFF for b in d[-3:]),
    "non-finite value": lambda d: _rewritten(d, _first_a(lambda a: torch.full_like(a, float("inf")))),
    "a B without its A": lambda d: _rewritten(d, _first_a(lambda a: None)),
    "A and B ranks differ": lambda d: _rewritten(d, _first_a(lambda a: a[:1])),
    "rank not as recorded": lambda d: _rewritten(d, metadata=lambda m: {**m, "lora_rank": "3"}),
    "a tensor of no LoRA": lambda d: _rewritten(d, lambda t: {**t, "stray": torch.zeros(2)}),
    "method says prefix": lambda d: _rewritten(d, metadata=lambda m: {**m, "method": "prefix"}),
    "unknown method": lambda d: _rewritten(d, metadata=lambda m: {**m, "method": "dora"}),
    "unknown format version": lambda d: _rewritten(d, metadata=lambda m: {**m, "format_version": "3"}),
}


@pytest.mark.parametrize("method", [LORA, PT_PEFT])
@pytest.mark.parametrize("corrupt", list(LORA_CORRUPTIONS))
def test_a_corrupted_lora_artifact_is_rejected_with_a_clear_error(tiny, adapted, method, corrupt):
    with pytest.raises(CorruptArtifact):
        load_prefix(LORA_CORRUPTIONS[corrupt](_artifact(tiny, adapted[method])), tiny)


def test_a_lora_of_another_base_model_is_refused(tiny, adapted):
    trained = adapted[LORA]
    other = load_base_model("tiny", cache_root=model_cache_dir())
    other.fingerprint = "0" * 64  # same shapes, different weights
    with pytest.raises(IncompatibleBaseModel, match="trained on base model"):
        load_prefix(_artifact(tiny, trained), other)
    (name, (a, b)), *_ = trained.adaptation.lora.modules.items()
    elsewhere = LoRAWeights({name.replace("layers.0", "layers.99"): (a, b)})
    with pytest.raises(IncompatibleBaseModel, match="not a projection of the base model"):
        load_prefix(_artifact(tiny, trained, lora=elsewhere), tiny)
    wider = LoRAWeights({name: (torch.zeros(a.shape[0], a.shape[1] + 1), b)})
    with pytest.raises(IncompatibleBaseModel, match="the base model's is"):
        load_prefix(_artifact(tiny, trained, lora=wider), tiny)
    with pytest.raises(IncompatibleBaseModel):
        load_prefix(_artifact(tiny, trained, lora=LoRAWeights({"lm_head.k_proj": (a, b)})), tiny)


def test_a_method_stores_exactly_its_parts(tiny, adapted):
    with pytest.raises(ValueError, match="stores"):
        _artifact(tiny, adapted[PT_PEFT], method=LORA)  # a LoRA does not carry a KV
    with pytest.raises(ValueError, match="stores"):
        _artifact(tiny, adapted[PREFIX], method=PT_PEFT)  # PT-PEFT has both
    with pytest.raises(ValueError, match="cannot store"):
        _artifact(tiny, adapted[PREFIX], method="auto")  # auto resolves to one method per user


@pytest.mark.slow
@pytest.mark.parametrize(
    "method",
    [
        PREFIX,
        LORA,
        PT_PEFT,
    ],
)
def test_each_method_at_the_service_defaults_stores_at_most_0_3_percent_of_the_base(smollm2, method):
    """Bytes per user (the whole artifact) against the base model's parameters in fp16."""
    g = smollm2.geometry
    settings = Settings(_env_file=None)
    kv = torch.randn(g.num_layers, 2, g.num_kv_heads, ENGINE_DEFAULTS.prefix.prefix_len, g.head_dim) * 0.1
    rank = settings.train_lora_rank_default
    shapes = target_modules(smollm2.model, ENGINE_DEFAULTS.lora.targets)
    weights = LoRAWeights({n: (torch.randn(rank, i), torch.randn(o, rank)) for n, (i, o) in shapes.items()})
    parts = {PREFIX: (kv, None), LORA: (None, weights), PT_PEFT: (kv, weights)}[method]
    data = save_prefix(Prefix(parts[0], smollm2.model_id, smollm2.fingerprint, lora=parts[1], method=method))
    fp16_params = 2 * sum(p.numel() for p in smollm2.model.parameters())
    assert len(data) <= 0.003 * fp16_params
