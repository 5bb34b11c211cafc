"""Every error answer, in OpenAI's format: `{"error": {"message", "type", "param", "code"}}`.

Typed errors from `core` map to a status and an error type here and nowhere else.

A failed dependency (5xx) is described in the service's own words (`public_message`), never with
the text of the error it raised: an S3 error body names the internal endpoint and bucket, a Redis
error the broker's address, a worker's failure whatever it caught. That text goes to the log,
where an operator needs it.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.exceptions import HTTPException as StarletteHTTPException

from core.errors import ArtifactError, InvalidRequest, InvalidTrainingData, SteerError
from core.inference.errors import DeadlineExceeded, InferenceFailed, InferenceUnavailable, QueueFull
from core.service.errors import (
    Conflict,
    DispatchError,
    InvalidInput,
    NotFound,
    PayloadTooLarge,
    PermissionDenied,
    StorageLimitExceeded,
    Unauthenticated,
)
from core.service.quotas import RateLimited
from core.storage import BlobStoreUnavailable

log = logging.getLogger(__name__)

# (exception class, HTTP status, OpenAI error type, code); first match wins, so subclasses first.
_MAPPING: list[tuple[type[Exception], int, str, str | None]] = [
    (PayloadTooLarge, 413, "invalid_request_error", "payload_too_large"),
    (StorageLimitExceeded, 400, "invalid_request_error", "storage_limit_exceeded"),
    (InvalidInput, 400, "invalid_request_error", None),
    (InvalidRequest, 400, "invalid_request_error", None),
    (InvalidTrainingData, 400, "invalid_request_error", "invalid_training_data"),
    (Unauthenticated, 401, "authentication_error", "invalid_api_key"),
    (PermissionDenied, 403, "permission_error", None),
    (NotFound, 404, "not_found_error", "not_found"),
    (Conflict, 409, "invalid_request_error", "conflict"),
    (DispatchError, 503, "service_unavailable", "queue_unavailable"),
    (BlobStoreUnavailable, 503, "service_unavailable", "store_unavailable"),
    (ArtifactError, 500, "server_error", "corrupt_artifact"),
    (QueueFull, 429, "rate_limit_error", "queue_full"),
    (RateLimited, 429, "rate_limit_error", "rate_limit_exceeded"),
    (DeadlineExceeded, 504, "server_error", "timeout"),
    (InferenceFailed, 503, "service_unavailable", "inference_failed"),
    (InferenceUnavailable, 503, "service_unavailable", "inference_unavailable"),
]
_HTTP_TYPES = {401: "authentication_error", 403: "permission_error", 404: "not_found_error"}
# What a client is told when a dependency fails (by error code); the failure's own text is logged.
_PUBLIC_MESSAGES = {
    "store_unavailable": "the blob store is unavailable; retry later",
    "queue_unavailable": "cannot queue the job: the broker is unavailable; retry later",
    "inference_unavailable": "inference is unavailable: no inference worker is running or the inference queue "
    "is down; retry later",
    "inference_failed": "the inference worker could not serve this request (it stopped, or the model's prefix "
    "could not be loaded); retry later",
}


def public_message(exc: Exception, code: str | None) -> str:
    """What a client may read about `exc` answered with `code`: a fixed sentence for a failed
    dependency (the text is logged by the caller), the exception's own text otherwise (client
    errors, and server errors whose text the service wrote: timeouts, corrupt artifacts)."""
    return _PUBLIC_MESSAGES.get(code or "", str(exc))


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_response(
    status: int,
    message: str,
    type_: str,
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    headers = dict(headers or {})
    if status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    return JSONResponse(error_body(message, type_, param, code), status_code=status, headers=headers or None)


async def _steer_error(_request: Request, exc: Exception) -> JSONResponse:
    for cls, status, type_, code in _MAPPING:
        if isinstance(exc, cls):
            retry_after = getattr(exc, "retry_after_s", None)
            headers = dict(getattr(exc, "headers", None) or {})
            if retry_after is not None:
                headers["Retry-After"] = str(retry_after)
            code = getattr(exc, "code", None) or code
            message = public_message(exc, code)
            if message != str(exc):
                log.warning("answered %d %s: %s", status, code, exc)
            return error_response(status, message, type_, getattr(exc, "param", None), code, headers)
    log.exception("unhandled Steer error", exc_info=exc)
    return error_response(500, "internal server error", "server_error")


async def _validation_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
    location = [str(part) for part in first.get("loc", ()) if part not in ("body", "query", "path")]
    param = ".".join(location) or None
    message = f"{param}: {first['msg']}" if param else str(first["msg"])
    return error_response(400, message, "invalid_request_error", param)


async def _http_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    type_ = _HTTP_TYPES.get(exc.status_code, "invalid_request_error" if exc.status_code < 500 else "server_error")
    return error_response(exc.status_code, str(exc.detail), type_)


async def _database_down(_request: Request, exc: Exception) -> JSONResponse:
    log.warning("database unavailable: %s", exc)
    return error_response(
        503, "the database is unavailable; retry later", "service_unavailable", code="database_unavailable"
    )


async def _database_busy(_request: Request, exc: Exception) -> JSONResponse:
    # Every pooled connection stayed busy for the pool's whole timeout: overload, not a bug.
    log.warning("database connection pool exhausted: %s", exc)
    return error_response(
        503,
        "the database is busy; retry later",
        "service_unavailable",
        code="database_busy",
        headers={"Retry-After": "1"},
    )


async def _unexpected(_request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error", exc_info=exc)
    return error_response(500, "internal server error", "server_error")


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(SteerError, _steer_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(OperationalError, _database_down)
    app.add_exception_handler(PoolTimeout, _database_busy)
    app.add_exception_handler(Exception, _unexpected)
