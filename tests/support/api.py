"""Helpers of the API tests: settings for a temp dir, an app around a shared tiny model."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient

from api.app import create_app
from core.config import Settings
from core.engine.model import BaseModel, load_base_model
from core.service.context import build_context
from tests.support.models import model_cache_dir

ADMIN_KEY = "sk-steer-admin-test-key"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
SAMPLES = [
    "I always start my letters with a short hello and end them with a long goodbye.",
    "The weather here is grey again, but the bakery on the corner makes it worth it.",
    "My cat believes the keyboard is a bed, which explains the typos in this note.",
    "We walked along the river until the lights came on across the water.",
]


def make_settings(tmp_path: Path, **overrides: Any) -> Settings:
    """Embedded-mode settings under `tmp_path`, tiny model, training a couple of steps."""
    values: dict[str, Any] = {
        "data_dir": tmp_path / "steer",
        "base_model": "tiny",
        "device": "cpu",
        "admin_key": ADMIN_KEY,
        "train_max_steps_default": 2,
        "train_batch_size_default": 2,
        "train_prefix_len_default": 2,
        "train_max_seq_len": 64,
        # The instant version (tests/test_instant_version.py) would make every trained version v2;
        # the other tests read more plainly with the trained version first.
        "train_instant_version": False,
        # Tests that onboard many users would queue a population job ahead of theirs
        # (tests/test_api_population.py tests it).
        "population_auto_users": 0,
    }
    values.update(overrides)
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


@lru_cache(maxsize=1)
def tiny_base_model() -> BaseModel:
    """The tiny random model, loaded once per test process and shared (it is frozen)."""
    return load_base_model("tiny", device="cpu", cache_root=model_cache_dir())


class RecordingDispatcher:
    """Records submitted job ids instead of running them."""

    def __init__(self) -> None:
        self.submitted: list[str] = []

    def start(self) -> None:
        pass

    def submit(self, job_id: str) -> None:
        self.submitted.append(job_id)

    def stop(self) -> None:
        pass


@contextmanager
def api_client(settings: Settings, base: BaseModel | None = None, dispatcher: Any = None) -> Iterator[TestClient]:
    # The serving lifespan needs the base model: share one tiny model across the whole run.
    ctx = build_context(settings, base_model=base or tiny_base_model())
    app = create_app(context=ctx, dispatcher=dispatcher)
    try:
        with TestClient(app) as client:
            yield client
    finally:
        ctx.close()


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def onboard(client: TestClient, external_id: str, samples: list[str] | None = None, **extra: Any) -> dict:
    response = client.post(
        "/v1/onboarding", headers=ADMIN, json={"external_id": external_id, "samples": samples or SAMPLES, **extra}
    )
    assert response.status_code == 201, response.text
    return response.json()


def wait_for_job(client: TestClient, job_id: str, timeout: float = 120) -> dict:
    """The job once it succeeded, failed or was cancelled (polled as an admin)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/v1/fine_tuning/jobs/{job_id}", headers=ADMIN).json()
        if job["status"] in ("succeeded", "failed", "cancelled"):
            return job
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} did not finish: {job}")


@contextmanager
def served_embedded(tmp_path: Path, **settings: Any) -> Iterator[tuple[str, Any]]:
    """An embedded Steer on the tiny model, served on a loopback port: (its /v1 base URL, its
    ServiceContext, closed afterwards)."""
    from tests.support.inference import ServerThread

    ctx = build_context(make_settings(tmp_path, **settings), base_model=tiny_base_model())
    try:
        with ServerThread(create_app(context=ctx)) as server:
            yield server.base_url, ctx
    finally:
        ctx.close()
