"""Baseline: the adaptserve_info table (when the schema was created and by which adaptserve).

Revision ID: 0001_baseline
Revises:
Create Date: 2026-05-20

The stores' tables come in later revisions. A revision is frozen once released: it names its tables and columns
itself instead of importing the live Table objects, so it still means the same thing after models/ moves on.
"""

from __future__ import annotations

import importlib.metadata
from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

revision = "0001_baseline"
down_revision = None
branch_labels = None
depends_on = None


def _version() -> str:
    try:
        return importlib.metadata.version("adaptserve")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree that was never pip-installed
        return "unknown"


def upgrade() -> None:
    info = op.create_table(
        "adaptserve_info",
        sa.Column("key", sa.String(64), primary_key=True),
        sa.Column("value", sa.Text(), nullable=False),
    )
    created_at = datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
    op.bulk_insert(info, [
        {"key": "schema_created_at", "value": created_at},
        {"key": "schema_created_by", "value": f"adaptserve {_version()}"},
    ])


def downgrade() -> None:
    op.drop_table("adaptserve_info")
