"""Alembic migrations of Steer's database. Run them with `core.db.migrate.upgrade_to_head`.

This is a package (not just a folder) so that `importlib` can locate it both in a source
checkout and in an installed wheel.
"""
