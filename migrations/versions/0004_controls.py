"""Control prefixes: a row of `users` may be a control (kind "control"), trained by jobs of kind "control".

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_JOB_STATUSES = "status IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')"


def _job_kind_check(kinds: str) -> None:
    condition = f"kind IN ({kinds})"
    if op.get_context().dialect.name == "sqlite":
        # SQLite cannot alter a constraint: batch mode copies the table, and the copy keeps only
        # the CHECK constraints named here (they are not reflected), so both are restated.
        with op.batch_alter_table("jobs", recreate="always") as batch:
            batch.create_check_constraint("ck_jobs_kind", condition)
            batch.create_check_constraint("ck_jobs_status", _JOB_STATUSES)
    else:
        # 0001 named it "ck_jobs_kind" and the naming convention prefixed that again.
        op.drop_constraint(op.f("ck_jobs_ck_jobs_kind"), "jobs", type_="check")
        op.create_check_constraint("ck_jobs_kind", "jobs", condition)


def upgrade() -> None:
    with op.batch_alter_table("users") as batch:
        batch.add_column(sa.Column("kind", sa.String(16), nullable=False, server_default="user"))
        batch.create_check_constraint("kind", "kind IN ('user', 'control')")
    _job_kind_check("'onboarding', 'retrain', 'admin-batch', 'control'")


def downgrade() -> None:
    op.execute("DELETE FROM jobs WHERE kind = 'control'")
    op.execute("DELETE FROM users WHERE kind = 'control'")
    _job_kind_check("'onboarding', 'retrain', 'admin-batch'")
    with op.batch_alter_table("users") as batch:
        batch.drop_constraint("kind", type_="check")
        batch.drop_column("kind")
