"""Leases and re-publishing: when a job or shard was last published, shard heartbeats.

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

TIMESTAMP = sa.DateTime(timezone=True)


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("published_at", TIMESTAMP))
    with op.batch_alter_table("shards") as batch:
        batch.add_column(sa.Column("heartbeat_at", TIMESTAMP))
        batch.add_column(sa.Column("published_at", TIMESTAMP))


def downgrade() -> None:
    with op.batch_alter_table("shards") as batch:
        batch.drop_column("published_at")
        batch.drop_column("heartbeat_at")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("published_at")
