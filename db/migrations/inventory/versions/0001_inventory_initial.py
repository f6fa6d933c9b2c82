"""Stock and reservations.

Revision ID: inventory_0001
Revises:
Create Date: 2026-11-25
"""

import sqlalchemy as sa
from alembic import op

from db.tables import UTCDateTime

revision = "inventory_0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "stock",
        sa.Column("sku", sa.String(64), nullable=False),
        sa.Column("available", sa.BigInteger(), nullable=False),
        sa.Column("reserved", sa.BigInteger(), server_default=sa.text("0"), nullable=False),
        sa.Column("version", sa.BigInteger(), nullable=False),
        sa.Column("update_time", UTCDateTime(), nullable=False),
        sa.CheckConstraint("available >= 0", name="ck_stock_available_not_negative"),
        sa.CheckConstraint("reserved >= 0", name="ck_stock_reserved_not_negative"),
        sa.PrimaryKeyConstraint("sku", name="pk_stock"),
    )
    op.create_table(
        "stock_reservations",
        sa.Column("order_id", sa.String(36), nullable=False),
        sa.Column("sku", sa.String(64), nullable=False),
        sa.Column("quantity", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(8), nullable=False),
        sa.Column("create_time", UTCDateTime(), nullable=False),
        sa.Column("update_time", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("order_id", "sku", name="pk_stock_reservations"),
    )
    op.create_index("ix_stock_reservations_sku_status", "stock_reservations", ["sku", "status"])


def downgrade() -> None:
    op.drop_table("stock_reservations")
    op.drop_table("stock")
