"""The interface every blob store implements, and the checksum rule they share."""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod

from core.storage.errors import BlobIntegrityError


def sha256_hex(data: bytes) -> str:
    """Lowercase hex sha256 of `data` (the checksum format stored in the database)."""
    return hashlib.sha256(data).hexdigest()


def verify_sha256(key: str, data: bytes, expected_sha256: str | None) -> None:
    """Raise `BlobIntegrityError` unless `data` hashes to `expected_sha256` (None: no check)."""
    if expected_sha256 is None:
        return
    actual = sha256_hex(data)
    if actual != expected_sha256.lower():
        raise BlobIntegrityError(f"blob {key!r} is corrupted: sha256 {actual} != expected {expected_sha256}")


class BlobStore(ABC):
    """Whole-object storage of artifacts by key.

    Keys follow `core.storage.keys.validate_key`; prefixes are folder-like (see
    `normalize_prefix`). Writes are atomic: a reader sees the old bytes or the new ones, never
    a mix. Implementations must be safe to use from several threads.
    """

    @abstractmethod
    def put(self, key: str, data: bytes) -> str:
        """Store `data` under `key` (replacing any old blob) and return its sha256 hex."""

    @abstractmethod
    def get(self, key: str, expected_sha256: str | None = None) -> bytes:
        """Read a blob. Raises `BlobNotFound` if absent, `BlobIntegrityError` on mismatch."""

    @abstractmethod
    def exists(self, key: str) -> bool:
        """Whether a blob is stored under `key`."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove a blob; removing a missing blob is not an error."""

    @abstractmethod
    def delete_prefix(self, prefix: str) -> int:
        """Remove every blob under the folder `prefix` and return how many were removed."""

    @abstractmethod
    def list(self, prefix: str = "") -> list[str]:
        """Sorted keys of every blob under the folder `prefix` (`""`: the whole store)."""

    @abstractmethod
    def ping(self) -> None:
        """Check that the store is usable; raise `BlobStoreUnavailable` if not."""
