"""Artifact storage: one `BlobStore` interface, a local-disk and an S3 implementation."""

from core.storage.base import BlobStore, sha256_hex
from core.storage.errors import (
    BlobIntegrityError,
    BlobNotFound,
    BlobStoreError,
    BlobStoreUnavailable,
    InvalidBlobKey,
)
from core.storage.factory import make_blob_store
from core.storage.keys import (
    prefix_blob_key,
    prefix_state_key,
    user_blob_prefix,
    validate_key,
)
from core.storage.local import LocalBlobStore
from core.storage.s3 import S3BlobStore

__all__ = [
    "BlobIntegrityError",
    "BlobNotFound",
    "BlobStore",
    "BlobStoreError",
    "BlobStoreUnavailable",
    "InvalidBlobKey",
    "LocalBlobStore",
    "S3BlobStore",
    "make_blob_store",
    "prefix_blob_key",
    "prefix_state_key",
    "sha256_hex",
    "user_blob_prefix",
    "validate_key",
]
