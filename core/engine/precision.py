"""The precision training computes in: float32, or bfloat16 where the hardware multiplies it fast.

Only the frozen base model's arithmetic changes. A job in bfloat16 runs on a bfloat16 copy of the
base weights (made once per base model and kept: +2 bytes per weight) under autocast; the users'
trainable parameters, their optimiser state and every exported prefix or LoRA stay float32, and are
served by the float32 model like any other. Measured (docs/BENCHMARKS.md, "Training in bfloat16"):
on a CPU with AMX a step took 0.63x the time for the same validation loss, rescored in float32; on
one with AVX-512-bf16 but no AMX, 0.46x, but a process's memory grew with every bfloat16 job there
(oneDNN's per-shape kernels: 530 -> 970 MiB over 30 small jobs, flat in float32), which a
long-running server must not do; on one with neither, a bfloat16 matmul ran 69x slower than
float32. So 'auto' (the service's default) picks bfloat16 on a CPU with AMX or a CUDA GPU that
supports it; float32 elsewhere (and the engine's own default is float32). `bfloat16` asked for
explicitly runs anywhere.

A job's validation losses, its no-worse comparison with the user's active version and its
preservation anchors are all computed in the job's precision, so they are comparable with each other.
"""

from __future__ import annotations

import contextlib
import copy
import threading
import weakref
from collections.abc import Iterator

import torch
from torch import nn

from core.engine.model import BaseModel
from core.errors import InvalidTrainingData

AUTO = "auto"
FLOAT32 = "float32"
BFLOAT16 = "bfloat16"
COMPUTE_DTYPES = (AUTO, FLOAT32, BFLOAT16)

_copies: weakref.WeakKeyDictionary[nn.Module, BaseModel] = weakref.WeakKeyDictionary()
_copies_lock = threading.Lock()


def resolve_compute_dtype(compute_dtype: str, device: torch.device) -> str:
    """float32 or bfloat16: 'auto' is bfloat16 where the hardware multiplies it fast."""
    if compute_dtype not in COMPUTE_DTYPES:
        raise InvalidTrainingData(f"compute_dtype must be one of {', '.join(COMPUTE_DTYPES)}, not {compute_dtype!r}")
    if compute_dtype != AUTO:
        return compute_dtype
    return BFLOAT16 if fast_bfloat16(device) else FLOAT32


def fast_bfloat16(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    # torch keeps its CPU feature probes private; without them, float32 (never wrong, maybe slower).
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return probe is not None and bool(probe())


def training_base(base: BaseModel, compute_dtype: str) -> BaseModel:
    """`base` itself for float32; for bfloat16, its bfloat16 copy (the same fingerprint: the same
    weights, rounded), made on first use and kept while `base` lives."""
    if resolve_compute_dtype(compute_dtype, base.device) == FLOAT32 or base.dtype == torch.bfloat16:
        return base
    with _copies_lock:
        copied = _copies.get(base.model)
        if copied is None:
            model = copy.deepcopy(base.model).to(torch.bfloat16).requires_grad_(False)
            copied = BaseModel(model, base.tokenizer, base.model_id, base.fingerprint, base.geometry)
            _copies[base.model] = copied
        return copied


@contextlib.contextmanager
def computing_in(compute_dtype: str, device: torch.device) -> Iterator[None]:
    """Autocast to bfloat16 for a bfloat16 job (the float32 trainable parameters meet the bfloat16
    weights in bfloat16 matmuls), nothing for float32.

    The autocast weight cache is off: it keeps one bfloat16 cast of every float32 leaf tensor that
    requires grad for the whole block, so the users' parameters would be read as they were at the
    first step for the whole job (measured: no step improved the validation loss)."""
    if resolve_compute_dtype(compute_dtype, device) == FLOAT32:
        yield
        return
    with torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=False):
        yield
