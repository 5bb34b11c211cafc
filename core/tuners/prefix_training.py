"""Prefix tuning's training (method `prefix`): decoders or encoder-decoders, with the prefix-length search."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from core.engine.adaptation import Adaptation
from core.engine.model import BaseModel
from core.engine.precision import training_base
from core.engine.prefix import PrefixConfig
from core.tuners.base import Progress, TrainedAdaptation, TrainingConfig, UserData
from core.tuners.loop import check_fits_context, train_users
from core.tuners.prefix import PrefixMethod
from core.tuners.registry import PREFIX
from core.tuners.seq2seq import Seq2SeqPrefixMethod, is_encoder_decoder


@dataclass
class TrainedPrefix:
    user_id: str
    kv: torch.Tensor  # (L, 2, H, P, D) fp32 on CPU: the best validation checkpoint
    state: dict[str, torch.Tensor]  # PrefixEncoder state at that checkpoint (for resuming)
    prefix_config: PrefixConfig
    metrics: dict


def train_prefixes(
    base: BaseModel,
    users: list[UserData],
    config: TrainingConfig,
    *,
    on_progress: Callable[[Progress], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
) -> list[TrainedPrefix]:
    """Train one prefix per user, all users sharing each forward/backward pass over the frozen base."""
    check_fits_context(base, users, config)
    base = training_base(base, config.compute_dtype)
    if config.prefix_len_candidates:
        return _train_choosing_prefix_len(base, users, config, on_progress, should_cancel)
    method = prefix_method(base, config.prefix)
    trained = train_users(base, method, users, config, on_progress=on_progress, should_cancel=should_cancel)
    return [TrainedPrefix(t.user_id, method.export(t.module), t.state, t.module.config, t.metrics) for t in trained]


def prefix_method(base: BaseModel, config: PrefixConfig) -> PrefixMethod:
    """Prefix tuning for the base model's family: a decoder, or an encoder-decoder (seq2seq rows)."""
    return Seq2SeqPrefixMethod(base, config) if is_encoder_decoder(base) else PrefixMethod(base, config)


def _train_choosing_prefix_len(base, users, config, on_progress, should_cancel) -> list[TrainedPrefix]:
    """Every (user, candidate length) pair trains as its own row group in the same passes; per user,
    the candidate with the lowest validation loss wins (the lowest training loss without a split)."""
    candidates = sorted(set(config.prefix_len_candidates))
    # Each variant is its user with another prefix shape: every other field kept as it is (a field
    # dropped here once scored the reference without `reference_composed`, the population twice).
    variants = [
        replace(
            u,
            user_id=f"{u.user_id}#{n}",
            prefix=replace(config.prefix, prefix_len=n),
            resume_state=None,  # an earlier prefix's encoder state has another candidate's shape
            reference_kv=u.reference_kv if n == candidates[0] else None,  # one score is enough
        )
        for u in users
        for n in candidates
    ]
    trained = train_prefixes(
        base, variants, replace(config, prefix_len_candidates=()), on_progress=on_progress, should_cancel=should_cancel
    )
    chosen = []
    for i, user in enumerate(users):
        group = trained[i * len(candidates) : (i + 1) * len(candidates)]

        def score(t: TrainedPrefix) -> float:
            return t.metrics["val_loss"] if t.metrics["val_loss"] is not None else t.metrics["train_loss"]

        best = min(group, key=score)
        best.user_id = user.user_id
        best.metrics["reference_val_loss"] = group[0].metrics["reference_val_loss"]
        best.metrics["prefix_len_search"] = {str(t.prefix_config.prefix_len): score(t) for t in group}
        chosen.append(best)
    return chosen


def train_prefix_adaptations(base, users, config, on_progress, should_cancel) -> list[TrainedAdaptation]:
    trained = train_prefixes(base, users, config, on_progress=on_progress, should_cancel=should_cancel)
    return [
        TrainedAdaptation(
            t.user_id, PREFIX, Adaptation(kv=t.kv), {**t.metrics, "method": PREFIX}, t.state, t.prefix_config
        )
        for t in trained
    ]
