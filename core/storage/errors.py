"""Errors of the blob stores. They subclass `SteerError` so the API maps them in one place."""

from __future__ import annotations

from core.errors import CorruptArtifact, SteerError


class BlobStoreError(SteerError):
    """Base class of blob store errors."""


class InvalidBlobKey(BlobStoreError, ValueError):
    """A key that could escape the store or is ambiguous (`..`, absolute, backslash, NUL...)."""


class BlobNotFound(BlobStoreError, KeyError):
    """No blob is stored under the key."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else "blob not found"


class BlobIntegrityError(BlobStoreError, CorruptArtifact):
    """The bytes read back do not have the expected sha256."""


class BlobStoreUnavailable(BlobStoreError):
    """The store cannot be reached or refuses us (down, wrong credentials, no permission)."""
