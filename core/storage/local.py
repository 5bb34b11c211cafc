"""Blob store on the local file system (embedded mode, tests)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from core.storage.base import BlobStore, sha256_hex, verify_sha256
from core.storage.errors import BlobNotFound, BlobStoreUnavailable
from core.storage.keys import RESERVED_SEGMENT_PREFIX, normalize_prefix, validate_key


def _fsync_dir(path: Path) -> None:
    """Persist a directory entry change (a rename) across a power loss."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems do not support fsync on directories
    finally:
        os.close(fd)


class LocalBlobStore(BlobStore):
    """Blobs as files under `root_dir`, key `a/b/c` at `root_dir/a/b/c`."""

    def __init__(self, root_dir: str | os.PathLike[str]) -> None:
        self.root_dir = Path(root_dir).expanduser().resolve()

    def __repr__(self) -> str:
        return f"LocalBlobStore({str(self.root_dir)!r})"

    def _path(self, key: str) -> Path:
        return self.root_dir.joinpath(*validate_key(key).split("/"))

    def put(self, key: str, data: bytes) -> str:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        # Write a temp file in the same directory, then rename over the target: rename is
        # atomic within a file system, so readers never see a half-written blob.
        fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=RESERVED_SEGMENT_PREFIX)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp_name, path)
        except BaseException:
            Path(tmp_name).unlink(missing_ok=True)
            raise
        _fsync_dir(path.parent)
        return sha256_hex(data)

    def get(self, key: str, expected_sha256: str | None = None) -> bytes:
        path = self._path(key)
        try:
            data = path.read_bytes()
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            raise BlobNotFound(f"no blob under key {key!r}") from None
        verify_sha256(key, data, expected_sha256)
        return data

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def delete(self, key: str) -> None:
        path = self._path(key)
        try:
            path.unlink()
        except (FileNotFoundError, NotADirectoryError):
            return
        self._prune_empty_dirs(path.parent)

    def delete_prefix(self, prefix: str) -> int:
        keys = self.list(normalize_prefix(prefix, allow_root=False))
        for key in keys:
            self.delete(key)
        return len(keys)

    def list(self, prefix: str = "") -> list[str]:
        folder = normalize_prefix(prefix, allow_root=True)
        start = self.root_dir.joinpath(*folder.strip("/").split("/")) if folder else self.root_dir
        if not start.is_dir():
            return []
        keys = []
        for dirpath, _dirnames, filenames in os.walk(start):
            for name in filenames:
                if name.startswith(RESERVED_SEGMENT_PREFIX):
                    continue  # an in-flight or abandoned temp file, not a blob
                relative = Path(dirpath, name).relative_to(self.root_dir)
                keys.append("/".join(relative.parts))
        return sorted(keys)

    def ping(self) -> None:
        try:
            self.root_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise BlobStoreUnavailable(f"cannot create blob directory {self.root_dir}: {exc}") from exc
        if not os.access(self.root_dir, os.W_OK | os.X_OK):
            raise BlobStoreUnavailable(f"blob directory {self.root_dir} is not writable")

    def _prune_empty_dirs(self, directory: Path) -> None:
        """Remove now-empty folders up to the root, so erased users leave no trace."""
        while directory != self.root_dir and self.root_dir in directory.parents:
            try:
                directory.rmdir()
            except OSError:
                return  # not empty (or already gone): stop climbing
            directory = directory.parent
