"""docker-compose.yml and the Dockerfile, checked without Docker (it cannot run here)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from core.config import ENV_PREFIX, Settings

ROOT = Path(__file__).resolve().parents[1]
SERVICES = {"postgres", "redis", "minio", "create-bucket", "migrate", "api", "train-worker", "infer-worker"}
LONG_RUNNING = {"postgres", "redis", "minio", "api", "train-worker", "infer-worker"}


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_every_part_of_the_deployment_is_a_service(compose):
    assert SERVICES <= set(compose["services"])


def test_long_running_services_have_health_checks_and_no_fixed_names(compose):
    for name in LONG_RUNNING:
        service = compose["services"][name]
        assert service["healthcheck"]["test"], name
        # container_name would make `--scale` impossible.
        assert "container_name" not in service, name


def test_workers_reserve_a_gpu_and_can_be_scaled(compose):
    for name in ("train-worker", "infer-worker"):
        service = compose["services"][name]
        devices = service["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
        assert "ports" not in service  # a published host port would collide when scaled


def test_stateful_services_use_named_volumes(compose):
    declared = set(compose["volumes"])
    for name in ("postgres", "redis", "minio"):
        volume = compose["services"][name]["volumes"][0].split(":")[0]
        assert volume in declared, name


def test_app_services_wait_for_the_migration_and_the_bucket(compose):
    api = compose["services"]["api"]["depends_on"]
    assert api["migrate"]["condition"] == "service_completed_successfully"
    assert api["create-bucket"]["condition"] == "service_completed_successfully"
    assert compose["services"]["migrate"]["command"] == ["steer", "migrate"]
    assert "mc mb" in " ".join(compose["services"]["create-bucket"]["command"])


def test_every_steer_variable_is_a_real_setting(compose):
    fields = {f"{ENV_PREFIX}{name.upper()}" for name in Settings.model_fields}
    used = set()
    for service in compose["services"].values():
        env = service.get("environment") or {}
        used |= {key for key in env if key.startswith(ENV_PREFIX)}
    assert used, "the app services carry STEER_* settings"
    assert used <= fields, used - fields
    for required in ("STEER_DATABASE_URL", "STEER_REDIS_URL", "STEER_S3_ENDPOINT", "STEER_ADMIN_KEY"):
        assert required in used


def test_dockerfile_installs_the_package_and_runs_steer():
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "pip install ." in dockerfile and '"steer", "serve"' in dockerfile and "HEALTHCHECK" in dockerfile
