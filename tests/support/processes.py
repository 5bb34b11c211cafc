"""Worker processes for integration tests: started in their own session with a clean STEER_* env."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from core.config import Settings
from tests.support.api import ADMIN_KEY
from tests.support.models import model_cache_dir

ROOT = Path(__file__).resolve().parents[2]


def distributed_env(
    database_url: str, redis_url: str, s3_server: Any, bucket_prefix: str, **extra: str
) -> dict[str, str]:
    """STEER_* variables of a distributed deployment on the tiny model (a fresh bucket), plus `extra`."""
    return {
        "STEER_DATABASE_URL": database_url,
        "STEER_REDIS_URL": redis_url,
        **s3_server.settings_env(bucket=f"{bucket_prefix}-{uuid.uuid4().hex[:8]}"),
        "STEER_ADMIN_KEY": ADMIN_KEY,
        "STEER_BASE_MODEL": "tiny",
        "STEER_DEVICE": "cpu",
        "STEER_DATA_DIR": str(model_cache_dir().parent),  # share the converted model cache
        "OMP_NUM_THREADS": "1",  # worker processes share two cores with the test
        "STEER_TRAIN_INSTANT_VERSION": "false",  # as make_settings: trained versions come first
        # The shared database holds every test's users: a population would train in whichever test
        # crossed the threshold (tests/test_api_population.py turns it on in a database of its own).
        "STEER_POPULATION_AUTO_USERS": "0",
        **extra,
    }


def settings_from_env(env: dict[str, str]) -> Settings:
    """The Settings a process started with `env` reads (STEER_FOO=v -> foo=v)."""
    values = {
        k.removeprefix("STEER_").lower(): v for k, v in env.items() if k.startswith("STEER_") and k != "STEER_ENV_FILE"
    }
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


def spawn(args: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen:
    """`python <args>` from the repository root with only `env`'s STEER_* settings, output to `log_path`."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("STEER_")}
    with log_path.open("ab") as log:
        return subprocess.Popen(
            [sys.executable, *args],
            cwd=ROOT,
            env={**clean, **env, "STEER_ENV_FILE": ""},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def spawn_train_worker(env: dict[str, str], log_path: Path, concurrency: int = 1) -> subprocess.Popen:
    """A real `celery worker` on the `train` queue (prefork: a parent and `concurrency` children)."""
    return spawn(
        [
            "-m",
            "celery",
            "-A",
            "workers.celery_app",
            "worker",
            "--queues",
            "train",
            "--concurrency",
            str(concurrency),
            "--loglevel",
            "INFO",
            "--without-heartbeat",
            "--without-gossip",
            "--without-mingle",
        ],
        env,
        log_path,
    )


@contextmanager
def running_workers(env: dict[str, str], log_dir: Path, start_timeout_s: float = 120) -> Iterator[list[Path]]:
    """A Celery training worker and a `workers.infer` process on `env`, the inference worker
    consuming its stream; yields their logs (train, infer), ends both on exit."""
    from core.inference.redis_transport import REQUESTS_STREAM  # imports redis: only tests that spawn need it

    logs = [log_dir / "train.log", log_dir / "infer.log"]
    trainer = spawn_train_worker(env, logs[0])
    inference = spawn(["-m", "workers.infer"], env, logs[1])
    try:
        wait_for_log(inference, logs[1], "consuming " + REQUESTS_STREAM, start_timeout_s)
        yield logs
    finally:
        end(inference)
        end(trainer)


def end(process: subprocess.Popen) -> None:
    """SIGTERM the process group (a Celery worker's children too), SIGKILL if it lingers."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)


def wait_for_log(process: subprocess.Popen, log_path: Path, marker: str, timeout_s: float) -> None:
    """Wait until `marker` appears in the process's log (it is ready), failing with the log's tail if
    the process exits or `timeout_s` passes first. Importing torch and loading a model on a busy
    two-core machine (or from a fresh venv that still compiles its bytecode) takes tens of seconds."""
    deadline = time.monotonic() + timeout_s
    while marker not in log_path.read_text(errors="replace"):
        assert process.poll() is None, f"the process exited with {process.returncode}:\n{tail(log_path)}"
        assert time.monotonic() < deadline, f"no {marker!r} within {timeout_s} s:\n{tail(log_path)}"
        time.sleep(0.2)


def tail(log_path: Path, lines: int = 40) -> str:
    return "\n".join(log_path.read_text(errors="replace").splitlines()[-lines:])
