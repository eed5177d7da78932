"""Drift monitoring: the capture_records, drift_checks and drift_leases tables (monitoring/tables.py).

Revision ID: 0004_monitoring
Revises: 0001_baseline
Create Date: 2026-05-21

Frozen like every revision: the tables are spelled out here, not imported from monitoring/tables.py.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004_monitoring"
down_revision = "0003_labels"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "capture_records",
        sa.Column("seq", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False),
        sa.Column("prediction_id", sa.Text(), nullable=False),
        sa.Column("adapter", sa.Text(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("predicted", sa.Integer(), nullable=False),
        sa.Column("label", sa.Text(), nullable=False),
        sa.Column("confidence", sa.Float(), nullable=False),
        sa.Column("entropy", sa.Float(), nullable=False),
        sa.Column("stats", sa.LargeBinary(), nullable=False),
        sa.Column("emb_dtype", sa.String(2), nullable=False),
        sa.Column("embedding", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint("seq", name="pk_capture_records"),
        sa.UniqueConstraint("prediction_id", name="uq_capture_records_prediction_id"),
    )
    op.create_index("ix_capture_records_adapter_time", "capture_records", ["adapter", "created_at"])
    op.create_table(
        "drift_checks",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("adapter", sa.Text(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("checked_at", sa.Float(), nullable=False),
        sa.Column("drift", sa.Boolean(create_constraint=False), nullable=False),
        sa.Column("score", sa.Float(), nullable=False),
        sa.Column("threshold", sa.Float(), nullable=False),
        sa.Column("p_value", sa.Float(), nullable=False),
        sa.Column("window_size", sa.Integer(), nullable=False),
        sa.Column("features", sa.Text(), nullable=False),
        sa.Column("report", sa.Text(), nullable=True),
        sa.Column("mean_confidence", sa.Float(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_drift_checks"),
    )
    op.create_index("ix_drift_checks_adapter_id", "drift_checks", ["adapter", "id"])
    op.create_table(
        "drift_leases",
        sa.Column("adapter", sa.String(64), nullable=False),
        sa.Column("holder", sa.Text(), nullable=False),
        sa.Column("until", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("adapter", name="pk_drift_leases"),
    )


def downgrade() -> None:
    op.drop_table("drift_leases")
    op.drop_index("ix_drift_checks_adapter_id", table_name="drift_checks")
    op.drop_table("drift_checks")
    op.drop_index("ix_capture_records_adapter_time", table_name="capture_records")
    op.drop_table("capture_records")
