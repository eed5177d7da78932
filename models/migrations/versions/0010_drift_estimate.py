"""A drift check's accuracy estimated without labels: drift_checks.estimate, JSON (monitoring/accuracy.py).

Revision ID: 0010_drift_estimate
Revises: 0009_jobs_queue_behind
Create Date: 2026-12-03

Checks made before it keep NULL (no estimate). Frozen like every revision: the column is spelled out here.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010_drift_estimate"
down_revision = "0009_jobs_queue_behind"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("drift_checks") as batch:  # batch: SQLite alters a table by copying it
        batch.add_column(sa.Column("estimate", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("drift_checks") as batch:
        batch.drop_column("estimate")
