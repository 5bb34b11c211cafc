"""Errors of the service layer. Each says what the caller did wrong (or what is down), so the API
maps them to HTTP answers in one place (`api/errors.py`) and the workers know what to retry."""

from __future__ import annotations

from typing import TYPE_CHECKING

from core.errors import SteerError

if TYPE_CHECKING:
    from pydantic import ValidationError


class ServiceError(SteerError):
    """Base class of service-layer errors."""


class NotFound(ServiceError):
    """The resource does not exist, or the caller may not know that it does."""


class InvalidInput(ServiceError):
    """A request is malformed or breaks a limit; nothing was changed.

    `param` names the offending field (OpenAI's error format has a slot for it)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param

    @classmethod
    def from_validation(cls, exc: ValidationError) -> InvalidInput:
        """pydantic's first complaint, as one error naming the field (dotted path) it is about."""
        first = exc.errors()[0]
        param = ".".join(str(part) for part in first["loc"]) or None
        return cls(f"{param}: {first['msg']}" if param else first["msg"], param=param)


class PayloadTooLarge(InvalidInput):
    """An upload is larger than `STEER_MAX_UPLOAD_BYTES`."""


class StorageLimitExceeded(InvalidInput):
    """Storing this would take a key past a configured storage limit (the message names it)."""


class Unauthenticated(ServiceError):
    """No API key, or one that matches no active key."""


class PermissionDenied(ServiceError):
    """The key is valid but may not do this (a user key on an admin endpoint)."""


class Conflict(ServiceError):
    """The request contradicts the resource's state (e.g. cancelling a finished job)."""


class DispatchError(ServiceError):
    """A job could not be handed to the training workers (broker down)."""
