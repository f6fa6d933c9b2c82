"""Per order, the newest saga step that wrote in the inventory (its lease's fencing token).

Revision ID: inventory_0002
Revises: inventory_0001
Create Date: 2026-12-06
"""

import sqlalchemy as sa
from alembic import op

from db.tables import UTCDateTime

revision = "inventory_0002"
down_revision = "inventory_0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "reservation_fences",
        sa.Column("order_id", sa.String(36), nullable=False),
        sa.Column("event_id", sa.BigInteger(), nullable=False),
        sa.Column("claim", sa.Integer(), nullable=False),
        sa.Column("closed_reason", sa.Text(), nullable=True),
        sa.Column("update_time", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("order_id", name="pk_reservation_fences"),
    )


def downgrade() -> None:
    op.drop_table("reservation_fences")
