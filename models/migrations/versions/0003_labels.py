"""Labels and the feedback input cache: labels, label_events, label_conflicts, feedback_inputs, feedback_input_counts.

Revision ID: 0003_labels
Revises: 0001_baseline
Create Date: 2026-05-21

What pipelines/label_db.py (the label store) and service/inputs.py (the inputs kept for feedback by prediction id)
declare. Frozen once released: the tables are spelled out here, not imported. feedback_input_counts starts with its
two rows, "live" and "dead", both 0: the cache only ever updates them.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003_labels"
down_revision = "0002_jobs"
branch_labels = None
depends_on = None


def _labels() -> None:
    op.create_table(
        "labels",
        sa.Column("id", sa.Text()),
        sa.Column("adapter", sa.Text(), nullable=False),
        sa.Column("label", sa.Text(), nullable=False),
        sa.Column("source", sa.Text(), nullable=False),
        sa.Column("prediction_id", sa.Text()),
        sa.Column("split", sa.Text()),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("updated_at", sa.Float(), nullable=False),
        sa.Column("width", sa.Integer(), nullable=False),
        sa.Column("height", sa.Integer(), nullable=False),
        sa.Column("png", sa.LargeBinary(), nullable=False),
        sa.Column("trust", sa.Integer(), nullable=False),
        sa.Column("sender", sa.Text(), nullable=False),
        sa.CheckConstraint("split IS NULL OR split IN ('train', 'holdout')", name="ck_labels_split"),
        sa.PrimaryKeyConstraint("id", name="pk_labels"),
    )
    op.create_index("ix_labels_adapter_updated_at", "labels", ["adapter", "updated_at"])
    has_prediction = sa.text("prediction_id IS NOT NULL")
    op.create_index("ix_labels_prediction_id", "labels", ["prediction_id"], sqlite_where=has_prediction,
                    postgresql_where=has_prediction)
    op.create_table(
        "label_events",
        sa.Column("seq", sa.Integer()),
        sa.Column("label_id", sa.Text(), nullable=False),
        sa.Column("adapter", sa.Text(), nullable=False),
        sa.Column("label", sa.Text(), nullable=False),
        sa.Column("source", sa.Text(), nullable=False),
        sa.Column("prediction_id", sa.Text()),
        sa.Column("at", sa.Float(), nullable=False),
        sa.Column("trust", sa.Integer(), nullable=False),
        sa.Column("sender", sa.Text(), nullable=False),
        sa.Column("outcome", sa.Text()),
        sa.PrimaryKeyConstraint("seq", name="pk_label_events"),
    )
    op.create_index("ix_label_events_label_id", "label_events", ["label_id"])


def _conflicts() -> None:
    op.create_table(
        "label_conflicts",
        sa.Column("seq", sa.Integer()),
        sa.Column("label_id", sa.Text(), nullable=False),
        sa.Column("adapter", sa.Text(), nullable=False),
        sa.Column("kept_label", sa.Text(), nullable=False),
        sa.Column("kept_trust", sa.Integer(), nullable=False),
        sa.Column("offered_label", sa.Text(), nullable=False),
        sa.Column("trust", sa.Integer(), nullable=False),
        sa.Column("source", sa.Text(), nullable=False),
        sa.Column("sender", sa.Text(), nullable=False),
        sa.Column("prediction_id", sa.Text()),
        sa.Column("at", sa.Float(), nullable=False),
        sa.Column("resolution", sa.Text()),
        sa.Column("resolved_label", sa.Text()),
        sa.Column("resolved_at", sa.Float()),
        sa.CheckConstraint("resolution IS NULL OR resolution IN ('outranked', 'replaced', 'settled')",
                           name="ck_label_conflicts_resolution"),
        sa.PrimaryKeyConstraint("seq", name="pk_label_conflicts"),
    )
    pending = sa.text("resolved_at IS NULL")
    op.create_index("ix_label_conflicts_pending", "label_conflicts", ["label_id"], sqlite_where=pending,
                    postgresql_where=pending)
    op.create_index("ix_label_conflicts_adapter_at", "label_conflicts", ["adapter", "at"])


def _inputs() -> None:
    op.create_table(
        "feedback_inputs",
        sa.Column("seq", sa.Integer()),
        sa.Column("prediction_id", sa.Text(), nullable=False),
        sa.Column("adapter", sa.Text(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("png", sa.LargeBinary()),
        sa.Column("dropped", sa.Text()),
        sa.CheckConstraint("dropped IS NULL OR dropped IN ('ttl', 'capacity')", name="ck_feedback_inputs_dropped"),
        sa.PrimaryKeyConstraint("seq", name="pk_feedback_inputs"),
        sa.UniqueConstraint("prediction_id", name="uq_feedback_inputs_prediction_id"),
    )
    live, dead = sa.text("png IS NOT NULL"), sa.text("png IS NULL")
    op.create_index("ix_feedback_inputs_live", "feedback_inputs", ["created_at"], sqlite_where=live,
                    postgresql_where=live)
    op.create_index("ix_feedback_inputs_dropped", "feedback_inputs", ["created_at"], sqlite_where=dead,
                    postgresql_where=dead)
    counts = op.create_table(
        "feedback_input_counts",
        sa.Column("kind", sa.Text()),
        sa.Column("n", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("kind", name="pk_feedback_input_counts"),
    )
    op.bulk_insert(counts, [{"kind": "live", "n": 0}, {"kind": "dead", "n": 0}])


def upgrade() -> None:
    _labels()
    _conflicts()
    _inputs()


def downgrade() -> None:
    for table in ("feedback_input_counts", "feedback_inputs", "label_conflicts", "label_events", "labels"):
        op.drop_table(table)
