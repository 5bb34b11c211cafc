"""Liveness, readiness and Prometheus metrics (outside /v1: they are for operators)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.concurrency import run_in_threadpool

from api import workers as worker_registry
from api.deps import ContextDep
from api.responses import Health, Readiness
from core.db.migrate import schema_is_current
from core.service.context import ServiceContext

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> Health:
    """The process is up (says nothing about its dependencies). Answered on the event loop itself,
    so its latency shows whether anything blocks the loop."""
    return Health()


@router.get(
    "/readyz",
    responses={
        200: {"model": Readiness, "description": 'Ready: every check is "ok"'},
        503: {"model": Readiness, "description": "Not ready: the failing checks"},
    },
)
async def readyz(request: Request, ctx: ContextDep) -> JSONResponse:
    """Ready to serve: database reachable and migrated, broker reachable (distributed mode),
    blob store usable. 503 with the failing checks otherwise. Also reports the inference and the
    training capacity (`inference_workers`, `training_workers`), which do not decide readiness:
    without inference workers only completions fail, without training workers jobs wait queued."""
    checks = await run_in_threadpool(_dependency_checks, request, ctx)
    completer = request.app.state.completer
    workers = None if completer is None else await completer.capacity()
    trainers = await run_in_threadpool(_training_capacity, request, ctx)
    ready = all(value == "ok" for value in checks.values())
    body = Readiness(
        status="ready" if ready else "unavailable",
        checks=checks,
        inference_workers=workers,
        training_workers=trainers,
    )
    return JSONResponse(body.model_dump(), status_code=200 if ready else 503)


def _training_capacity(request: Request, ctx: ServiceContext) -> int | None:
    if ctx.settings.mode == "embedded":
        return 1  # the in-process training executor
    try:
        return len(worker_registry.live_workers(ctx, kind="training"))
    except Exception:  # noqa: BLE001 - the broker is down: the checks say so
        return None


def _dependency_checks(request: Request, ctx: ServiceContext) -> dict[str, Any]:
    checks: dict[str, Any] = {}
    try:
        checks["database"] = "ok" if schema_is_current(ctx.engine) else "schema is not migrated: run `steer migrate`"
    except Exception as exc:  # noqa: BLE001
        checks["database"] = f"unreachable: {type(exc).__name__}: {exc}".splitlines()[0]
    dispatcher = request.app.state.dispatcher
    if hasattr(dispatcher, "ping"):
        try:
            dispatcher.ping()
            checks["broker"] = "ok"
        except Exception as exc:  # noqa: BLE001
            checks["broker"] = f"unreachable: {exc}".splitlines()[0]
    try:
        ctx.store.ping()
        checks["store"] = "ok"
    except Exception as exc:  # noqa: BLE001
        checks["store"] = f"unavailable: {exc}".splitlines()[0]
    return checks


@router.get("/metrics", response_class=PlainTextResponse)
def metrics(request: Request, ctx: ContextDep) -> Response:
    """The API's metrics and, in distributed mode, every live worker's (label `worker`)."""
    own = request.app.state.metrics_registry
    return Response(worker_registry.metrics_exposition(ctx, own), media_type=CONTENT_TYPE_LATEST)
