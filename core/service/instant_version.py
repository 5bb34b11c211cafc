"""The instant version: a usable prefix seconds after onboarding, before any gradient step.

A user with no version yet gets one as soon as their first training job starts: the KV the frozen
model builds for the first tokens of their own writing (core/tuners/prefix.py's `instant_prefix`, which is
where an activations-initialised prefix starts training). It is published and activated at once,
so `user:<id>` answers with it while the job trains; the trained version then replaces it through
the usual no-worse rule (it is compared with the instant version on the same validation rows), and
the inference side picks it up on the next request, without a restart.

A job queued behind others does not wait for its turn: the embedded executor publishes its users'
instant versions as the job is submitted (`publish_for_queued_job`), and in the distributed mode an
inference worker does (core/service/instant_queue.py), so the sixteenth of sixteen users onboarded
at once answers in seconds too, not after fifteen trainings.

It is published outside the job (`job_id=None`): the registry's idempotency is per (user, job),
and the job's own trained version must not be mistaken for a retry of it. A retried job finds the
instant version active and publishes no second one.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

from core.db import Job, User, session_scope
from core.engine.data import prepare_samples
from core.engine.model import BaseModel
from core.service.context import ServiceContext
from core.service.controls import CONTROL
from core.service.hyperparameters import resolve, training_config
from core.service.jobs import add_event
from core.service.model_ids import subject_model_id
from core.service.registry import PREFIX_DTYPE, PrefixArtifacts, active_prefix, publish_prefix
from core.service.samples import user_sample_texts
from core.tuners.artifacts import Prefix, save_prefix
from core.tuners.base import TrainingConfig
from core.tuners.prefix import instant_prefix
from core.tuners.registry import PREFIX
from core.tuners.seq2seq import is_encoder_decoder

INSTANT = "instant"
"""The key that marks an instant version in a version's metrics."""
_CHECK_THEN_PUBLISH = threading.Lock()
"""A queued job's submission and a starting job may both look for users without a version; one at a
time in a process, so they do not both compute one. Across processes (an inference worker and a
training worker: core/service/instant_queue.py) the registry decides, under the user's row lock."""


def publish_instant_versions(
    ctx: ServiceContext,
    base: BaseModel,
    job_id: str,
    users: Sequence[tuple[str, str, list[str]]],
    config: TrainingConfig,
    *,
    queued: bool = False,
) -> None:
    """An instant version for each (user id, external id, samples) that has no active version yet,
    with an event on `job_id` for each one published."""
    for user_id, external_id, samples in users:
        with _CHECK_THEN_PUBLISH:
            with session_scope(ctx.session_factory) as session:
                if active_prefix(session, user_id) is not None:
                    continue
            row, seconds = _publish_one(ctx, base, user_id, samples, config)
        if row is None or row.status != "active":
            continue
        model = subject_model_id(row.base_model_id, external_id, row.version)
        then = "the job waits for its turn" if queued else "training continues"
        with session_scope(ctx.session_factory) as session:
            add_event(
                session,
                job_id,
                f"Published instant version {model} in {seconds:.2f} s (untrained; {then})",
                {"user_id": user_id, "version": row.version, "instant": True},
            )


def publish_for_queued_job(ctx: ServiceContext, job_id: str) -> None:
    """Instant versions for the users of `job_id` while it is still queued (the embedded executor
    calls this as a job is submitted). A job already started, cancelled or gone is left alone: a
    starting job publishes its own."""
    settings = ctx.settings
    if not settings.train_instant_version:
        return
    with session_scope(ctx.session_factory) as session:
        job = session.get(Job, job_id)
        if job is None or job.status != "queued" or job.cancel_requested:
            return
        hyperparameters = resolve(job.hyperparameters, settings)
        users = []
        for user_id in job.user_ids:
            user = session.get(User, user_id)
            if user is None or user.deleted_at is not None or user.kind == CONTROL:
                continue
            texts = user_sample_texts(session, user_id)
            if prepare_samples(texts):  # a job with no usable text fails when it starts
                users.append((user.id, user.external_id, texts))
    base = ctx.base_model()
    if users and not is_encoder_decoder(base):
        publish_instant_versions(ctx, base, job_id, users, training_config(hyperparameters, settings), queued=True)


def _publish_one(ctx: ServiceContext, base: BaseModel, user_id: str, samples: list[str], config: TrainingConfig):
    """Publish and activate `user_id`'s instant version if the user still has no active version.
    Returns (the version row or None, seconds it took)."""
    started = time.monotonic()
    kv = instant_prefix(base, samples, config.prefix.prefix_len)
    metrics = {INSTANT: True, "method": PREFIX, "steps": 0}
    prefix = Prefix(kv, base.model_id, base.fingerprint, {"instant": True, "prefix_len": kv.shape[3]}, metrics)
    artifacts = PrefixArtifacts(
        prefix=save_prefix(prefix, PREFIX_DTYPE),
        state=None,
        base_model_id=base.model_id,
        base_fingerprint=base.fingerprint,
        prefix_len=prefix.prefix_len,
        metrics=metrics,
    )
    row = publish_prefix(
        ctx.session_factory, ctx.store, user_id, artifacts, job_id=None, expected_active=None, only_if_none_active=True
    )
    return row, time.monotonic() - started
