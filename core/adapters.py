"""Per-user adaptation by method, and the one entry point that trains any of them.

    prefix    prefix tuning (core/tuning.py's PrefixMethod)
    lora      a LoRA per user (core/tuning.py's LoRAMethod over core/lora.py's per-row deltas)
    pt-peft   Prefix-Tuned PEFT: a prefix stage, then a LoRA stage with that prefix on every row
              (kept frozen, or trained on with `TrainingConfig.pt_peft_train_prefix`)
    auto      each of the three on the job's budget; per user, the lowest validation loss

Every method trains all of a job's users in shared forward/backward passes through the one loop
(core/training.py), so each user's result equals training them alone, whatever the method. What a
user ends with is an `Adaptation`: a prefix KV, a LoRA, or both, which a batch row carries as such.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch

from core.errors import InvalidTrainingData
from core.lora import LoRAWeights
from core.model import BaseModel
from core.precision import training_base
from core.prefix import PrefixConfig
from core.training import Progress, TrainingConfig, UserData, train_prefixes, train_users
from core.tuning import LoRAMethod

PREFIX, LORA, PT_PEFT, AUTO = "prefix", "lora", "pt-peft", "auto"
METHODS = (PREFIX, LORA, PT_PEFT, AUTO)
TRAINED_METHODS = (PREFIX, LORA, PT_PEFT)
"""What an artifact can hold: `auto` resolves to one of these per user."""


@dataclass
class Adaptation:
    """What one user (or control) adds to a batch row: a prefix KV (L, 2, H, P, D), a LoRA, or both."""

    kv: torch.Tensor | None = None
    lora: LoRAWeights | None = None

    def numel(self) -> int:
        return (0 if self.kv is None else self.kv.numel()) + (0 if self.lora is None else self.lora.numel())


@dataclass
class TrainedAdaptation:
    user_id: str
    method: str
    """The method that produced `adaptation` (never 'auto')."""
    adaptation: Adaptation
    metrics: dict
    state: dict[str, torch.Tensor] = field(default_factory=dict)
    """A prefix's training state (its reparameterization) to resume from; empty for other methods."""
    prefix_config: PrefixConfig | None = None


def train_adapters(
    base: BaseModel,
    users: list[UserData],
    config: TrainingConfig,
    *,
    on_progress: Callable[[Progress], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
) -> list[TrainedAdaptation]:
    """Train `config.method` for every user (in `users`' order), users sharing every pass."""
    run = {PREFIX: _train_prefix, LORA: _train_lora, PT_PEFT: _train_pt_peft, AUTO: _train_auto}.get(config.method)
    if run is None:
        raise InvalidTrainingData(f"unknown method {config.method!r}; choose from {', '.join(METHODS)}")
    if config.method != PREFIX and getattr(base.model.config, "is_encoder_decoder", False):
        raise InvalidTrainingData(f"method {config.method!r} needs a decoder-only base model; use 'prefix'")
    return run(training_base(base, config.compute_dtype), users, config, on_progress, should_cancel)


def _train_prefix(base, users, config, on_progress, should_cancel) -> list[TrainedAdaptation]:
    trained = train_prefixes(base, users, config, on_progress=on_progress, should_cancel=should_cancel)
    return [
        TrainedAdaptation(
            t.user_id, PREFIX, Adaptation(kv=t.kv), {**t.metrics, "method": PREFIX}, t.state, t.prefix_config
        )
        for t in trained
    ]


def _train_lora(base, users, config, on_progress, should_cancel, method=LORA) -> list[TrainedAdaptation]:
    # A LoRA starts from its own initialisation: an earlier prefix's training state does not apply.
    users = [replace(u, resume_state=None, companions=None) for u in users]
    lora_method = LoRAMethod(base, config.lora, train_prefix=config.pt_peft_train_prefix)
    trained = train_users(base, lora_method, users, config, on_progress=on_progress, should_cancel=should_cancel)
    results = []
    for t in trained:
        kv, weights = lora_method.export(t.module)
        results.append(TrainedAdaptation(t.user_id, method, Adaptation(kv, weights), {**t.metrics, "method": method}))
    return results


def _train_pt_peft(base, users, config, on_progress, should_cancel) -> list[TrainedAdaptation]:
    """Stage 1 trains prefixes on `pt_peft_prefix_share` of the budget; stage 2 a LoRA per user on
    the rest, each row carrying the user's stage-1 prefix. Both stages share passes across users."""
    share = config.pt_peft_prefix_share
    first_steps = max(1, round(config.max_steps * share))

    def part(fraction: float, steps: int) -> TrainingConfig:
        budget = None if config.time_budget_s is None else config.time_budget_s * fraction
        return replace(config, max_steps=steps, time_budget_s=budget)

    stage1 = _train_prefix(base, users, part(share, first_steps), on_progress, should_cancel)
    second = [replace(u, prefix_kv=t.adaptation.kv) for u, t in zip(users, stage1)]
    stage2 = _train_lora(
        base, second, part(1 - share, max(1, config.max_steps - first_steps)), on_progress, should_cancel, PT_PEFT
    )
    for first, result in zip(stage1, stage2):
        result.metrics["prefix_stage"] = {k: first.metrics.get(k) for k in ("steps", "best_step", "val_loss")}
        result.metrics["initial_val_loss"] = first.metrics.get("initial_val_loss")
        result.metrics["base_val_loss"] = first.metrics.get("base_val_loss")
        result.metrics["train_seconds"] = first.metrics["train_seconds"] + result.metrics["train_seconds"]
        result.prefix_config = first.prefix_config
    return stage2


def _train_auto(base, users, config, on_progress, should_cancel) -> list[TrainedAdaptation]:
    """Every method on the job's budget; per user the lowest validation loss (on the user's own
    split, the same rows for every method), the lowest training loss for a user with no split."""
    candidates = {
        method: train_adapters(
            base, users, replace(config, method=method), on_progress=on_progress, should_cancel=should_cancel
        )
        for method in TRAINED_METHODS
    }
    chosen = []
    for i in range(len(users)):
        options = [results[i] for results in candidates.values()]
        best = min(options, key=_selection_loss)
        best.metrics["auto"] = {t.method: _selection_loss(t) for t in options}
        best.metrics["train_seconds"] = sum(t.metrics["train_seconds"] for t in options)
        chosen.append(best)
    return chosen


def _selection_loss(trained: TrainedAdaptation) -> float:
    metrics = trained.metrics
    return metrics["val_loss"] if metrics.get("val_loss") is not None else metrics["train_loss"]
