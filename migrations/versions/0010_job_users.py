"""A job's users are rows (`job_users`), not a JSON list: "the jobs of user X" becomes an indexed
lookup (it was a text match over every job's JSON), and a user's places in jobs go with the user
by ON DELETE CASCADE.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-07
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_jobs = sa.table("jobs", sa.column("id", sa.String), sa.column("user_ids", sa.JSON))
_job_users = sa.table(
    "job_users",
    sa.column("job_id", sa.String),
    sa.column("user_id", sa.String),
    sa.column("position", sa.Integer),
)


def _listed(value) -> list[str]:
    return json.loads(value) if isinstance(value, str) else list(value or [])


def upgrade() -> None:
    op.create_table(
        "job_users",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("job_id", sa.String(64), nullable=False),
        sa.Column("user_id", sa.String(32), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_job_users"),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], name="fk_job_users_job_id_jobs", ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"], name="fk_job_users_user_id_users", ondelete="CASCADE"),
    )
    op.create_index("ix_job_users_job_id", "job_users", ["job_id"])
    op.create_index("ix_job_users_user_id", "job_users", ["user_id"])
    bind = op.get_bind()
    existing = set(bind.execute(sa.text("SELECT id FROM users")).scalars())
    rows = [
        {"job_id": job_id, "user_id": user_id, "position": position}
        for job_id, user_ids in bind.execute(sa.select(_jobs.c.id, _jobs.c.user_ids))
        for position, user_id in enumerate(_listed(user_ids))
        if user_id in existing  # an erased user's leftover id has no row to point at
    ]
    if rows:
        op.bulk_insert(_job_users, rows)
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("user_ids")


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("user_ids", sa.JSON(), nullable=True))
    bind = op.get_bind()
    members: dict[str, list[str]] = {}
    query = sa.select(_job_users.c.job_id, _job_users.c.user_id).order_by(_job_users.c.job_id, _job_users.c.position)
    for job_id, user_id in bind.execute(query):
        members.setdefault(job_id, []).append(user_id)
    for job_id in bind.execute(sa.select(_jobs.c.id)).scalars():
        bind.execute(_jobs.update().where(_jobs.c.id == job_id).values(user_ids=members.get(job_id, [])))
    with op.batch_alter_table("jobs") as batch:
        batch.alter_column("user_ids", existing_type=sa.JSON(), nullable=False)
    op.drop_index("ix_job_users_user_id", table_name="job_users")
    op.drop_index("ix_job_users_job_id", table_name="job_users")
    op.drop_table("job_users")
