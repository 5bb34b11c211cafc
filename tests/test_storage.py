"""One behavioural suite for every blob store: local disk and a real S3 server (SeaweedFS)."""

from __future__ import annotations

import hashlib
import io
import os
import socket
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from core.config import Settings
from core.errors import CorruptArtifact
from core.storage import (
    BlobIntegrityError,
    BlobNotFound,
    BlobStore,
    BlobStoreUnavailable,
    InvalidBlobKey,
    LocalBlobStore,
    S3BlobStore,
    make_blob_store,
    prefix_blob_key,
    prefix_state_key,
    user_blob_prefix,
)
from tests.support.seaweed import SeaweedServer

# A way to overwrite a stored blob behind the store's back (simulated bit rot / tampering).
Tamper = Callable[[str, bytes], None]


def _unique_bucket() -> str:
    return f"t-{uuid.uuid4().hex[:16]}"


@pytest.fixture(
    params=["local", pytest.param("s3", marks=pytest.mark.integration)],
)
def store_and_tamper(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[BlobStore, Tamper]:
    if request.param == "local":
        local = LocalBlobStore(tmp_path / "blobs")

        def tamper_local(key: str, data: bytes) -> None:
            (local.root_dir / key).write_bytes(data)

        return local, tamper_local

    server: SeaweedServer = request.getfixturevalue("s3_server")
    bucket = _unique_bucket()  # one bucket per test: no test sees another's blobs
    s3 = S3BlobStore(server.endpoint, server.access_key, server.secret_key, bucket)
    raw = server.minio_client()

    def tamper_s3(key: str, data: bytes) -> None:
        raw.put_object(bucket, key, io.BytesIO(data), len(data))

    return s3, tamper_s3


@pytest.fixture
def store(store_and_tamper: tuple[BlobStore, Tamper]) -> BlobStore:
    return store_and_tamper[0]


def test_put_get_round_trip_returns_sha256(store: BlobStore) -> None:
    data = os.urandom(70_000)
    key = prefix_blob_key("u1", 1)
    digest = store.put(key, data)
    assert digest == hashlib.sha256(data).hexdigest()
    assert store.get(key) == data
    assert store.get(key, expected_sha256=digest) == data
    assert store.get(key, expected_sha256=digest.upper()) == data
    assert store.exists(key)


def test_put_replaces_and_empty_blob_round_trips(store: BlobStore) -> None:
    store.put("a/b.bin", b"old")
    digest = store.put("a/b.bin", b"")
    assert store.get("a/b.bin", expected_sha256=digest) == b""
    assert store.list("a") == ["a/b.bin"]


def test_corruption_is_detected(store_and_tamper: tuple[BlobStore, Tamper]) -> None:
    store, tamper = store_and_tamper
    key = prefix_state_key("u1", 2)
    digest = store.put(key, b"the real tensors")
    tamper(key, b"something else entirely")
    with pytest.raises(BlobIntegrityError) as excinfo:
        store.get(key, expected_sha256=digest)
    # The API maps CorruptArtifact; a corrupted blob must be one.
    assert isinstance(excinfo.value, CorruptArtifact)


def test_missing_key_raises_blob_not_found(store: BlobStore) -> None:
    with pytest.raises(BlobNotFound):
        store.get("users/nobody/prefixes/1.safetensors")
    assert not store.exists("users/nobody/prefixes/1.safetensors")
    store.delete("users/nobody/prefixes/1.safetensors")  # deleting nothing is fine


def test_delete_removes_one_blob(store: BlobStore) -> None:
    store.put("x/1", b"1")
    store.put("x/2", b"2")
    store.delete("x/1")
    assert store.list("x") == ["x/2"]
    with pytest.raises(BlobNotFound):
        store.get("x/1")


def test_delete_prefix_removes_everything_of_one_user_only(store: BlobStore) -> None:
    for version in (1, 2):
        store.put(prefix_blob_key("u1", version), b"p")
        store.put(prefix_state_key("u1", version), b"s")
    store.put("users/u1/other/deep/file.bin", b"d")
    # "u10" shares a string prefix with "u1": it must survive erasing u1.
    store.put(prefix_blob_key("u10", 1), b"keep")
    store.put(prefix_blob_key("u2", 1), b"keep")

    removed = store.delete_prefix(user_blob_prefix("u1"))

    assert removed == 5
    assert store.list(user_blob_prefix("u1")) == []
    assert store.list("users") == [prefix_blob_key("u10", 1), prefix_blob_key("u2", 1)]
    assert store.delete_prefix("users/u1") == 0


def test_list_is_sorted_and_scoped(store: BlobStore) -> None:
    for key in ("b/2", "a/1", "b/1", "bb/1"):
        store.put(key, key.encode())
    assert store.list() == ["a/1", "b/1", "b/2", "bb/1"]
    assert store.list("b") == ["b/1", "b/2"]
    assert store.list("b/") == ["b/1", "b/2"]
    assert store.list("nothing-here") == []


@pytest.mark.parametrize(
    "bad_key",
    [
        "",
        "../escape",
        "a/../../escape",
        "/absolute",
        "C:/windows",
        "a\\b",
        "a\x00b",
        "a//b",
        "a/./b",
        "trailing/",
        ".steer-tmp-abc",
        "a\nb",
    ],
)
def test_invalid_keys_are_rejected(store: BlobStore, bad_key: str) -> None:
    with pytest.raises(InvalidBlobKey):
        store.put(bad_key, b"x")
    with pytest.raises(InvalidBlobKey):
        store.get(bad_key)
    with pytest.raises(InvalidBlobKey):
        store.exists(bad_key)
    with pytest.raises(InvalidBlobKey):
        store.delete(bad_key)


@pytest.mark.parametrize("bad_prefix", ["", "/", "../x", "/abs"])
def test_delete_prefix_refuses_root_and_unsafe_prefixes(store: BlobStore, bad_prefix: str) -> None:
    store.put("keep/me", b"1")
    with pytest.raises(InvalidBlobKey):
        store.delete_prefix(bad_prefix)
    assert store.exists("keep/me")


def test_ping_succeeds(store: BlobStore) -> None:
    store.ping()


# --- local-only behaviour ---------------------------------------------------------------------


def test_local_writes_leave_no_temp_files_and_prune_empty_dirs(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path)
    store.put("users/u1/prefixes/1.safetensors", b"abc")
    assert [p.name for p in (tmp_path / "users/u1/prefixes").iterdir()] == ["1.safetensors"]
    store.delete_prefix("users/u1")
    assert not (tmp_path / "users").exists()


def test_local_list_ignores_abandoned_temp_files(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path)
    store.put("a/b", b"1")
    (tmp_path / "a" / ".steer-tmp-crashed").write_bytes(b"half")
    assert store.list() == ["a/b"]


# --- S3-only behaviour ------------------------------------------------------------------------


@pytest.mark.integration
def test_s3_detects_corruption_without_expected_sha(s3_server: SeaweedServer) -> None:
    bucket = _unique_bucket()
    store = S3BlobStore(s3_server.endpoint, s3_server.access_key, s3_server.secret_key, bucket)
    digest = store.put("k/v", b"original")
    assert s3_server.minio_client().stat_object(bucket, "k/v").metadata.get("x-amz-meta-sha256") == digest
    # Different bytes that still claim the original checksum in their metadata.
    s3_server.minio_client().put_object(bucket, "k/v", io.BytesIO(b"tampered"), 8, metadata={"sha256": digest})
    with pytest.raises(BlobIntegrityError):
        store.get("k/v")


@pytest.mark.integration
def test_s3_wrong_credentials_fail_clearly(s3_server: SeaweedServer) -> None:
    store = S3BlobStore(s3_server.endpoint, s3_server.access_key, "not-the-secret", "steer")
    with pytest.raises(BlobStoreUnavailable, match="access key and secret key"):
        store.ping()
    with pytest.raises(BlobStoreUnavailable, match="refused"):
        store.put("a/b", b"x")
    unknown = S3BlobStore(s3_server.endpoint, "nobody", "nothing", "steer")
    with pytest.raises(BlobStoreUnavailable, match="refused"):
        unknown.ping()


@pytest.mark.integration
def test_s3_unreachable_server_fails_fast() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, never listening: connections are refused
        store = S3BlobStore(f"127.0.0.1:{port}", "a", "b", "steer")
        with pytest.raises(BlobStoreUnavailable, match="unreachable"):
            store.ping()


@pytest.mark.integration
def test_s3_creates_missing_bucket(s3_server: SeaweedServer) -> None:
    bucket = _unique_bucket()
    client = s3_server.minio_client()
    assert not client.bucket_exists(bucket)
    S3BlobStore(s3_server.endpoint, s3_server.access_key, s3_server.secret_key, bucket).ping()
    assert client.bucket_exists(bucket)


# --- keys and factory -------------------------------------------------------------------------


def test_key_layout() -> None:
    assert prefix_blob_key("abc123", 3) == "users/abc123/prefixes/3.safetensors"
    assert prefix_state_key("abc123", 3) == "users/abc123/prefixes/3.state.safetensors"
    assert user_blob_prefix("abc123") == "users/abc123/"
    for bad_user in ("", "a/b", "..", "a b"):
        with pytest.raises(InvalidBlobKey):
            prefix_blob_key(bad_user, 1)
    for bad_version in (0, -1, True):
        with pytest.raises(InvalidBlobKey):
            prefix_blob_key("u", bad_version)


def test_factory_picks_local_without_endpoint(tmp_path: Path) -> None:
    store = make_blob_store(Settings(data_dir=tmp_path))
    assert isinstance(store, LocalBlobStore)
    assert store.root_dir == (tmp_path / "blobs").resolve()


def test_factory_picks_s3_with_endpoint(tmp_path: Path) -> None:
    settings = Settings(
        data_dir=tmp_path,
        s3_endpoint="127.0.0.1:1",
        s3_access_key="a",
        s3_secret_key="b",
        s3_bucket="bkt",
    )
    store = make_blob_store(settings)
    assert isinstance(store, S3BlobStore)
    assert store.bucket == "bkt"
    forced_local = make_blob_store(settings.model_copy(update={"blob_store": "local"}))
    assert isinstance(forced_local, LocalBlobStore)


@pytest.mark.integration
def test_s3_outage_is_reported_and_blobs_survive_a_restart(s3_server: SeaweedServer) -> None:
    bucket = _unique_bucket()
    store = S3BlobStore(s3_server.endpoint, s3_server.access_key, s3_server.secret_key, bucket)
    digest = store.put("users/u1/prefixes/1.safetensors", b"survives")
    s3_server.stop()
    try:
        with pytest.raises(BlobStoreUnavailable):
            store.get("users/u1/prefixes/1.safetensors")
    finally:
        s3_server.start()  # same ports, same data: the session fixture stays usable
    assert store.get("users/u1/prefixes/1.safetensors", expected_sha256=digest) == b"survives"
