"""Retrain jobs and cron schedules: the jobs, schedules and jobs_state tables (pipelines/jobs_tables.py).

Revision ID: 0002_jobs
Revises: 0001_baseline
Create Date: 2026-05-21

Frozen like every revision: the tables are spelled out here, not imported from pipelines/jobs_tables.py.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002_jobs"
down_revision = "0001_baseline"
branch_labels = None
depends_on = None

_ACTIVE = "state IN ('queued', 'running')"


def upgrade() -> None:
    op.create_table(
        "jobs",
        sa.Column("id", sa.String(32), nullable=False),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("adapter", sa.Text(), nullable=False),
        sa.Column("trigger", sa.String(16), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("progress", sa.Float(), nullable=False),
        sa.Column("message", sa.Text(), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("started_at", sa.Float(), nullable=True),
        sa.Column("finished_at", sa.Float(), nullable=True),
        sa.Column("result", sa.Text(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("log", sa.Text(), nullable=False),
        sa.Column("runner_pid", sa.Integer(), nullable=True),
        sa.Column("runner_id", sa.Text(), nullable=True),
        sa.Column("runner_host", sa.Text(), nullable=True),
        sa.Column("runner_home", sa.Text(), nullable=True),
        sa.Column("lease_until", sa.Float(), nullable=True),
        sa.CheckConstraint("trigger IN ('manual', 'schedule', 'drift')", name="ck_jobs_trigger"),
        sa.CheckConstraint("state IN ('queued', 'running', 'succeeded', 'rejected', 'failed')", name="ck_jobs_state"),
        sa.PrimaryKeyConstraint("id", name="pk_jobs"),
        sa.UniqueConstraint("seq", name="uq_jobs_seq"),
    )
    op.create_index("ix_jobs_one_active_per_adapter", "jobs", ["adapter"], unique=True,
                    sqlite_where=sa.text(_ACTIVE), postgresql_where=sa.text(_ACTIVE))
    op.create_index("ix_jobs_by_adapter", "jobs", ["adapter", "created_at"])
    op.create_index("ix_jobs_by_state", "jobs", ["state", "created_at"])
    op.create_table(
        "schedules",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("adapter", sa.Text(), nullable=False),
        sa.Column("cron", sa.Text(), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("last_run_at", sa.Float(), nullable=True),
        sa.Column("next_run_at", sa.Float(), nullable=True),
        sa.Column("last_tick", sa.Float(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_schedules"),
        sa.UniqueConstraint("adapter", "cron", name="uq_schedules_adapter"),
        sqlite_autoincrement=True,  # ids are never reused, as in jobs.db
    )
    state = op.create_table(
        "jobs_state",
        sa.Column("key", sa.String(64), nullable=False),
        sa.Column("value", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("key", name="pk_jobs_state"),
    )
    op.bulk_insert(state, [{"key": "schedules_generation", "value": 0}])


def downgrade() -> None:
    op.drop_table("jobs_state")
    op.drop_table("schedules")
    op.drop_index("ix_jobs_by_state", table_name="jobs")
    op.drop_index("ix_jobs_by_adapter", table_name="jobs")
    op.drop_index("ix_jobs_one_active_per_adapter", table_name="jobs")
    op.drop_table("jobs")
