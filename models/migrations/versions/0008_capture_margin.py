"""Label requests rank captured predictions by their margin: capture_records.margin, top-1 minus top-2 probability.

Revision ID: 0008_capture_margin
Revises: 0007_report_objects
Create Date: 2026-12-03

Rows captured before this revision keep NULL; label requests read 2 x confidence - 1 for them (the smallest margin
that top-1 confidence allows). Frozen like every revision: the column is spelled out here.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008_capture_margin"
down_revision = "0007_report_objects"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("capture_records") as batch:  # batch: SQLite alters a table by copying it
        batch.add_column(sa.Column("margin", sa.Float(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("capture_records") as batch:
        batch.drop_column("margin")
