"""Adapter registry: registry_adapters, registry_versions, registry_promotions, registry_generation
(models/registry_tables.py).

Revision ID: 0005_registry
Revises: 0004_monitoring
Create Date: 2026-05-22

Frozen like every revision: the tables are spelled out here, not imported from models/registry_tables.py. The one
generation row is inserted here, at 0.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005_registry"
down_revision = "0004_monitoring"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "registry_adapters",
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("last_version", sa.Integer(), nullable=False),
        sa.Column("champion", sa.Integer(), nullable=True),
        sa.Column("created_at", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("name", name="pk_registry_adapters"),
    )
    op.create_table(
        "registry_versions",
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("metadata", sa.Text(), nullable=False),
        sa.Column("manifest", sa.Text(), nullable=False),
        sa.Column("created_at", sa.Text(), nullable=False),
        sa.ForeignKeyConstraint(["name"], ["registry_adapters.name"],
                                name="fk_registry_versions_name_registry_adapters"),
        sa.PrimaryKeyConstraint("name", "version", name="pk_registry_versions"),
    )
    op.create_table(
        "registry_promotions",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("previous", sa.Integer(), nullable=True),
        sa.Column("action", sa.String(16), nullable=False),
        sa.Column("promoted_at", sa.Text(), nullable=False),
        sa.CheckConstraint("action IN ('promote', 'rollback')", name="ck_registry_promotions_action"),
        sa.ForeignKeyConstraint(["name"], ["registry_adapters.name"],
                                name="fk_registry_promotions_name_registry_adapters"),
        sa.PrimaryKeyConstraint("id", name="pk_registry_promotions"),
    )
    op.create_index("ix_registry_promotions_name_id", "registry_promotions", ["name", "id"])
    generation = op.create_table(
        "registry_generation",
        sa.Column("id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("value", sa.Integer(), nullable=False),
        sa.CheckConstraint("id = 1", name="ck_registry_generation_one_row"),
        sa.PrimaryKeyConstraint("id", name="pk_registry_generation"),
    )
    op.bulk_insert(generation, [{"id": 1, "value": 0}])


def downgrade() -> None:
    op.drop_table("registry_generation")
    op.drop_index("ix_registry_promotions_name_id", table_name="registry_promotions")
    op.drop_table("registry_promotions")
    op.drop_table("registry_versions")
    op.drop_table("registry_adapters")
