"""Drift reports shared by every replica: drift_checks.report_sha256, the report's object in the artifact store.

Revision ID: 0007_report_objects
Revises: 0006_derived
Create Date: 2026-12-03

A replica writes a check's Evidently HTML under its own home and uploads it to the content-addressed artifact store;
another replica serving GET /drift/report fetches it by this digest (verified) into its own home.
Frozen like every revision: the column is spelled out here, not imported from monitoring/tables.py.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007_report_objects"
down_revision = "0006_derived"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("drift_checks") as batch:  # batch: SQLite alters a table by copying it
        batch.add_column(sa.Column("report_sha256", sa.String(64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("drift_checks") as batch:
        batch.drop_column("report_sha256")
