"""A manual retrain waits behind the adapter's running job instead of being refused: one queued and one running job
per adapter, each held by its own partial unique index, instead of one of either.

Revision ID: 0009_jobs_queue_behind
Revises: 0008_capture_margin
Create Date: 2026-12-03

Frozen like every revision: the indexes are spelled out here. The downgrade refuses (IntegrityError) while an
adapter has both a queued and a running job: let the queue drain first.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009_jobs_queue_behind"
down_revision = "0008_capture_margin"
branch_labels = None
depends_on = None


def _unique(name: str, where: str) -> None:
    op.create_index(name, "jobs", ["adapter"], unique=True, sqlite_where=sa.text(where),
                    postgresql_where=sa.text(where))


def upgrade() -> None:
    op.drop_index("ix_jobs_one_active_per_adapter", table_name="jobs")
    _unique("ix_jobs_one_queued_per_adapter", "state = 'queued'")
    _unique("ix_jobs_one_running_per_adapter", "state = 'running'")


def downgrade() -> None:
    op.drop_index("ix_jobs_one_running_per_adapter", table_name="jobs")
    op.drop_index("ix_jobs_one_queued_per_adapter", table_name="jobs")
    _unique("ix_jobs_one_active_per_adapter", "state IN ('queued', 'running')")
