"""Blob key rules and the key layout of Steer's artifacts.

Keys are `/`-separated relative paths. The same rules apply to every store, so a key that
works on local disk also works on S3 and can never escape the local root directory.
"""

from __future__ import annotations

import re

from core.storage.errors import InvalidBlobKey

MAX_KEY_LENGTH = 1024
# Temporary files of LocalBlobStore start with this; keys may not, so they never collide.
RESERVED_SEGMENT_PREFIX = ".steer-tmp-"
_USER_ID = re.compile(r"^[A-Za-z0-9_-]{1,128}$")


def validate_key(key: str) -> str:
    """Return `key` if it is a safe blob key, else raise `InvalidBlobKey`."""
    if not isinstance(key, str) or not key:
        raise InvalidBlobKey("blob key must be a non-empty string")
    if len(key) > MAX_KEY_LENGTH:
        raise InvalidBlobKey(f"blob key longer than {MAX_KEY_LENGTH} characters")
    if "\x00" in key or "\\" in key:
        raise InvalidBlobKey(f"blob key contains NUL or backslash: {key!r}")
    if key.startswith("/") or re.match(r"^[A-Za-z]:", key):
        raise InvalidBlobKey(f"blob key must be relative: {key!r}")
    for segment in key.split("/"):
        if segment in ("", ".", ".."):
            raise InvalidBlobKey(f"blob key has an empty, '.' or '..' segment: {key!r}")
        if segment.startswith(RESERVED_SEGMENT_PREFIX):
            raise InvalidBlobKey(f"blob key uses a reserved name: {key!r}")
        if any(ord(char) < 32 for char in segment):
            raise InvalidBlobKey(f"blob key contains control characters: {key!r}")
    return key


def normalize_prefix(prefix: str, *, allow_root: bool) -> str:
    """A folder-style prefix ending in `/` (or `""` for the whole store when allowed).

    Prefixes name folders, not string prefixes: `users/ab` covers `users/ab/...` but not
    `users/abc/...`, so erasing one user can never touch another.
    """
    stripped = prefix.strip("/") if isinstance(prefix, str) else prefix
    if stripped == "":
        if not allow_root:
            raise InvalidBlobKey("refusing an empty prefix: it would cover the whole store")
        return ""
    if isinstance(prefix, str) and prefix.startswith("/"):
        raise InvalidBlobKey(f"blob prefix must be relative: {prefix!r}")
    return validate_key(stripped) + "/"


def _checked_user_id(user_id: str) -> str:
    if not isinstance(user_id, str) or not _USER_ID.fullmatch(user_id):
        raise InvalidBlobKey(f"user id is not usable in a blob key: {user_id!r}")
    return user_id


def _checked_version(version: int) -> int:
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise InvalidBlobKey(f"prefix version must be a positive integer: {version!r}")
    return version


def user_blob_prefix(user_id: str) -> str:
    """The folder holding every blob of one user (what erasure deletes)."""
    return f"users/{_checked_user_id(user_id)}/"


def prefix_blob_key(user_id: str, version: int) -> str:
    """Key of a user's trained prefix tensors."""
    return f"{user_blob_prefix(user_id)}prefixes/{_checked_version(version)}.safetensors"


def prefix_state_key(user_id: str, version: int) -> str:
    """Key of the optional training-state artifact that goes with a prefix version."""
    return f"{user_blob_prefix(user_id)}prefixes/{_checked_version(version)}.state.safetensors"
