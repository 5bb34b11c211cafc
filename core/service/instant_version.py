"""The instant version: a usable prefix seconds after onboarding, before any gradient step.

A user with no version yet gets one as soon as their first training job starts: the KV the frozen
model builds for the first tokens of their own writing (core/tuning.py's `instant_prefix`, which is
where an activations-initialised prefix starts training). It is published and activated at once,
so `user:<id>` answers with it while the job trains; the trained version then replaces it through
the usual no-worse rule (it is compared with the instant version on the same validation rows), and
the inference side picks it up on the next request, without a restart.

It is published outside the job (`job_id=None`): the registry's idempotency is per (user, job),
and the job's own trained version must not be mistaken for a retry of it. A retried job finds the
instant version active and publishes no second one.
"""

from __future__ import annotations

import time

from core.adapters import PREFIX
from core.artifacts import Prefix, save_prefix
from core.model import BaseModel
from core.service.context import ServiceContext
from core.service.registry import PrefixArtifacts, publish_prefix
from core.training import TrainingConfig
from core.tuning import instant_prefix

INSTANT = "instant"
"""The key that marks an instant version in a version's metrics."""


def publish_instant_version(
    ctx: ServiceContext, base: BaseModel, user_id: str, samples: list[str], config: TrainingConfig, dtype: str
):
    """Publish and activate `user_id`'s instant version if the user still has no active version.
    Returns (the version row or None, seconds it took)."""
    started = time.monotonic()
    kv = instant_prefix(base, samples, config.prefix.prefix_len)
    metrics = {INSTANT: True, "method": PREFIX, "steps": 0}
    prefix = Prefix(kv, base.model_id, base.fingerprint, {"instant": True, "prefix_len": kv.shape[3]}, metrics)
    artifacts = PrefixArtifacts(
        prefix=save_prefix(prefix, dtype),
        state=None,
        base_model_id=base.model_id,
        base_fingerprint=base.fingerprint,
        prefix_len=prefix.prefix_len,
        metrics=metrics,
    )
    row = publish_prefix(ctx.session_factory, ctx.store, user_id, artifacts, job_id=None, expected_active=None)
    return row, time.monotonic() - started
