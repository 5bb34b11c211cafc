"""PT-PEFT (method `pt-peft`): a prefix stage, then a LoRA stage with that prefix on every row
(kept frozen, or trained on with `TrainingConfig.pt_peft_train_prefix`)."""

from __future__ import annotations

from dataclasses import replace

from core.tuners.base import TrainedAdaptation, TrainingConfig
from core.tuners.lora import train_loras
from core.tuners.prefix_training import train_prefix_adaptations
from core.tuners.registry import PT_PEFT


def train_pt_peft(base, users, config, on_progress, should_cancel) -> list[TrainedAdaptation]:
    """Stage 1 trains prefixes on `pt_peft_prefix_share` of the budget; stage 2 a LoRA per user on
    the rest, each row carrying the user's stage-1 prefix. Both stages share passes across users."""
    share = config.pt_peft_prefix_share
    first_steps = max(1, round(config.max_steps * share))

    def part(fraction: float, steps: int) -> TrainingConfig:
        budget = None if config.time_budget_s is None else config.time_budget_s * fraction
        return replace(config, max_steps=steps, time_budget_s=budget)

    stage1 = train_prefix_adaptations(base, users, part(share, first_steps), on_progress, should_cancel)
    second = [replace(u, prefix_kv=t.adaptation.kv) for u, t in zip(users, stage1)]
    stage2 = train_loras(
        base, second, part(1 - share, max(1, config.max_steps - first_steps)), on_progress, should_cancel, PT_PEFT
    )
    for first, result in zip(stage1, stage2):
        result.metrics["prefix_stage"] = {k: first.metrics.get(k) for k in ("steps", "best_step", "val_loss")}
        result.metrics["initial_val_loss"] = first.metrics.get("initial_val_loss")
        result.metrics["base_val_loss"] = first.metrics.get("base_val_loss")
        result.metrics["train_seconds"] = first.metrics["train_seconds"] + result.metrics["train_seconds"]
        result.prefix_config = first.prefix_config
    return stage2
