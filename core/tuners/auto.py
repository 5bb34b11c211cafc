"""Method `auto`: every stored method on the job's budget; per user, the lowest validation loss."""

from __future__ import annotations

from dataclasses import replace

from core.tuners.base import TrainedAdaptation
from core.tuners.registry import AUTO, STORED_METHODS
from core.tuners.train import train_adapters


def train_auto(base, users, config, on_progress, should_cancel) -> list[TrainedAdaptation]:
    """Every method on the job's budget; per user the lowest validation loss (on the user's own
    split, the same rows for every method), the lowest training loss for a user with no split."""
    candidates = {
        method: train_adapters(
            base, users, replace(config, method=method), on_progress=on_progress, should_cancel=should_cancel
        )
        for method in STORED_METHODS
    }
    chosen = []
    for i in range(len(users)):
        options = [results[i] for results in candidates.values()]
        best = min(options, key=_selection_loss)
        best.metrics[AUTO] = {t.method: _selection_loss(t) for t in options}
        best.metrics["train_seconds"] = sum(t.metrics["train_seconds"] for t in options)
        chosen.append(best)
    return chosen


def _selection_loss(trained: TrainedAdaptation) -> float:
    metrics = trained.metrics
    return metrics["val_loss"] if metrics.get("val_loss") is not None else metrics["train_loss"]
