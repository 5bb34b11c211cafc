"""A prefix version may be a "candidate" (trained, not activated: it scored worse than the active
version), and API keys record when they were last used.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_VERSION_POSITIVE = "version >= 1"


def _status_check(statuses: str) -> None:
    condition = f"status IN ({statuses})"
    name = "ck_prefix_versions_status"
    if op.get_context().dialect.name == "sqlite":
        # Batch mode copies the table without its (unreflected) CHECK constraints: restate both.
        with op.batch_alter_table("prefix_versions", recreate="always") as batch:
            batch.create_check_constraint(name, condition)
            batch.create_check_constraint("ck_prefix_versions_version_positive", _VERSION_POSITIVE)
    else:
        op.drop_constraint(op.f("ck_prefix_versions_" + name), "prefix_versions", type_="check")
        op.create_check_constraint(name, "prefix_versions", condition)


def upgrade() -> None:
    _status_check("'active', 'retired', 'corrupt', 'candidate'")
    with op.batch_alter_table("api_keys") as batch:
        batch.add_column(sa.Column("last_used_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("api_keys") as batch:
        batch.drop_column("last_used_at")
    op.execute("UPDATE prefix_versions SET status = 'retired' WHERE status = 'candidate'")
    _status_check("'active', 'retired', 'corrupt'")
