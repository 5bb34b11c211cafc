"""Access logs without secrets.

uvicorn's access line holds the request's path with its query string, so a key sent as
`?api_key=sk-steer-...` (clients do that, whatever the docs say; the API only reads the
`Authorization` header and answers 401) would be written to every log it reaches. The filter
here replaces the values of secret-looking query parameters, and anything shaped like a Steer key
anywhere in the path, before any handler formats the line. `steer serve` installs it through
uvicorn's logging configuration (`uvicorn_log_config`), so each worker process has it too.
"""

from __future__ import annotations

import copy
import logging
import re
from typing import Any
from urllib.parse import unquote_plus

REDACTED = "REDACTED"
# Query parameters whose value is a credential, compared lower-cased with `-` read as `_`.
SECRET_PARAMS = frozenset(
    {"api_key", "apikey", "key", "token", "access_token", "auth", "authorization", "password", "secret"}
)
_KEY_SHAPED = re.compile(r"sk-[A-Za-z0-9_-]{8,}")  # a Steer key (user or admin), wherever it appears


def redact_path(path: str) -> str:
    """`path` (with its query string) with credentials replaced by `REDACTED`."""
    base, sep, query = path.partition("?")
    base = _KEY_SHAPED.sub(REDACTED, base)
    if not sep:
        return base
    pairs = []
    for pair in query.split("&"):
        name, eq, value = pair.partition("=")
        if unquote_plus(name).strip().lower().replace("-", "_") in SECRET_PARAMS and value:
            value = REDACTED
        pairs.append(name + eq + _KEY_SHAPED.sub(REDACTED, value))
    return f"{base}?{'&'.join(pairs)}"


class RedactSecrets(logging.Filter):
    """For the `uvicorn.access` logger: its records' args are (client, method, path with query,
    HTTP version, status); the path is redacted in place."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) == 5 and isinstance(args[2], str):
            record.args = (args[0], args[1], redact_path(args[2]), args[3], args[4])
        return True


def uvicorn_log_config() -> dict[str, Any]:
    """uvicorn's default logging configuration with `RedactSecrets` on the access logger."""
    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    config.setdefault("filters", {})["redact_secrets"] = {"()": RedactSecrets}
    config["loggers"]["uvicorn.access"]["filters"] = ["redact_secrets"]
    return config
