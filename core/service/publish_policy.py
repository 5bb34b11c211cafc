"""What a training job publishes, and whether it may replace the user's active version.

A new version is activated only if it is no worse than the active one on the same rows, scored by
the same code in the same job, whatever method either was trained with (`no_worse`; a DPO version:
`no_worse_preferences`); else it is kept as a candidate an admin may activate.
"""

from __future__ import annotations

from typing import Any

from core.db import PrefixVersion
from core.engine.model import BaseModel
from core.service.model_ids import subject_model_id
from core.service.registry import PREFIX_DTYPE, PrefixArtifacts
from core.tuners.artifacts import Prefix, save_prefix, save_training_state
from core.tuners.base import TrainedAdaptation, TrainingConfig
from core.tuners.preference import NO_PREFERENCE_LOSS
from core.tuners.registry import PREFIX

NO_WORSE_TOLERANCE = 1e-3
"""Validation loss (nats per token) a new version may exceed the active one's by and still count as
no worse: the active version is scored as stored (float16), the new one before that rounding."""


DPO_PREFERRED_NLL_TOLERANCE = 0.10
"""How much less likely (relative, per token) a DPO version may make the user's preferred answers
than its reference does and still replace it: DPO may lower both answers' likelihood while it widens
the margin, but not the user's own text by much."""


def no_worse(metrics: dict[str, Any], active_version: int | None) -> tuple[bool, str]:
    """Whether a new version may replace the active one, and why: only if its validation loss is no
    worse than the active version's on the same rows (scored by the same code in the same job)."""
    new, old = metrics.get("val_loss"), metrics.get("active_val_loss")
    if active_version is None:
        return True, "nothing to compare with (no readable active version on this base model)"
    if new is None or old is None:
        return True, "no validation rows to compare on"
    versus = f"validation loss {new:.4f}, active v{active_version} {old:.4f} on the same rows"
    if new <= old + NO_WORSE_TOLERANCE:
        return True, versus
    return False, f"worse than the active version ({versus}); an admin may activate it"


def no_worse_preferences(metrics: dict[str, Any]) -> tuple[bool, str]:
    """A DPO version replaces the active one only if, on the user's held-out pairs, it ranks the
    preferred answers higher than its reference (the active version as served) does, and keeps the
    preferred answers' own likelihood (the user's text) within `DPO_PREFERRED_NLL_TOLERANCE`."""
    score = metrics.get("preference")
    if not score:
        return True, "no held-out preference pairs to compare on"
    versus = (
        f"held-out preference loss {score['loss']:.4f} (reference {NO_PREFERENCE_LOSS:.4f}), accuracy "
        f"{score['accuracy']:.2f}, preferred-answer loss {score['preferred_nll']:.4f} "
        f"(reference {score['reference_preferred_nll']:.4f})"
    )
    if score["loss"] >= NO_PREFERENCE_LOSS - NO_WORSE_TOLERANCE:
        return False, f"no better than its reference on held-out pairs ({versus}); an admin may activate it"
    if score["preferred_nll"] > score["reference_preferred_nll"] * (1 + DPO_PREFERRED_NLL_TOLERANCE):
        return False, f"the user's preferred answers became less likely ({versus}); an admin may activate it"
    return True, versus


def artifacts_of(
    base: BaseModel, config: TrainingConfig, result: TrainedAdaptation, metrics: dict[str, Any]
) -> PrefixArtifacts:
    """The servable artifact of any method, and a prefix's training state to continue from."""
    adaptation = result.adaptation
    prefix = Prefix(
        adaptation.kv,
        base.model_id,
        base.fingerprint,
        config.to_dict(),
        metrics,
        lora=adaptation.lora,
        method=result.method,
    )
    keeps_state = result.method == PREFIX and bool(result.state) and result.prefix_config is not None
    return PrefixArtifacts(
        prefix=save_prefix(prefix, PREFIX_DTYPE),
        state=save_training_state(result.state, result.prefix_config.to_dict(), base) if keeps_state else None,
        base_model_id=base.model_id,
        base_fingerprint=base.fingerprint,
        prefix_len=prefix.prefix_len,
        metrics=metrics,
    )


def published_entry(external_id: str, row: PrefixVersion) -> dict[str, Any]:
    model = subject_model_id(row.base_model_id, external_id, row.version)
    method = (row.metrics or {}).get("method", PREFIX)
    return {"model": model, "version": row.version, "status": row.status, "method": method, "metrics": row.metrics}
