"""Reading sample uploads: a JSON body or a multipart form with .txt/.jsonl files, size-capped."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from pydantic import BaseModel, ValidationError
from starlette.datastructures import UploadFile

from api.openapi import request_schema
from core.config import Settings
from core.service.errors import InvalidInput, PayloadTooLarge
from core.service.samples import parse_sample_file

MULTIPART = "multipart/form-data"


@dataclass
class SampleUpload:
    """The fields of a request that carries samples, however it was sent."""

    fields: dict[str, Any]
    samples: list[Any]
    source: str


async def read_body_limited(request: Request, limit: int) -> bytes:
    """The request body, refusing (413) anything over `limit` bytes without reading it all."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"request body of {declared} bytes exceeds the limit of {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"request body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    body = b"".join(chunks)
    request._body = body  # noqa: SLF001 - lets request.form() parse what we already read
    return body


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise ValueError(f"{text} is out of range")
    return value


def parse_json(body: bytes) -> Any:
    """Strict JSON (RFC 8259): no NaN/Infinity, no number that overflows a float; nesting too deep
    for the parser and invalid UTF-8 are client errors too (400), never a 500."""
    try:
        return json.loads(body, parse_constant=_refuse_constant, parse_float=_finite_float)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError, ValueError) as exc:
        reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        raise InvalidInput(f"the request body is not valid JSON: {reason}") from None


async def read_sample_upload(request: Request, settings: Settings, model: type[BaseModel]) -> SampleUpload:
    """Parse a JSON body against `model`, or a multipart form: `file` (one or more .txt/.jsonl),
    optional `samples` (JSON list), `hyperparameters` (JSON object) and other plain fields."""
    body = await read_body_limited(request, settings.max_upload_bytes)
    content_type = request.headers.get("content-type", "")
    if content_type.startswith(MULTIPART):
        return await _read_multipart(request, settings, model)
    payload = parse_json(body or b"null")
    if not isinstance(payload, dict):
        raise InvalidInput("the request body must be a JSON object")
    parsed = _validate(model, payload)
    fields = parsed.model_dump()
    return SampleUpload(fields=fields, samples=fields.pop("samples"), source="api")


async def _read_multipart(request: Request, settings: Settings, model: type[BaseModel]) -> SampleUpload:
    form = await request.form(max_files=100, max_part_size=settings.max_upload_bytes)
    samples: list[Any] = []
    fields: dict[str, Any] = {}
    files = 0
    for key, value in form.multi_items():
        if isinstance(value, UploadFile):
            data = await value.read()
            samples.extend(parse_sample_file(value.filename or "", data, settings))
            files += 1
        elif key == "samples":
            samples.extend(_json_field(key, value, list))
        elif key == "hyperparameters":
            fields[key] = _json_field(key, value, dict)
        else:
            fields[key] = value
    if files == 0 and not samples:
        raise InvalidInput("attach a .txt or .jsonl file (field 'file') or send 'samples'", param="file")
    parsed = _validate(model, {**fields, "samples": samples})
    fields = parsed.model_dump()
    return SampleUpload(fields=fields, samples=fields.pop("samples"), source="upload" if files else "api")


def _json_field(name: str, value: str, kind: type) -> Any:
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError:
        raise InvalidInput(f"form field {name!r} must be JSON", param=name) from None
    if not isinstance(parsed, kind):
        raise InvalidInput(f"form field {name!r} must be a JSON {kind.__name__}", param=name)
    return parsed


def _validate(model: type[BaseModel], payload: dict[str, Any]) -> BaseModel:
    try:
        return model.model_validate(payload)
    except ValidationError as exc:
        raise InvalidInput.from_validation(exc) from None


def upload_openapi(model: type[BaseModel], form_fields: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """`openapi_extra` documenting a body that is either JSON (`model`) or a multipart upload."""
    properties = {
        **form_fields,
        "file": {
            "type": "string",
            "format": "binary",
            "description": ".txt (one sample per blank-line separated paragraph) or .jsonl "
            '(one {"text": ...} object per line); repeatable',
        },
        "hyperparameters": {"type": "string", "description": "JSON object (optional)"},
    }
    return {
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": request_schema(model)},
                MULTIPART: {"schema": {"type": "object", "properties": properties}},
            },
        }
    }
