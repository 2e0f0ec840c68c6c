"""PDQ hashes and the copy embedder role's state per image.

`pdq` holds the 8 dihedral 256-bit PDQ hashes (32 bytes each, identity first), `pdq_quality` PDQ's
quality score; both stay NULL for images indexed before this revision until the copy role is
added. `copy_state`: 0 no copy vector, 1 written to vectors-copy.npy, 2 also in index-copy.faiss.

Revision ID: 0005
Revises: 0003
Create Date: 2026-11-30
"""
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: Union[str, None] = "0004"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    with op.batch_alter_table("images") as batch:
        batch.add_column(sa.Column("pdq", sa.LargeBinary(), nullable=True))
        batch.add_column(sa.Column("pdq_quality", sa.SmallInteger(), nullable=True))
        batch.add_column(sa.Column("copy_state", sa.SmallInteger(), nullable=False, server_default="0"))
        batch.create_index("ix_images_copy_state", ["copy_state"])


def downgrade() -> None:
    with op.batch_alter_table("images") as batch:
        batch.drop_index("ix_images_copy_state")
        batch.drop_column("copy_state")
        batch.drop_column("pdq_quality")
        batch.drop_column("pdq")
