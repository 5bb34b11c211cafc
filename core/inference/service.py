"""Serving for a process: the engine with its prefix cache, the right `Completer`, and the
`CompletionService` that turns a caller's validated request into a running submission."""

from __future__ import annotations

import dataclasses
import logging
import time
import uuid
from collections.abc import Callable

import anyio
from anyio import to_thread
from sqlalchemy.orm import Session, sessionmaker

from core.config import Settings
from core.engine.model import BaseModel
from core.inference import catalog
from core.inference.completer import Completer, InProcessCompleter, Submission
from core.inference.engine import InferenceEngine
from core.inference.errors import CorruptPrefix, InferenceFailed
from core.inference.jobs import InferenceJob
from core.inference.metrics import PrefixCacheMetrics
from core.inference.prefix_cache import PrefixCache, PrefixRef, store_loader
from core.inference.redis_transport import RedisCompleter
from core.inference.requests import CompletionRequest
from core.service.api_keys import Caller
from core.service.jobs import has_job_in_flight
from core.service.registry import quarantine_version
from core.storage import BlobStore

log = logging.getLogger(__name__)
MAX_CORRUPT_FALLBACKS = 3
INSTANT_POLL_S = 0.1
"""How often a request for a user whose instant version is on its way looks for it again."""


def build_engine(settings: Settings, base: BaseModel, store: BlobStore) -> InferenceEngine:
    """An engine (not yet started) whose prefixes come from `store`, checked against `base`."""
    cache = PrefixCache(store_loader(store, base), settings.prefix_cache_bytes, on_change=PrefixCacheMetrics())
    return InferenceEngine(base, cache, max_batch_size=settings.max_batch_size, max_queue=settings.max_queue)


def build_completer(settings: Settings, load_base: Callable[[], BaseModel], store: BlobStore) -> Completer:
    """Embedded mode: an in-process engine. Distributed mode: jobs go to `steer worker infer` via
    Redis, and the base model is never loaded here (`load_base` is not called)."""
    if settings.redis_url is None:
        return InProcessCompleter(build_engine(settings, load_base(), store))
    return RedisCompleter(
        settings.redis_url,
        settings.max_queue,
        claim_idle_s=settings.infer_claim_idle_s,
        worker_timeout_s=settings.infer_worker_timeout_s,
    )


class CompletionService:
    """Runs validated completion requests on `completer` for callers.

    The `model` of a request is authorized for the caller and resolved to a prefix version
    (`catalog.resolve_model`) before anything is queued. A prefix whose stored bytes fail their
    checksum is never used: its version is quarantined (marked corrupt, the previous good version
    activated: `registry.quarantine_version`) and the model is resolved again, up to
    `MAX_CORRUPT_FALLBACKS` times, so `user:<id>` falls back while an explicit corrupt version
    gets a clear error. The completer's lifetime is its owner's (`start`/`close`), not this one's.

    A request for `user:<id>` that arrives before the user's first version exists, while a job for
    them is queued or running, waits up to `instant_wait_s` for the job's instant version (published
    within seconds of the job's submission: core/service/instant_version.py) instead of answering 400
    at once; 0 answers at once."""

    def __init__(
        self,
        completer: Completer,
        session_factory: sessionmaker[Session],
        request_timeout_s: float,
        instant_wait_s: float = 0.0,
    ):
        self.completer = completer
        self.session_factory = session_factory
        self.request_timeout_s = request_timeout_s
        self.instant_wait_s = instant_wait_s

    async def submit(
        self,
        caller: Caller,
        request: CompletionRequest,
        base_model_id: str,
        prefixes: list[PrefixRef] | None = None,
    ) -> Submission:
        """Queue `request` for `caller`; the submission's `job` is the one that runs. `prefixes` are
        what `resolve` gave for this request (resolved here when None).

        Raises what resolution raises (NotFound, NoTrainedPrefix, CorruptModel), what the
        completer raises (QueueFull, InvalidRequest, InferenceUnavailable, ...), or
        InferenceFailed when no intact prefix version could be loaded."""
        if prefixes is None:
            prefixes = await self.resolve(caller, request, base_model_id)
        job = request.job(prefixes, deadline=time.time() + self.request_timeout_s)
        for _ in range(MAX_CORRUPT_FALLBACKS):
            try:
                submission = await self.completer.submit(job)
                if job.prefixes:
                    await submission.wait_started()  # distributed: the worker reports a corrupt prefix
                return submission
            except CorruptPrefix as exc:
                if exc.ref is None:
                    raise
                await self._quarantine(job, exc.ref, exc)
                prefixes = await self.resolve(caller, request, base_model_id)
                job = dataclasses.replace(job, prefixes=tuple(prefixes), request_id=uuid.uuid4().hex)
        raise InferenceFailed("no intact prefix version could be loaded for this model")

    async def resolve(self, caller: Caller, request: CompletionRequest, base_model_id: str) -> list[PrefixRef]:
        """The prefixes `request.model` names for `caller` (authorization: raises NotFound, ...)."""

        def resolve() -> list[PrefixRef]:
            with self.session_factory() as session:
                return catalog.resolve_model(session, caller, request.model, base_model_id, request.controls)

        def instant_version_coming(user_id: str) -> bool:
            with self.session_factory() as session:
                return has_job_in_flight(session, user_id)

        give_up_at = time.monotonic() + self.instant_wait_s
        while True:
            try:
                return await to_thread.run_sync(resolve)
            except catalog.NoTrainedPrefix as exc:
                if exc.user_id is None or time.monotonic() >= give_up_at:
                    raise
                if not await to_thread.run_sync(instant_version_coming, exc.user_id):
                    raise
            await anyio.sleep(INSTANT_POLL_S)

    async def _quarantine(self, job: InferenceJob, ref: PrefixRef, exc: Exception) -> None:
        log.error(
            "request_id=%s: prefix v%d of %s failed verification: %s",
            job.request_id,
            ref.version,
            ref.user_id,
            exc,
        )
        await to_thread.run_sync(quarantine_version, self.session_factory, ref.user_id, ref.version, str(exc))
