"""Derived files built once for every replica: the derived_files and derived_leases tables (models/derived.py).

Revision ID: 0006_derived
Revises: 0005_registry
Create Date: 2026-05-22

Frozen like every revision: the tables are spelled out here, not imported from models/derived.py.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006_derived"
down_revision = "0005_registry"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "derived_files",
        sa.Column("key", sa.Text(), nullable=False),
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("digest", sa.String(64), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("built_by", sa.Text(), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("key", "name", name="pk_derived_files"),
    )
    op.create_table(
        "derived_leases",
        sa.Column("key", sa.Text(), nullable=False),
        sa.Column("holder", sa.Text(), nullable=False),
        sa.Column("until", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("key", name="pk_derived_leases"),
    )


def downgrade() -> None:
    op.drop_table("derived_leases")
    op.drop_table("derived_files")
