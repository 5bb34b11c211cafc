"""Learning from use: stored chat completions (opt-in, bounded in time), the feedback on them, and
users' preference pairs (from DPO training files and from feedback); all erased with their user.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _user_id(table: str) -> tuple[sa.Column, sa.ForeignKeyConstraint]:
    return (
        sa.Column("user_id", sa.String(32), nullable=False),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"], name=f"fk_{table}_user_id_users", ondelete="CASCADE"),
    )


def upgrade() -> None:
    column, foreign_key = _user_id("completions")
    op.create_table(
        "completions",
        sa.Column("id", sa.String(64), nullable=False),
        column,
        sa.Column("model", sa.String(255), nullable=False),
        sa.Column("messages", sa.JSON(), nullable=False),
        sa.Column("answers", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_completions"),
        foreign_key,
    )
    op.create_index("ix_completions_user_id", "completions", ["user_id"])
    op.create_index("ix_completions_expires_at", "completions", ["expires_at"])
    column, foreign_key = _user_id("feedback")
    op.create_table(
        "feedback",
        sa.Column("id", sa.String(32), nullable=False),
        sa.Column("completion_id", sa.String(64), nullable=False),
        column,
        sa.Column("choice_index", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("final_text", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_feedback"),
        sa.ForeignKeyConstraint(
            ["completion_id"], ["completions.id"], name="fk_feedback_completion_id_completions", ondelete="CASCADE"
        ),
        foreign_key,
        sa.UniqueConstraint("completion_id", "choice_index", name="uq_feedback_completion_id_choice_index"),
        sa.CheckConstraint("kind IN ('accepted', 'edited', 'rejected')", name="ck_feedback_kind"),
    )
    op.create_index("ix_feedback_user_id", "feedback", ["user_id"])
    column, foreign_key = _user_id("preference_pairs")
    op.create_table(
        "preference_pairs",
        sa.Column("id", sa.String(32), nullable=False),
        column,
        sa.Column("messages", sa.JSON(), nullable=False),
        sa.Column("preferred", sa.Text(), nullable=False),
        sa.Column("rejected", sa.Text(), nullable=False),
        sa.Column("source", sa.String(16), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_preference_pairs"),
        foreign_key,
        sa.CheckConstraint("source IN ('file', 'feedback')", name="ck_preference_pairs_source"),
    )
    op.create_index("ix_preference_pairs_user_id", "preference_pairs", ["user_id"])


def downgrade() -> None:
    op.drop_index("ix_preference_pairs_user_id", table_name="preference_pairs")
    op.drop_table("preference_pairs")
    op.drop_index("ix_feedback_user_id", table_name="feedback")
    op.drop_table("feedback")
    op.drop_index("ix_completions_expires_at", table_name="completions")
    op.drop_index("ix_completions_user_id", table_name="completions")
    op.drop_table("completions")
