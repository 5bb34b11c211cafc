"""Typed failures of serving; `api/` turns each into one HTTP answer."""

from core.errors import SteerError


class QueueFull(SteerError):
    """The admission queue is full: try again later (HTTP 429 with Retry-After)."""

    def __init__(self, message: str = "the inference queue is full, retry later", retry_after_s: int = 1):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class DeadlineExceeded(SteerError):
    """The request did not finish within its deadline."""


class InferenceFailed(SteerError):
    """The request could not be completed (its worker died, its prefix could not be loaded, ...)."""


class InferenceUnavailable(SteerError):
    """The inference queue (Redis, distributed mode) cannot be reached: nothing was queued (HTTP 503)."""


class CorruptPrefix(InferenceFailed):
    """A requested prefix's stored bytes failed their checksum; nothing was generated with it.
    `ref` is that prefix (a `PrefixRef`) when known."""

    def __init__(self, message: str, ref=None):
        super().__init__(message)
        self.ref = ref
