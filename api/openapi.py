"""What the published OpenAPI schema says beyond the routes' signatures: the error answers.

Every error is OpenAI's `{"error": {...}}` object (see `api/errors.py`); each route declares the
statuses it can answer with, so clients (and the schemathesis fuzzer in `tests/test_fuzz_api.py`)
can rely on the schema. FastAPI's automatic 422 is removed: validation errors answer 400.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

_DESCRIPTIONS = {
    400: "Invalid request (the parameter at fault is in `error.param`); nothing was changed",
    401: "Missing or invalid API key",
    403: "The key is valid but may not do this (a user key on an admin endpoint)",
    404: "No such resource, or it belongs to another user",
    409: "The request contradicts the resource's state",
    413: "Request body too large",
    429: "The inference queue is full; retry after `Retry-After` seconds",
    503: "A dependency (database, broker, blob store, inference) is unavailable; retry later",
    504: "The request did not finish within its deadline",
}


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    error: ErrorDetail


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """`responses=` for a route or router that can answer with these error statuses."""
    return {status: {"model": ErrorResponse, "description": _DESCRIPTIONS[status]} for status in statuses}


# Any authenticated /v1 route: bad parameters, bad key, unknown id, a dependency down.
V1_ERRORS = errors(400, 401, 404, 503)
ADMIN_ERRORS = errors(403)
BODY_ERRORS = errors(413)


def install_openapi(app: FastAPI) -> None:
    """Publish the schema without FastAPI's 422 answers (ours are 400, already declared)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title, version=app.version, description=app.description, routes=app.routes
            )
            for operations in schema.get("paths", {}).values():
                for operation in operations.values():
                    operation.get("responses", {}).pop("422", None)
            for unused in ("HTTPValidationError", "ValidationError"):
                schema.get("components", {}).get("schemas", {}).pop(unused, None)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
