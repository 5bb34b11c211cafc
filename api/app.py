"""The FastAPI application factory.

`create_app()` builds the app for the process settings; tests pass their own `Settings` (or a
ready `ServiceContext`). Startup (lifespan) starts the background machinery of the mode:
embedded -> the in-process training executor and inference engine; distributed -> a Celery client
for `steer.train` and a Redis Streams client for the inference workers.

`app.state.ctx` is the `ServiceContext` (settings, sessions, blob store, shared base model) from
the moment the app exists. `app.state.completer` is the mode's `Completer` (set it before startup
to replace it), started and closed by the lifespan; `app.state.completions` is the
`CompletionService` the completion routes submit to.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import APIRouter, FastAPI

from api.console import install_console
from api.dispatch import JobDispatcher, make_dispatcher
from api.errors import install_error_handlers
from api.limits import BodySizeLimit
from api.metrics import make_registry
from api.openapi import V1_ERRORS, install_openapi
from api.request_id import RequestIdMiddleware
from api.routes import admin, completions, controls, feedback, files, health, jobs, onboarding, samples, users
from core.config import Settings, get_settings
from core.db.migrate import upgrade_to_head
from core.inference import metrics as inference_metrics
from core.inference.service import CompletionService, build_completer
from core.service.context import ServiceContext, build_context
from core.service.quotas import RateLimiter

log = logging.getLogger(__name__)
API_PREFIX = "/v1"


def create_app(
    settings: Settings | None = None,
    *,
    context: ServiceContext | None = None,
    dispatcher: JobDispatcher | None = None,
) -> FastAPI:
    """The Steer HTTP app for `settings` (default: the environment), or around `context`.

    `dispatcher` replaces the mode's job runner (tests record job ids instead of training)."""
    ctx = context or build_context(settings or get_settings())
    owns_context = context is None

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if ctx.settings.effective_database_url.startswith("sqlite"):
            # Embedded: no separate migration step to forget. Postgres deployments run
            # `steer migrate` (the compose `migrate` service) before the API starts.
            upgrade_to_head(ctx.settings.effective_database_url)
        app.state.dispatcher.start()
        try:
            if app.state.completer is None:
                app.state.completer = build_completer(ctx.settings, ctx.base_model, ctx.store)
            completer = app.state.completer
            settings = ctx.settings
            app.state.completions = CompletionService(
                completer,
                ctx.session_factory,
                settings.request_timeout_s,
                instant_wait_s=settings.instant_wait_s if settings.train_instant_version else 0.0,
            )
            await completer.start()
            log.info("Steer API ready (%s mode)", ctx.settings.mode)
            yield
        finally:
            if app.state.completer is not None:
                await app.state.completer.close()
            app.state.dispatcher.stop()
            if owns_context:
                ctx.close()

    app = FastAPI(
        title="Steer",
        description="Per-user personalization of a frozen language model with prefix tuning.",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.ctx = ctx
    app.state.dispatcher = dispatcher or make_dispatcher(ctx)
    app.state.metrics_registry = make_registry(ctx, getattr(app.state.dispatcher, "queue_depth", None))
    inference_metrics.register_all(app.state.metrics_registry)
    app.state.completer = None  # the mode's own, made at startup, unless set before
    app.state.rate_limiter = RateLimiter.from_settings(ctx.settings, ctx.redis())
    install_error_handlers(app)
    install_openapi(app)
    app.add_middleware(BodySizeLimit, limit=ctx.settings.max_upload_bytes)
    app.add_middleware(RequestIdMiddleware)  # outermost: every log line of a request carries its id

    v1 = APIRouter(prefix=API_PREFIX, responses=V1_ERRORS)
    for module in (onboarding, users, samples, jobs, files, controls, feedback, admin):
        v1.include_router(module.router)
    app.include_router(v1)
    app.include_router(completions.router, responses=V1_ERRORS)  # carries its own /v1 prefix
    app.include_router(health.router)
    install_console(app)  # the web console at /console/
    return app
