"""The one entry point that trains a job's users with any stored or served method (core/tuners/registry.py).

Every method trains all of a job's users in shared forward/backward passes through the one loop
(core/tuners/loop.py), so each user's result equals training them alone, whatever the method. What
a user ends with is an `Adaptation` (core/engine/adaptation.py): a prefix KV, a LoRA, or both,
which a batch row carries as such.
"""

from __future__ import annotations

from collections.abc import Callable

from core.engine.model import BaseModel
from core.engine.precision import training_base
from core.errors import InvalidTrainingData
from core.tuners.base import Progress, TrainedAdaptation, TrainingConfig, UserData
from core.tuners.registry import METHODS, SERVED_METHODS


def train_adapters(
    base: BaseModel,
    users: list[UserData],
    config: TrainingConfig,
    *,
    on_progress: Callable[[Progress], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
) -> list[TrainedAdaptation]:
    """Train `config.method` for every user (in `users`' order), users sharing every pass."""
    method = METHODS.get(config.method)
    if method is None or method.trainer is None:
        raise InvalidTrainingData(f"unknown method {config.method!r}; choose from {', '.join(SERVED_METHODS)}")
    if method.decoder_only and getattr(base.model.config, "is_encoder_decoder", False):
        raise InvalidTrainingData(f"method {config.method!r} needs a decoder-only base model; use 'prefix'")
    train = method.train_function()
    return train(training_base(base, config.compute_dtype), users, config, on_progress, should_cancel)
