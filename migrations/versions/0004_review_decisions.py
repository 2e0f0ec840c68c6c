"""Review decisions: a person's keep/remove choice for a member of a stored dedup run.

The run itself stays as computed (a historical record); a decision overrides its member's action
when the run is shown, exported or applied, so a review survives restarts and can be reset.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-30
"""
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: Union[str, None] = "0003"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    op.create_table(
        "review_decisions",
        sa.Column("member_id", sa.Integer(), sa.ForeignKey("duplicate_members.id", ondelete="CASCADE"),
                  primary_key=True),
        sa.Column("run_id", sa.Integer(), sa.ForeignKey("dedup_runs.id", ondelete="CASCADE"), nullable=False),
        sa.Column("action", sa.String(8), nullable=False),
        sa.Column("decided_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("action IN ('keep', 'remove')", name="ck_review_decisions_action"),
    )
    op.create_index("ix_review_decisions_run_id", "review_decisions", ["run_id"])


def downgrade() -> None:
    op.drop_index("ix_review_decisions_run_id", "review_decisions")
    op.drop_table("review_decisions")
