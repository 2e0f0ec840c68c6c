"""Sources beyond a local folder: an object's ETag (images, failures) and the metadata a list or shard keeps.

Local folders leave both NULL, so an index made before this revision behaves as before.

Revision ID: 0006
Revises: 0003
Create Date: 2026-11-30
"""
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: Union[str, None] = "0005"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    with op.batch_alter_table("images") as batch:
        batch.add_column(sa.Column("etag", sa.String(128), nullable=True))
        batch.add_column(sa.Column("extra", sa.JSON(), nullable=True))
    with op.batch_alter_table("failures") as batch:
        batch.add_column(sa.Column("etag", sa.String(128), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("failures") as batch:
        batch.drop_column("etag")
    with op.batch_alter_table("images") as batch:
        batch.drop_column("extra")
        batch.drop_column("etag")
