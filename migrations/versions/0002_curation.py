"""Curation: dedup runs, duplicate groups and members, clustering runs and assignments, curation runs.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23
"""
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: Union[str, None] = "0001"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    op.create_table(
        "dedup_runs",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("mode", sa.String(16), nullable=False),
        sa.Column("fingerprint", sa.String(64), nullable=False),
        sa.Column("params", sa.JSON(), nullable=False),
        sa.Column("counts", sa.JSON(), nullable=True),
        sa.Column("reference_failures", sa.JSON(), nullable=True),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("applied_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
    )
    op.create_index("ix_dedup_runs_fingerprint", "dedup_runs", ["fingerprint"])

    op.create_table(
        "duplicate_groups",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("run_id", sa.Integer(), sa.ForeignKey("dedup_runs.id", ondelete="CASCADE"), nullable=False),
        sa.Column("number", sa.Integer(), nullable=False),
        sa.Column("size", sa.Integer(), nullable=False),
        sa.Column("representative_id", sa.Integer(), nullable=True),
        sa.Column("reasons", sa.String(64), nullable=False),
        sa.Column("weakest_edge", sa.Float(), nullable=False),
        sa.Column("min_pairwise", sa.Float(), nullable=False),
        sa.Column("touches_reference", sa.Boolean(), nullable=False),
    )
    op.create_index("ix_duplicate_groups_run_id", "duplicate_groups", ["run_id"])

    op.create_table(
        "duplicate_members",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("group_id", sa.Integer(), sa.ForeignKey("duplicate_groups.id", ondelete="CASCADE"), nullable=False),
        sa.Column("run_id", sa.Integer(), sa.ForeignKey("dedup_runs.id", ondelete="CASCADE"), nullable=False),
        sa.Column("image_id", sa.Integer(), nullable=True),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("is_reference", sa.Boolean(), nullable=False),
        sa.Column("action", sa.String(8), nullable=False),
        sa.Column("similarity", sa.Float(), nullable=False),
        sa.Column("reason", sa.String(16), nullable=False),
    )
    op.create_index("ix_duplicate_members_group_id", "duplicate_members", ["group_id"])
    op.create_index("ix_duplicate_members_run_id", "duplicate_members", ["run_id"])
    op.create_index("ix_duplicate_members_image_id", "duplicate_members", ["image_id"])

    op.create_table(
        "cluster_runs",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("k", sa.Integer(), nullable=False),
        sa.Column("n_images", sa.Integer(), nullable=False),
        sa.Column("fingerprint", sa.String(64), nullable=False),
        sa.Column("params", sa.JSON(), nullable=False),
        sa.Column("sizes", sa.JSON(), nullable=True),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
    )
    op.create_index("ix_cluster_runs_fingerprint", "cluster_runs", ["fingerprint"])

    op.create_table(
        "cluster_assignments",
        sa.Column("run_id", sa.Integer(), sa.ForeignKey("cluster_runs.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("image_id", sa.Integer(), primary_key=True),
        sa.Column("cluster", sa.Integer(), nullable=False),
        sa.Column("distance", sa.Float(), nullable=False),
        sa.Column("rank", sa.Integer(), nullable=False),
    )

    op.create_table(
        "curation_runs",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("mode", sa.String(16), nullable=False),
        sa.Column("params", sa.JSON(), nullable=False),
        sa.Column("counts", sa.JSON(), nullable=True),
        sa.Column("query_failures", sa.JSON(), nullable=True),
        sa.Column("cluster_run_id", sa.Integer(), nullable=True),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
    )

    op.create_table(
        "curation_items",
        sa.Column("run_id", sa.Integer(), sa.ForeignKey("curation_runs.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("image_id", sa.Integer(), primary_key=True),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("how", sa.String(16), nullable=False),
        sa.Column("query", sa.Text(), nullable=True),
        sa.Column("score", sa.Float(), nullable=True),
        sa.Column("times_retrieved", sa.Integer(), nullable=False),
        sa.Column("cluster", sa.Integer(), nullable=True),
    )


def downgrade() -> None:
    op.drop_table("curation_items")
    op.drop_table("curation_runs")
    op.drop_table("cluster_assignments")
    op.drop_index("ix_cluster_runs_fingerprint", table_name="cluster_runs")
    op.drop_table("cluster_runs")
    op.drop_index("ix_duplicate_members_image_id", table_name="duplicate_members")
    op.drop_index("ix_duplicate_members_run_id", table_name="duplicate_members")
    op.drop_index("ix_duplicate_members_group_id", table_name="duplicate_members")
    op.drop_table("duplicate_members")
    op.drop_index("ix_duplicate_groups_run_id", table_name="duplicate_groups")
    op.drop_table("duplicate_groups")
    op.drop_index("ix_dedup_runs_fingerprint", table_name="dedup_runs")
    op.drop_table("dedup_runs")
