"""Training and scoring the baselines (core/tuners/prompt_tuning.py, core/tuners/peft_lora.py)
through the one training loop (core/tuners/loop.py), exactly as prefixes are.

Data split, step budget, epochs, time budget, schedule, preservation term, early stopping and
checkpoint selection are the loop's; a baseline only says what a user trains and how it enters the
forward pass (core/tuners/base.py's TuningMethod).

- Prompt tuning (Lester et al. 2021): P trainable input embeddings per user placed before the tokens;
  the frozen model is unchanged. Mixed-user batches work as for prefixes.
- LoRA (Hu et al. 2021) via PEFT, an optional extra: one adapter per user on a private copy of the base
  model (PEFT would otherwise patch the shared model in place). PEFT runs one adapter per forward, so
  the loop runs one forward/backward per user (its anchors for the preservation term included).
Full fine-tuning is not offered: a 135M-parameter copy plus AdamW state per user (~2 GB) and a full
backward per user-step does not fit this harness's CPU budget.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from safetensors.torch import save as st_save

from core.engine.model import BaseModel
from core.tuners.base import Progress, TrainingConfig, UserData
from core.tuners.loop import loss_sums, train_users


class GroupedScorer:
    """A Scorer (core/evaluation/metrics.py) over a trained baseline, rows tagged by user id (None =
    base model), scored by the training loop's own `loss_sums` (one user per forward when the
    method cannot mix users)."""

    def __init__(self, method):
        self.method = method

    def loss_sums(self, rows, users):
        modules = [None if u is None else self.method.modules[u] for u in users]
        sums, counts = loss_sums(self.method.base, self.method, rows, modules)
        return sums.cpu(), counts.cpu()


def artifact_bytes(state: dict[str, torch.Tensor]) -> int:
    """Size of the served form: the tensors as float16 safetensors (as prefixes are exported)."""
    return len(st_save({k: v.to(torch.float16).contiguous() for k, v in state.items()}))


def train_baseline(
    base: BaseModel,
    method,
    users: list[UserData],
    config: TrainingConfig,
    on_progress: Callable[[Progress], None] | None = None,
) -> dict[str, dict]:
    """Train `method` for every user through the training loop of prefixes (core/tuners/loop.py).

    Returns per-user metrics; the method is left holding each user's best-validation state.
    """
    started = time.monotonic()
    trained = train_users(base, method, users, config, on_progress=on_progress)
    seconds = time.monotonic() - started
    results = {}
    for t in trained:
        served = method.export(t.module)
        results[t.user_id] = {
            **t.metrics,
            "train_seconds": seconds / len(trained),
            "served_params": sum(v.numel() for v in served.values()),
            "artifact_bytes": artifact_bytes(served),
        }
    return results
