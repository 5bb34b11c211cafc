"""What the published OpenAPI schema says beyond the routes' signatures: the error answers and
the server-sent event streams.

Every error is OpenAI's `{"error": {...}}` object (see `api/errors.py`); each route declares the
statuses it can answer with, so clients (and the schemathesis fuzzer in `tests/test_fuzz_api.py`)
can rely on the schema. FastAPI's automatic 422 is removed: validation errors answer 400.

Every success answer has a schema too (`api/responses.py`, declared by each route); a test walks
the published document to keep it so. A streamed completion is documented as `text/event-stream`
next to the JSON answer: the media type's schema describes one event (as OpenAPI before 3.2 reads
it, and schemathesis checks it), whose `data` is a chunk object, an error object or `[DONE]`.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

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


# Schemas that FastAPI does not collect itself (those of the bodies that routes parse by hand,
# the models inside event streams): added to the components by `install_openapi`.
_STREAMED: list[type[BaseModel]] = []
_REQUEST_DEFS: dict[str, Any] = {}
_COMPONENT = "#/components/schemas/{model}"


def request_schema(model: type[BaseModel]) -> dict[str, Any]:
    """`model`'s JSON schema for a request body written into `openapi_extra`; the models it nests
    become components (a `$defs` left inline would be resolved against the document root)."""
    schema = model.model_json_schema(ref_template=_COMPONENT)
    _REQUEST_DEFS.update(schema.pop("$defs", {}))
    return schema


def event_stream(chunk: type[BaseModel]) -> dict[str, Any]:
    """The `text/event-stream` media type object of a stream of `chunk` objects ending `[DONE]`."""
    if chunk not in _STREAMED:
        _STREAMED.append(chunk)

    def json_of(model: str) -> dict[str, Any]:
        return {
            "type": "string",
            "contentMediaType": "application/json",
            "contentSchema": {"$ref": _COMPONENT.format(model=model)},
        }

    return {
        "schema": {
            "type": "object",
            "description": f"One server-sent event: `data:` holds a {chunk.__name__} (JSON), an "
            "ErrorResponse if generation fails mid-stream (the stream ends there), or `[DONE]`, the last event.",
            "required": ["data"],
            "properties": {
                "data": {"anyOf": [json_of(chunk.__name__), json_of(ErrorResponse.__name__), {"const": "[DONE]"}]},
            },
        }
    }


def _add_components(schema: dict[str, Any]) -> None:
    defs = dict(_REQUEST_DEFS)
    if _STREAMED:
        _, streamed = models_json_schema([(model, "serialization") for model in _STREAMED], ref_template=_COMPONENT)
        defs.update(streamed.get("$defs", {}))
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for name, definition in defs.items():
        components.setdefault(name, definition)


def install_openapi(app: FastAPI) -> None:
    """Publish the schema without FastAPI's 422 answers (ours are 400, already declared)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            for operations in schema.get("paths", {}).values():
                for operation in operations.values():
                    operation.get("responses", {}).pop("422", None)
            for unused in ("HTTPValidationError", "ValidationError"):
                schema.get("components", {}).get("schemas", {}).pop(unused, None)
            _add_components(schema)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
