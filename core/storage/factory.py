"""Build the blob store the settings ask for."""

from __future__ import annotations

from core.config import Settings
from core.storage.base import BlobStore
from core.storage.local import LocalBlobStore
from core.storage.s3 import S3BlobStore


def make_blob_store(settings: Settings) -> BlobStore:
    """`LocalBlobStore` under the data directory, or `S3BlobStore` when S3 is configured."""
    if settings.effective_blob_store == "s3":
        if not settings.s3_endpoint:
            raise ValueError("STEER_BLOB_STORE=s3 needs STEER_S3_ENDPOINT")
        secret = settings.s3_secret_key.get_secret_value() if settings.s3_secret_key else None
        return S3BlobStore(
            endpoint=settings.s3_endpoint,
            access_key=settings.s3_access_key,
            secret_key=secret,
            bucket=settings.s3_bucket,
            secure=settings.s3_secure,
            region=settings.s3_region,
        )
    return LocalBlobStore(settings.local_blob_dir)
