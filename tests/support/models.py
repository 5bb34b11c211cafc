"""Where the tests find the bundled model's converted copy."""

from __future__ import annotations

from pathlib import Path

from core.config import load_settings


def model_cache_dir() -> Path:
    """The model cache this process's settings name (STEER_DATA_DIR, default ~/.steer): every
    test shares one converted copy of the bundled model, as the service's own processes do."""
    return load_settings().model_cache_dir
