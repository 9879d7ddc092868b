"""Indexes for the dashboard with a long history: the newest jobs, the newest finished ones,
durations, and counts by status, kind and queue, without reading every row.

Revision ID: 0007
Revises: 0006
"""

from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_jobs_created_at_id", "jobs", ["created_at", "id"])
    op.create_index(
        "ix_jobs_status_finished_at", "jobs", ["status", "finished_at", "kind", "started_at"]
    )
    op.create_index("ix_jobs_status_kind_queue", "jobs", ["status", "kind", "queue"])


def downgrade() -> None:
    op.drop_index("ix_jobs_status_kind_queue", "jobs")
    op.drop_index("ix_jobs_status_finished_at", "jobs")
    op.drop_index("ix_jobs_created_at_id", "jobs")
