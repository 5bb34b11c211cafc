"""A prefix version records the population prefix version it trained on top of and is served
composed with (core/service/population.py).

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-02
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("prefix_versions") as batch:
        batch.add_column(sa.Column("population_version_id", sa.String(32), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("prefix_versions") as batch:
        batch.drop_column("population_version_id")
