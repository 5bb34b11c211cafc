"""A real `steer serve` process in embedded mode on loopback, for the HTTP benchmarks
(`steer bench load`, `steer bench onboarding`): a temp data dir, its own admin key and settings."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ADMIN_KEY = "sk-steer-admin-bench"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    """`steer serve` under `data_dir` with `settings` (STEER_* variables) over the defaults; no
    `.env` file, and never the caller's database or broker."""

    def __init__(self, data_dir: Path, settings: dict[str, str]) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = data_dir / "server.log"
        env = {
            **os.environ,
            "STEER_ENV_FILE": os.devnull,
            "STEER_DATA_DIR": str(data_dir),
            "STEER_ADMIN_KEY": ADMIN_KEY,
            **settings,
        }
        env.pop("STEER_REDIS_URL", None)
        env.pop("STEER_DATABASE_URL", None)
        steer = shutil.which("steer", path=str(Path(sys.executable).parent)) or "steer"
        self._log_file = open(self.log, "wb")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            [steer, "serve", "--host", "127.0.0.1", "--port", str(self.port)],
            env=env,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
        )

    def wait_ready(self, timeout_s: float = 300.0) -> None:
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"steer serve exited: {self.log.read_text()[-2000:]}")
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise TimeoutError("steer serve did not become ready")

    def rss_bytes(self) -> int:
        import psutil

        proc = psutil.Process(self.process.pid)
        return proc.memory_info().rss + sum(c.memory_info().rss for c in proc.children(recursive=True))

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._log_file.close()
