"""The event relay's queue: changes of orders waiting to be published (`--events-url`).

Revision ID: orders_0003
Revises: orders_0002
Create Date: 2026-12-07
"""

import sqlalchemy as sa
from alembic import op

from db.tables import BigId, UTCDateTime

revision = "orders_0003"
down_revision = "orders_0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "relay_events",
        sa.Column("id", BigId, autoincrement=True, nullable=False),
        sa.Column("order_id", sa.String(36), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("version", sa.BigInteger(), nullable=False),
        sa.Column("customer_id", sa.String(128), nullable=False),
        sa.Column("order_status", sa.String(16), nullable=False),
        sa.Column("failure_reason", sa.Text(), server_default=sa.text("''"), nullable=False),
        sa.Column("occurred_at", UTCDateTime(), nullable=False),
        sa.Column("placed_items", sa.Text(), server_default=sa.text("''"), nullable=False),
        sa.Column("headers", sa.Text(), nullable=False),
        sa.Column("status", sa.String(8), nullable=False),
        sa.Column("attempts", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("claims", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("available_at", UTCDateTime(), nullable=False),
        sa.Column("locked_until", UTCDateTime(), nullable=True),
        sa.Column("lease_token", sa.String(36), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("updated_at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_relay_events"),
        sa.UniqueConstraint("order_id", "version", name="uq_relay_events_order_id_version"),
    )
    op.create_index(
        "ix_relay_events_pending",
        "relay_events",
        ["id"],
        postgresql_where=sa.text("status = 'PENDING'"),
        sqlite_where=sa.text("status = 'PENDING'"),
    )
    op.create_index("ix_relay_events_status_updated_at", "relay_events", ["status", "updated_at"])


def downgrade() -> None:
    op.drop_table("relay_events")
