"""The parity gate's evidence, pooled per model and kind of bf16 hardware across scoring jobs.

Revision ID: 0008
Revises: 0007
"""

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "parity_checks",
        sa.Column("model_digest", sa.String(64), primary_key=True),
        sa.Column("hardware", sa.String(128), primary_key=True),
        sa.Column("agreed", sa.Integer(), nullable=False),
        sa.Column("sampled", sa.Integer(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("parity_checks")
