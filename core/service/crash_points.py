"""Test-only crash hook: lets the reliability tests SIGKILL a training worker at a named point.

    STEER_TEST_CRASH_DIR=<dir>    unset in production: every `crash_point` call returns at once

A test writes the file `<dir>/<job_id>` holding a point name ("before_first_step",
"mid_training", "after_upload"); the worker that reaches that point of that job deletes the
file and kills itself with SIGKILL (no cleanup runs: what the OOM killer or a node loss does).
The file being consumed makes the crash one-shot, so the redelivered attempt can finish. A
name ending in "!" ("after_upload!") is kept and crashes every attempt of the job. A name ending
in "@host" ("mid_training@host") kills the whole process group instead (a Celery worker's parent
and pool children: a lost host, where nothing is left to hand the job back to the broker).
"""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path

log = logging.getLogger(__name__)
CRASH_DIR_VARIABLE = "STEER_TEST_CRASH_DIR"


def crash_point(name: str, job_id: str | None) -> None:
    """SIGKILL this process if a test asked for a crash of `job_id` at point `name`."""
    directory = os.environ.get(CRASH_DIR_VARIABLE)
    if not directory or job_id is None:
        return
    plan = Path(directory) / job_id
    try:
        wanted = plan.read_text().strip()
    except OSError:
        return
    point, _, scope = wanted.rstrip("!").partition("@")
    if point != name:
        return
    if not wanted.endswith("!"):
        plan.unlink(missing_ok=True)
    if scope == "host":
        log.error("test crash hook: killing process group %d at %s of job %s", os.getpgid(0), name, job_id)
        os.killpg(os.getpgid(0), signal.SIGKILL)
    log.error("test crash hook: killing pid %d at %s of job %s", os.getpid(), name, job_id)
    os.kill(os.getpid(), signal.SIGKILL)
