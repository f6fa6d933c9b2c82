"""The outbox's claim counter, the fencing token of a step's lease.

Revision ID: orders_0002
Revises: orders_0001
Create Date: 2026-12-06
"""

import sqlalchemy as sa
from alembic import op

revision = "orders_0002"
down_revision = "orders_0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("outbox_events") as batch:
        batch.add_column(sa.Column("claims", sa.Integer(), server_default=sa.text("0"), nullable=False))
    # Events claimed before this revision: their attempts so far were claims too.
    op.execute("UPDATE outbox_events SET claims = attempts")


def downgrade() -> None:
    with op.batch_alter_table("outbox_events") as batch:
        batch.drop_column("claims")
