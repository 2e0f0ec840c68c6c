"""Curation runs get a fingerprint, so an identical `retrieval curate` on an unchanged index is reused.

Runs stored before this revision keep a NULL fingerprint and are never reused.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-30
"""
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: Union[str, None] = "0002"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    with op.batch_alter_table("curation_runs") as batch:
        batch.add_column(sa.Column("fingerprint", sa.String(64), nullable=True))
        batch.create_index("ix_curation_runs_fingerprint", ["fingerprint"])


def downgrade() -> None:
    with op.batch_alter_table("curation_runs") as batch:
        batch.drop_index("ix_curation_runs_fingerprint")
        batch.drop_column("fingerprint")
