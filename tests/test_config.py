"""Settings: names of the environment variables, defaults, and the generated docs table."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from pydantic import SecretStr, ValidationError

from core.config import (
    Settings,
    env_var_name,
    get_settings,
    load_settings,
    settings_table_markdown,
)

# The documented names; renaming a field must be a deliberate, visible change.
DOCUMENTED_VARIABLES = {
    "STEER_DATA_DIR": "data_dir",
    "STEER_DATABASE_URL": "database_url",
    "STEER_REDIS_URL": "redis_url",
    "STEER_BLOB_STORE": "blob_store",
    "STEER_S3_ENDPOINT": "s3_endpoint",
    "STEER_S3_ACCESS_KEY": "s3_access_key",
    "STEER_S3_SECRET_KEY": "s3_secret_key",
    "STEER_S3_BUCKET": "s3_bucket",
    "STEER_S3_SECURE": "s3_secure",
    "STEER_S3_REGION": "s3_region",
    "STEER_ADMIN_KEY": "admin_key",
    "STEER_BASE_MODEL": "base_model",
    "STEER_DEVICE": "device",
    "STEER_DTYPE": "dtype",
    "STEER_MAX_SAMPLES_PER_REQUEST": "max_samples_per_request",
    "STEER_MAX_SAMPLE_CHARS": "max_sample_chars",
    "STEER_MIN_SAMPLE_CHARS": "min_sample_chars",
    "STEER_MAX_UPLOAD_BYTES": "max_upload_bytes",
    "STEER_MAX_TOTAL_SAMPLES_PER_USER": "max_total_samples_per_user",
    "STEER_MAX_BATCH_SIZE": "max_batch_size",
    "STEER_MAX_QUEUE": "max_queue",
    "STEER_REQUEST_TIMEOUT_S": "request_timeout_s",
    "STEER_PREFIX_CACHE_BYTES": "prefix_cache_bytes",
    "STEER_TRAIN_TIME_LIMIT_S": "train_time_limit_s",
    "STEER_TRAIN_MAX_STEPS_DEFAULT": "train_max_steps_default",
}


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No STEER_* from the developer's shell, and no .env from the current directory."""
    for name in list(os.environ):
        if name.startswith("STEER_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))


def test_defaults_are_embedded_mode() -> None:
    settings = load_settings()
    assert settings.mode == "embedded"
    assert settings.redis_url is None
    assert settings.data_dir == Path.home() / ".steer"
    assert settings.effective_database_url == f"sqlite:///{Path.home() / '.steer' / 'steer.db'}"
    assert settings.effective_blob_store == "local"
    assert settings.local_blob_dir == settings.data_dir / "blobs"
    assert settings.base_model == "smollm2"
    assert settings.admin_key is None
    assert (settings.max_samples_per_request, settings.max_sample_chars) == (1000, 20_000)
    assert settings.prefix_cache_bytes == 256 * 1024 * 1024


@pytest.mark.parametrize(("variable", "field"), sorted(DOCUMENTED_VARIABLES.items()))
def test_documented_variable_names_map_to_fields(variable: str, field: str) -> None:
    assert field in Settings.model_fields
    assert env_var_name(field) == variable


def test_environment_variables_are_read(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("STEER_DATA_DIR", "~/elsewhere")
    monkeypatch.setenv("STEER_DATABASE_URL", "postgresql+psycopg2://u@h/db")
    monkeypatch.setenv("STEER_REDIS_URL", "redis://127.0.0.1:6379/0")
    monkeypatch.setenv("STEER_S3_ENDPOINT", "127.0.0.1:9000")
    monkeypatch.setenv("STEER_S3_SECRET_KEY", "s3-secret-value")
    monkeypatch.setenv("STEER_S3_SECURE", "true")
    monkeypatch.setenv("STEER_ADMIN_KEY", "admin-secret-value")
    monkeypatch.setenv("STEER_MAX_BATCH_SIZE", "7")
    monkeypatch.setenv("STEER_DEVICE", "cpu")

    settings = load_settings()

    assert settings.data_dir == Path.home() / "elsewhere"
    assert settings.effective_database_url == "postgresql+psycopg2://u@h/db"
    assert settings.mode == "distributed"
    assert settings.effective_blob_store == "s3"
    assert settings.s3_secure is True
    assert settings.max_batch_size == 7
    assert settings.device == "cpu"
    assert isinstance(settings.admin_key, SecretStr)
    assert settings.admin_key.get_secret_value() == "admin-secret-value"
    # Secrets never show up in reprs (and so not in logs).
    assert "s3-secret-value" not in repr(settings)
    assert "admin-secret-value" not in repr(settings)


def test_empty_values_mean_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STEER_REDIS_URL", "")
    monkeypatch.setenv("STEER_S3_ENDPOINT", " ")
    settings = load_settings()
    assert settings.mode == "embedded"
    assert settings.effective_blob_store == "local"


def test_env_file_is_read_and_can_be_chosen(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("STEER_BASE_MODEL=tiny\nOTHER_TOOL_SETTING=1\n")
    assert load_settings().base_model == "tiny"

    other = tmp_path / "prod.env"
    other.write_text("STEER_BASE_MODEL=/models/mine\nSTEER_BLOB_STORE=local\n")
    monkeypatch.setenv("STEER_ENV_FILE", str(other))
    settings = load_settings()
    assert settings.base_model == "/models/mine"
    # Real environment variables win over the env file.
    monkeypatch.setenv("STEER_BASE_MODEL", "smollm2")
    assert load_settings().base_model == "smollm2"


def test_invalid_values_are_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STEER_BLOB_STORE", "ftp")
    with pytest.raises(ValidationError):
        load_settings()
    monkeypatch.setenv("STEER_BLOB_STORE", "auto")
    monkeypatch.setenv("STEER_MAX_QUEUE", "0")
    with pytest.raises(ValidationError):
        load_settings()


def test_explicit_blob_store_wins_over_auto() -> None:
    assert Settings(s3_endpoint="h:1", blob_store="local").effective_blob_store == "local"
    assert Settings(blob_store="s3").effective_blob_store == "s3"


def test_get_settings_is_cached(monkeypatch: pytest.MonkeyPatch) -> None:
    get_settings.cache_clear()
    try:
        first = get_settings()
        monkeypatch.setenv("STEER_BASE_MODEL", "tiny")
        assert get_settings() is first
        get_settings.cache_clear()
        assert get_settings().base_model == "tiny"
    finally:
        get_settings.cache_clear()


def test_every_field_is_described_and_listed_in_the_table() -> None:
    table = settings_table_markdown()
    rows = [line for line in table.splitlines() if line.startswith("| `STEER_")]
    assert len(rows) == len(Settings.model_fields)
    for name, field in Settings.model_fields.items():
        assert field.description, f"{name} has no description"
        assert f"| `{env_var_name(name)}` |" in table
    assert "| `STEER_S3_BUCKET` | `steer` |" in table
    assert "| `STEER_DATA_DIR` | `~/.steer` |" in table
