"""Worker processes for integration tests: started in their own session with a clean STEER_* env."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def spawn(args: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen:
    """`python <args>` from the repository root with only `env`'s STEER_* settings, output to `log_path`."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("STEER_")}
    with log_path.open("ab") as log:
        return subprocess.Popen(
            [sys.executable, *args], cwd=ROOT, env={**clean, **env, "STEER_ENV_FILE": ""},
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )


def end(process: subprocess.Popen) -> None:
    """SIGTERM the process group (a Celery worker's children too), SIGKILL if it lingers."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)


def tail(log_path: Path, lines: int = 40) -> str:
    return "\n".join(log_path.read_text(errors="replace").splitlines()[-lines:])
