"""Prefix versions may be marked "corrupt" (their blob failed its checksum; never served again).

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-02
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _status_check(statuses: str) -> None:
    condition = f"status IN ({statuses})"
    # 0001 named it "ck_prefix_versions_status" and the naming convention prefixed that again.
    name = "ck_prefix_versions_status"
    if op.get_context().dialect.name == "sqlite":
        # SQLite cannot alter a constraint: batch mode copies the table (its CHECK constraints
        # are not reflected, so the copy has only the new one).
        with op.batch_alter_table("prefix_versions", recreate="always") as batch:
            batch.create_check_constraint(name, condition)
    else:
        op.drop_constraint(op.f("ck_prefix_versions_" + name), "prefix_versions", type_="check")
        op.create_check_constraint(name, "prefix_versions", condition)


def upgrade() -> None:
    _status_check("'active', 'retired', 'corrupt'")


def downgrade() -> None:
    op.execute("UPDATE prefix_versions SET status = 'retired' WHERE status = 'corrupt'")
    _status_check("'active', 'retired'")
