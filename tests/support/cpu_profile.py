"""Where the suite's time goes, by test: wall seconds and how many of the machine's cores were busy
meanwhile (from /proc/stat, so the worker processes a test spawns count too). A test with a long
wall time and few busy cores is waiting (a lease, a timeout, a restart): such tests belong to the
service lane, which runs beside the compute lane (scripts/test.sh, tests/conftest.py `COMPUTE_LANE`).

On with `STEER_TEST_PROFILE=<file>`: one JSON line per test appended to the file."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest


def _busy_and_total_jiffies() -> tuple[int, int]:
    with open("/proc/stat") as stat:
        fields = [int(v) for v in stat.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields) - idle, sum(fields)


class CpuProfile:
    def __init__(self, path: Path) -> None:
        self.path = path

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_protocol(self, item, nextitem):
        busy_before, total_before = _busy_and_total_jiffies()
        started = time.monotonic()
        yield
        wall = time.monotonic() - started
        busy_after, total_after = _busy_and_total_jiffies()
        share = (busy_after - busy_before) / max(total_after - total_before, 1)
        line = {"test": item.nodeid, "wall_s": round(wall, 2), "busy_cores": round(share * (os.cpu_count() or 1), 2)}
        with self.path.open("a") as out:
            out.write(json.dumps(line) + "\n")


def register(config: pytest.Config) -> None:
    target = os.environ.get("STEER_TEST_PROFILE")
    if target and Path("/proc/stat").exists():
        config.pluginmanager.register(CpuProfile(Path(target)), "steer-cpu-profile")
