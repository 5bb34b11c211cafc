"""Training in bfloat16 (core/engine/precision.py): the engine's guarantees hold in it — several users in
one job train what each trains alone, for prefixes and LoRA — the trained parameters keep learning
at every step, what is exported is float32, and the float32 base model is never changed."""

from dataclasses import replace

import pytest
import torch

from core.config import Settings
from core.engine.model import weights_fingerprint
from core.engine.precision import AUTO, BFLOAT16, FLOAT32, fast_bfloat16, resolve_compute_dtype, training_base
from core.errors import InvalidTrainingData
from core.tuners.base import UserData
from core.tuners.prefix_training import train_prefixes
from core.tuners.registry import LORA, PREFIX
from core.tuners.train import train_adapters
from tests.engine_fixtures import ALICE, BOB, CAROL, tiny  # noqa: F401
from tests.engine_fixtures import small_training_config as _config

USERS = [UserData("alice", ALICE), UserData("bob", BOB), UserData("carol", CAROL)]


@pytest.mark.parametrize("method", [PREFIX, LORA])
def test_bfloat16_users_in_one_job_train_what_each_trains_alone(tiny, method):
    """Other users' rows change a matmul's shape, so the kernel's summation order, never a row's
    inputs: a user's result differs from alone by bfloat16 rounding (Adam's normalised steps make
    that visible on elements whose gradient is near zero), far less than users differ."""
    config = _config(compute_dtype=BFLOAT16, preservation_weight=0.5, method=method, learning_rate=3e-2)
    together = train_adapters(tiny, USERS, config)
    for user, joint in zip(USERS, together):
        alone = train_adapters(tiny, [user], config)[0]
        assert joint.metrics["steps"] == alone.metrics["steps"] == config.max_steps
        for mine, theirs in zip(_exported(joint), _exported(alone), strict=True):
            assert mine.dtype == torch.float32
            assert _relative_difference(mine, theirs) < 0.03  # measured up to 0.008; users differ by >= 0.55
    trained = [_exported(t) for t in together]
    assert max(_relative_difference(a, b) for a, b in zip(trained[0], trained[1])) > 0.1  # the users differ


def _relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _exported(trained) -> list[torch.Tensor]:
    """A trained adaptation's served tensors: the prefix KV, then every LoRA matrix."""
    tensors = [] if trained.adaptation.kv is None else [trained.adaptation.kv]
    if trained.adaptation.lora is not None:
        for name in sorted(trained.adaptation.lora.modules):
            tensors.extend(trained.adaptation.lora.modules[name])
    return tensors


def test_bfloat16_training_learns_at_every_evaluation_and_stays_near_float32(tiny):
    """Autocast's weight cache would keep the first step's cast of the users' parameters for the
    whole job: no evaluation after the first would improve (core/engine/precision.py)."""
    config = _config(max_steps=20, learning_rate=3e-2, eval_every=5)
    user = [UserData("bob", BOB * 2)]
    in_bf16 = train_prefixes(tiny, user, replace(config, compute_dtype=BFLOAT16))[0]
    in_fp32 = train_prefixes(tiny, user, config)[0]
    assert in_bf16.metrics["best_step"] >= 10  # with the cache on: 0, nothing after the first cast moves
    assert in_bf16.metrics["val_loss"] < in_bf16.metrics["initial_val_loss"] - 0.05
    assert in_bf16.metrics["val_loss"] == pytest.approx(in_fp32.metrics["val_loss"], rel=0.02)
    assert in_bf16.kv.dtype == torch.float32


def test_the_bfloat16_copy_is_made_once_and_the_float32_base_is_never_changed(tiny):
    before = weights_fingerprint(tiny.model)
    train_prefixes(tiny, USERS[:2], _config(compute_dtype=BFLOAT16, max_steps=2))
    copy = training_base(tiny, BFLOAT16)
    assert copy is training_base(tiny, BFLOAT16) and training_base(tiny, FLOAT32) is tiny
    assert copy.dtype == torch.bfloat16 and copy.fingerprint == tiny.fingerprint
    assert tiny.dtype == torch.float32 and weights_fingerprint(tiny.model) == before
    assert all(p.grad is None and not p.requires_grad for p in tiny.model.parameters())


def test_an_unknown_compute_dtype_is_refused(tiny):
    with pytest.raises(InvalidTrainingData, match="compute_dtype"):
        train_prefixes(tiny, USERS[:1], _config(compute_dtype="float16"))


def test_auto_trains_in_bfloat16_exactly_where_the_hardware_is_fast_at_it_and_says_which(tiny):
    trained = train_prefixes(tiny, USERS[:1], _config(compute_dtype=AUTO, max_steps=2))[0]
    expected = BFLOAT16 if fast_bfloat16(tiny.device) else FLOAT32
    assert resolve_compute_dtype(AUTO, tiny.device) == trained.metrics["compute_dtype"] == expected
    assert resolve_compute_dtype(FLOAT32, tiny.device) == FLOAT32  # asked for, whatever the hardware
    assert Settings().train_compute_dtype == AUTO  # the service's default


@pytest.mark.parametrize(
    ("amx", "avx512_bf16", "fast"),
    [(True, False, True), (False, True, False), (True, True, True), (False, False, False)],
)
def test_auto_picks_bfloat16_on_a_cpu_with_amx_only(monkeypatch, amx, avx512_bf16, fast):
    """The measured rule (docs/BENCHMARKS.md): 0.63x the step time with AMX; with AVX-512-bf16 alone
    0.46x but a memory that grows with every job; 69x slower matmuls with neither. The CPU's own
    probes are replaced here: one function."""
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
    assert fast_bfloat16(torch.device("cpu")) is fast
    assert resolve_compute_dtype(AUTO, torch.device("cpu")) == (BFLOAT16 if fast else FLOAT32)
