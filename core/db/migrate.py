"""Run the Alembic migrations without an alembic.ini: the config is built here, in code.

The `migrations` package is located with importlib, so this works from a source checkout
and from an installed wheel alike, whatever the current directory is.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine

from core.db.session import make_engine


def migrations_dir() -> Path:
    """The folder of the `migrations` package (env.py, versions/)."""
    spec = importlib.util.find_spec("migrations")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the 'migrations' package is not importable; is Steer installed?")
    return Path(next(iter(spec.submodule_search_locations)))


def make_alembic_config(database_url: str) -> Config:
    """An Alembic config for `database_url`.

    The URL travels in `config.attributes`, not in `sqlalchemy.url`, because the ini-style
    options interpolate `%` and URL-encoded passwords are full of it.
    """
    config = Config()
    config.set_main_option("script_location", str(migrations_dir()))
    config.attributes["database_url"] = database_url
    return config


def upgrade_to_head(database_url: str) -> None:
    """Bring the database at `database_url` to the newest schema (no-op when it is there)."""
    if database_url.startswith("sqlite"):
        # Creates the parent directory of the SQLite file, which Alembic would not.
        make_engine(database_url).dispose()
    command.upgrade(make_alembic_config(database_url), "head")


def head_revision() -> str | None:
    """The newest migration revision shipped with this code."""
    return ScriptDirectory.from_config(make_alembic_config("")).get_current_head()


def current_revision(engine: Engine) -> str | None:
    """The revision the database is at (None when it was never migrated)."""
    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def schema_is_current(engine: Engine) -> bool:
    """Whether the database is at the head revision; used by readiness checks."""
    return current_revision(engine) == head_revision()
