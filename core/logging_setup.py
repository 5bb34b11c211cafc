"""One log format for every Steer process (`steer serve`, both workers, the tools).

Every line carries a timestamp, a level, the logger and the request id of the HTTP request it was
written for (`-` outside one); `STEER_LOG_FORMAT=json` writes one JSON object a line instead, for
log shippers. Progress bars (transformers, huggingface_hub, tqdm) are switched off when stderr is
not a terminal: in a container log they are thousands of carriage-return lines.
"""

from __future__ import annotations

import contextvars
import json
import logging
import os
import sys
from datetime import UTC, datetime
from typing import Any

LOG_FORMAT_VARIABLE = "STEER_LOG_FORMAT"

request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("steer_request_id", default=None)


class RequestIdFilter(logging.Filter):
    """Puts the current request id (or `-`) on every record as `record.request_id`."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = request_id.get() or "-"
        return True


class TextFormatter(logging.Formatter):
    """`2026-12-01T16:30:00.123Z INFO steer.worker.infer [req_...] message`, times in UTC. A message
    of several lines (a traceback, a migration's docstring) repeats the prefix on each line, so
    every line of the log says when, how bad and for which request."""

    def format(self, record: logging.LogRecord) -> str:
        RequestIdFilter().filter(record)
        prefix = f"{_timestamp(record)} {record.levelname} {record.name} [{record.request_id}] "
        text = record.getMessage()
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        if record.stack_info:
            text += "\n" + self.formatStack(record.stack_info)
        return "\n".join(prefix + line for line in (text.splitlines() or [""]))


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time, level, logger, request_id, message (and exc_info)."""

    def format(self, record: logging.LogRecord) -> str:
        RequestIdFilter().filter(record)
        entry: dict[str, Any] = {
            "time": _timestamp(record),
            "level": record.levelname,
            "logger": record.name,
            "request_id": record.request_id if record.request_id != "-" else None,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exc_info"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def _timestamp(record: logging.LogRecord) -> str:
    return datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def log_format() -> str:
    """`text` (default) or `json`: `STEER_LOG_FORMAT` from the environment, else from the settings'
    env file (read without failing: logging is set up before the settings are checked)."""
    value = os.environ.get(LOG_FORMAT_VARIABLE)
    if value is None:
        try:
            from core.config import get_settings

            value = get_settings().log_format
        except Exception:  # noqa: BLE001 - invalid settings are reported by the command itself
            value = "text"
    return "json" if value.strip().lower() == "json" else "text"


def make_formatter() -> logging.Formatter:
    return JsonFormatter() if log_format() == "json" else TextFormatter()


def configure_logging(level: int | str = logging.INFO) -> None:
    """Route the root logger to stderr in Steer's format (replacing its handlers) and quiet
    progress bars when stderr is not a terminal. Call it first thing in an entry point."""
    disable_progress_bars_unless_tty()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(make_formatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    logging.captureWarnings(True)  # `warnings.warn` output as log lines too (logger `py.warnings`)


def disable_progress_bars_unless_tty() -> None:
    if sys.stderr.isatty():
        return
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")  # read by tqdm itself, so every library's bars
    if "transformers" in sys.modules:  # else the variables above reach it when it is imported
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()


def uvicorn_formatters() -> dict[str, dict[str, Any]]:
    """`formatters` for uvicorn's dictConfig: uvicorn's own lines in Steer's format."""
    factory = "core.logging_setup.make_formatter"
    return {"default": {"()": factory}, "access": {"()": factory}}
