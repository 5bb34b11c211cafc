"""Relational state of the service: users, API keys, samples, prefix versions and jobs.

`models` holds the SQLAlchemy tables, `session` the engine/session helpers, `migrate` runs
the Alembic migrations in `migrations/` (the only way the schema is created outside tests).
"""

from core.db.models import (
    ApiKey,
    Base,
    Job,
    JobEvent,
    PrefixVersion,
    Sample,
    User,
    new_id,
    new_job_id,
    utcnow,
)
from core.db.session import database_now, make_engine, make_session_factory, session_scope

__all__ = [
    "ApiKey",
    "Base",
    "Job",
    "JobEvent",
    "PrefixVersion",
    "Sample",
    "User",
    "database_now",
    "make_engine",
    "make_session_factory",
    "new_id",
    "new_job_id",
    "session_scope",
    "utcnow",
]
