"""Blob store on an S3-compatible server (MinIO, SeaweedFS, AWS), via the `minio` SDK."""

from __future__ import annotations

import io
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import urllib3
from minio import Minio
from minio.deleteobjects import DeleteObject
from minio.error import MinioException, S3Error

from core.storage.base import BlobStore, sha256_hex, verify_sha256
from core.storage.errors import (
    BlobIntegrityError,
    BlobNotFound,
    BlobStoreError,
    BlobStoreUnavailable,
)
from core.storage.keys import normalize_prefix, validate_key

# Object metadata holding the sha256 we computed at write time (sent as x-amz-meta-sha256).
SHA256_METADATA = "sha256"
_SHA256_HEADER = "x-amz-meta-sha256"
_CREDENTIAL_ERRORS = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"}
_DELETE_BATCH = 1000


def _http_client(secure: bool) -> urllib3.PoolManager:
    """Bounded timeouts and few retries: a dead S3 server should fail a request in seconds,
    not hang a training job or an API call (the SDK default retries for much longer)."""
    options: dict[str, object] = {
        "timeout": urllib3.Timeout(connect=5.0, read=60.0),
        "maxsize": 16,
        "retries": urllib3.Retry(total=3, backoff_factor=0.2, status_forcelist=[500, 502, 503, 504]),
    }
    if secure:
        import certifi

        options["cert_reqs"] = "CERT_REQUIRED"
        options["ca_certs"] = os.environ.get("SSL_CERT_FILE") or certifi.where()
    return urllib3.PoolManager(**options)  # type: ignore[arg-type]


class S3BlobStore(BlobStore):
    """Blobs as objects of one bucket; the key is the object name.

    The bucket is created on first use (not in the constructor), so building the store never
    needs the network and a briefly unavailable S3 server does not stop the service starting.
    """

    def __init__(
        self,
        endpoint: str,
        access_key: str | None,
        secret_key: str | None,
        bucket: str,
        secure: bool = False,
        region: str | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.bucket = bucket
        self._client = Minio(
            endpoint,
            access_key=access_key,
            secret_key=secret_key,
            secure=secure,
            region=region,
            http_client=_http_client(secure),
        )
        self._bucket_ready = False
        self._bucket_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"S3BlobStore(endpoint={self.endpoint!r}, bucket={self.bucket!r})"

    # --- error translation ---------------------------------------------------------------

    @contextmanager
    def _errors(self, key: str = "") -> Iterator[None]:
        """Turn SDK and network errors into Steer's blob store errors."""
        try:
            yield
        except BlobStoreError:
            raise
        except S3Error as exc:
            if exc.code == "NoSuchKey":
                raise BlobNotFound(f"no blob under key {key!r}") from None
            if exc.code == "NoSuchBucket":
                self._bucket_ready = False
                raise BlobStoreUnavailable(f"S3 bucket {self.bucket!r} does not exist at {self.endpoint}") from exc
            if exc.code in _CREDENTIAL_ERRORS:
                raise BlobStoreUnavailable(
                    f"S3 at {self.endpoint} refused the request ({exc.code}); check the access "
                    "key and secret key (STEER_S3_ACCESS_KEY / STEER_S3_SECRET_KEY)"
                ) from exc
            raise BlobStoreUnavailable(f"S3 error at {self.endpoint}: {exc.code}: {exc}") from exc
        except (MinioException, urllib3.exceptions.HTTPError, OSError) as exc:
            raise BlobStoreUnavailable(f"S3 at {self.endpoint} is unreachable: {exc}") from exc

    def _ensure_bucket(self) -> None:
        if self._bucket_ready:
            return
        with self._bucket_lock, self._errors():
            if self._bucket_ready:
                return
            if not self._client.bucket_exists(self.bucket):
                try:
                    self._client.make_bucket(self.bucket)
                except S3Error as exc:
                    # Another process created it between our check and our request.
                    if exc.code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                        raise
            self._bucket_ready = True

    # --- BlobStore -------------------------------------------------------------------------

    def put(self, key: str, data: bytes) -> str:
        validate_key(key)
        digest = sha256_hex(data)
        self._ensure_bucket()
        with self._errors(key):
            self._client.put_object(
                self.bucket,
                key,
                io.BytesIO(data),
                len(data),
                metadata={SHA256_METADATA: digest},
            )
        return digest

    def get(self, key: str, expected_sha256: str | None = None) -> bytes:
        validate_key(key)
        self._ensure_bucket()
        with self._errors(key):
            response = self._client.get_object(self.bucket, key)
            try:
                data = response.read()
                stored_sha256 = response.headers.get(_SHA256_HEADER)
            finally:
                response.close()
                response.release_conn()
        # The write-time checksum catches corruption even when the caller has none to give.
        if stored_sha256 and sha256_hex(data) != stored_sha256.lower():
            raise BlobIntegrityError(f"blob {key!r} does not match the sha256 recorded when it was written")
        verify_sha256(key, data, expected_sha256)
        return data

    def exists(self, key: str) -> bool:
        validate_key(key)
        self._ensure_bucket()
        try:
            with self._errors(key):
                self._client.stat_object(self.bucket, key)
        except BlobNotFound:
            return False
        return True

    def delete(self, key: str) -> None:
        validate_key(key)
        self._ensure_bucket()
        with self._errors(key):
            self._client.remove_object(self.bucket, key)

    def delete_prefix(self, prefix: str) -> int:
        keys = self.list(normalize_prefix(prefix, allow_root=False))
        with self._errors(prefix):
            for start in range(0, len(keys), _DELETE_BATCH):
                batch = [DeleteObject(key) for key in keys[start : start + _DELETE_BATCH]]
                # remove_objects is lazy: the request only happens while iterating the errors.
                failures = list(self._client.remove_objects(self.bucket, batch))
                if failures:
                    first = failures[0]
                    raise BlobStoreUnavailable(
                        f"S3 failed to delete {len(failures)} blobs under {prefix!r}, e.g. "
                        f"{first.name!r}: {first.code} {first.message}"
                    )
        return len(keys)

    def list(self, prefix: str = "") -> list[str]:
        folder = normalize_prefix(prefix, allow_root=True)
        self._ensure_bucket()
        with self._errors(prefix):
            names = [
                obj.object_name
                for obj in self._client.list_objects(self.bucket, prefix=folder or None, recursive=True)
                if obj.object_name and not obj.is_dir and not obj.object_name.endswith("/")
            ]
        return sorted(names)

    def ping(self) -> None:
        self._bucket_ready = False  # re-check for real: readiness must not trust a cache
        self._ensure_bucket()
