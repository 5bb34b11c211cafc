"""The admin key: from `STEER_ADMIN_KEY`, or, in embedded mode without it, generated once.

A generated key is printed once by `steer serve` and only its sha256 is kept, in
`{data_dir}/admin_key.sha256`, so restarts keep accepting it. Lost it? `steer admin-key --reset`
prints a new one and forgets the old.
"""

from __future__ import annotations

import os
from pathlib import Path

from core.config import Settings
from core.service.api_keys import generate_key, hash_key

ADMIN_KEY_FILE = "admin_key.sha256"


def admin_key_file(settings: Settings) -> Path:
    return settings.data_dir / ADMIN_KEY_FILE


def admin_key_hashes(settings: Settings) -> frozenset[str]:
    """Hashes of the keys that authorize admin calls (empty: admin endpoints disabled).

    An explicit `STEER_ADMIN_KEY` wins; the stored embedded key is only used without it, so
    setting the variable always takes effect.
    """
    if settings.admin_key is not None and settings.admin_key.get_secret_value():
        return frozenset({hash_key(settings.admin_key.get_secret_value())})
    if settings.mode == "embedded":
        path = admin_key_file(settings)
        if path.is_file():
            stored = path.read_text().strip()
            if stored:
                return frozenset({stored})
    return frozenset()


def ensure_embedded_admin_key(settings: Settings, *, reset: bool = False) -> str | None:
    """Generate and store an admin key if none is configured; return it (the only time it is
    visible), or None when `STEER_ADMIN_KEY` is set or a key was stored before."""
    if settings.admin_key is not None and settings.admin_key.get_secret_value():
        return None
    path = admin_key_file(settings)
    if path.is_file() and not reset:
        return None
    key = generate_key(admin=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    # Owner-only: the hash is not the key, but there is no reason to share it.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(hash_key(key) + "\n")
    os.replace(tmp, path)
    return key
